"""MoE on one GPU (issue 34 slice 4, issue 35's fp8 rows): a random-init Qwen3-MoE shape through
posttrain's engine, transformers ``generate`` and posttrain's trainer, in one process.

Sections, in this order (each in its own try/except: a failing one records its error and the rest
run; the JSON is rewritten after each, so a run cut short keeps what it measured):

1. correctness: before any timing, engine greedy tokens vs transformers greedy on the first
   prompts (the engine's model and an untouched copy that runs transformers' own experts). fp32
   (CPU): the tokens must be identical; bf16 (GPU): tokens before the first divergence.
2. engine: posttrain's engine tokens/s, --prompts prompts x --new-tokens tokens, temperature 1,
   ignore_eos so every backend makes the same number of tokens (bf16 weights, CUDA graphs).
3. fp8 (issue 35): bf16 experts (the same engine with its decode graphs released) against an
   engine with ``expert_dtype="fp8"`` (``moe.expert_dtype=fp8``: e4m3 copies of the experts,
   rowwise-scaled ``torch._scaled_mm`` with a host sync per layer, so it decodes without graphs,
   and so does the bf16 row here): tokens/s, the engine/trainer logprob mismatch of each (trainer
   with R3), and the trainer's logprobs of the same tokens and routes with fp8 vs bf16 experts
   (``GroupedMoE.using_fp8``). Skipped, with the reason, where the scaled-matmul path cannot run
   (CPU, GPUs below 9.0) unless --fp8 on (then the engine's reference path: dequantized weights).
4. mismatch: an engine on the float32 master weights under bf16 autocast (a colocated GRPO run's
   default, float32 routers) samples completions; the trainer's old-logprob forward
   (``recompute_old_logprobs``) scores them with router replay (R3) on and off: mean and max
   |engine - trainer| logprob and route agreement. The same for a dense Qwen2.5-0.5B shape (no
   routes) as the baseline (section mismatch_dense). Issue 34's goal: MoE with R3 within 2x the
   dense mismatch.
5. trainer: ``policy_update`` (GRPO's PPO-clip loss, packed micro-batches, R3 replaying the
   engine's routes, AdamW) on the section-4 completions, float32 weights under bf16 autocast.
   MFU = (6 x active parameters x tokens + attention) / time / --peak-tflops. Active parameters:
   everything but the experts, plus top_k/num_experts of them; the LM head counts for every token
   (posttrain computes logits only where a response token is predicted); attention is
   6 x layers x (heads x head_dim) x sum(tokens^2) per step (causal QK^T and AV, forward + backward).
6. transformers: ``generate`` with the dynamic cache, then the static cache (compiled by
   transformers), on an untouched bf16 copy of the model (transformers' own experts,
   ``config._experts_implementation``), with ``bench/rollout_throughput.run_hf``: one warm-up
   batch, then the timed one. The static cache starts only within --time-budget seconds.

    PYTHONPATH=$PWD python bench/moe.py --device cuda --json moe_h100.json
        # H100: estimated 5-7 minutes (not run on a GPU yet); the static-cache compile is the unknown
    PYTHONPATH=$PWD python bench/moe.py --device cpu --shape tiny --prompts 8 --prompt-len 16 --new-tokens 24 \\
        --greedy-prompts 2 --greedy-tokens 16 --train-steps 1 --train-warmup 1 --fp8 on   # smoke test, 30-70 s
    python bench/moe.py --table-from moe_h100.json        # the table again, e.g. of a run cut short
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_throughput import EOS, _Tok, decode_roofline_tokens_per_s, run_hf
from rollout_throughput import SHAPES as DENSE_SHAPES
from rollout_throughput import build_model as build_dense

from posttrain.config.loader import load_config
from posttrain.config.schema import GRPOConfig
from posttrain.engine import Engine
from posttrain.models.loading import autocast_context
from posttrain.models.moe import apply_router_dtype
from posttrain.models.moe.fp8_experts import scaled_mm_capable, scaled_mm_supported
from posttrain.models.moe.hf_blocks import use_grouped_experts
from posttrain.sampling import SamplingParams
from posttrain.trainer.memory import prepare_for_training
from posttrain.trainer.optim import build_optimizer, build_scheduler
from posttrain.trainer.packing import packs_samples
from posttrain.trainer.policy import policy_update
from posttrain.trainer.rollouts import recompute_old_logprobs
from posttrain.trainer.samples import Sample

MOE_COMMON = {"vocab_size": 151936, "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
              "use_sliding_window": False}
# name -> (Qwen3MoeConfig kwargs, the dense shape of bench/rollout_throughput.py compared with it)
SHAPES = {
    # Qwen3-30B-A3B's layout scaled down: 2.1B parameters, 0.51B active (0.36B without the embedding).
    "qwen3-moe-2b": (dict(MOE_COMMON, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          num_key_value_heads=4, head_dim=128, num_experts=64, num_experts_per_tok=8,
                          moe_intermediate_size=384, intermediate_size=3072), "qwen2.5-0.5b"),
    "tiny": (dict(MOE_COMMON, vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                  intermediate_size=128), "tiny"),
}
FP8_MODES = ("auto", "on", "off")


# ---------------------------------------------------------------- models


def build_moe(shape: str, device: torch.device, attn: str) -> torch.nn.Module:
    """The random-init Qwen3-MoE policy in float32 (the trainer's master weights)."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**SHAPES[shape][0], eos_token_id=EOS, pad_token_id=0, bos_token_id=1)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.generation_config.max_length = None
    return model.eval()


def param_counts(model: torch.nn.Module) -> dict:
    """Total, expert and active parameters (active: all but the experts, plus top_k/E of them)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    active = total - experts + experts * cfg.num_experts_per_tok / cfg.num_experts
    return {"total": total, "experts": experts, "active": active,
            "active_without_embedding": active - model.get_input_embeddings().weight.numel()}


def step_flops(model: torch.nn.Module, active: float, lengths: list[int]) -> float:
    """Training FLOPs of one pass over sequences of ``lengths`` tokens: 6 x active x tokens plus
    causal attention (QK^T and AV: 2 x n^2 x heads x head_dim per layer forward, x3 with backward)."""
    cfg = model.config
    q_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return 6 * active * sum(lengths) + 6 * cfg.num_hidden_layers * q_dim * sum(n * n for n in lengths)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_engine(model, args, device, *, master: bool, notes: list[str], expert_dtype: str = "auto") -> Engine:
    """``master``: the float32 master weights, generating under bf16 (autocast on a GPU, bf16
    copies of the weights on a CPU) as a colocated GRPO run does; else the model's own dtype.
    If capturing the decode graphs fails, the engine is built again without them (noted in
    ``notes``), so that the sections after it still measure something."""
    kwargs = {"max_model_len": args.prompt_len + args.new_tokens + 1, "max_num_seqs": args.prompts,
              "kv_cache_memory_fraction": 0.4, "cpu_kv_cache_gb": 1.0, "expert_dtype": expert_dtype}
    if master:
        kwargs.update(compute_dtype=torch.bfloat16, cpu_dtype=torch.bfloat16)
    else:
        kwargs.update(compute_dtype=next(model.parameters()).dtype)
    try:
        return Engine(model, _Tok(), **kwargs)
    except Exception as exc:  # any capture failure: retry without graphs, and say so
        if device.type != "cuda":
            raise
        traceback.print_exc(limit=4)
        notes.append(f"engine without CUDA graphs after {type(exc).__name__}: {str(exc)[:160]}")
        _free(device)
        return Engine(model, _Tok(), cuda_graphs=False, **kwargs)


def timed_generate(engine: Engine, prompts, new_tokens: int, device, seed: int | None = None):
    """Sampled at temperature 1 with ignore_eos (every completion has ``new_tokens`` tokens);
    prefixes cached by an earlier run are dropped first. Returns (row, completions)."""
    engine.flush_cache()
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=seed)
    _sync(device)
    start = time.perf_counter()
    completions = [group[0] for group in engine.generate(prompts, params)]
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds}, completions


def greedy(engine: Engine, prompts, n: int) -> list[list[int]]:
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    return [group[0].token_ids for group in out]


def hf_greedy(model, prompts, n: int, device) -> list[list[int]]:
    ids = torch.tensor(prompts, device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Identical sequences and, per prompt, the tokens before the first divergence."""
    first = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t))) for s, t in zip(a, b)]
    return {"identical": sum(s == t for s, t in zip(a, b)), "prompts": len(a), "tokens": len(a[0]) if a else 0,
            "first_divergence": first}


# ---------------------------------------------------------------- fp8 experts


def fp8_skip_reason(mode: str, device: torch.device, config) -> str | None:
    """Why the fp8 rows do not run here (None: they do). ``auto`` runs them only where the engine's
    fp8 experts take the scaled-matmul path (rowwise ``torch._scaled_mm``: CUDA 9.0+, sizes in
    multiples of 16); ``on`` runs them anyway, on the engine's reference path elsewhere."""
    if mode == "off":
        return "skipped: --fp8 off"
    if mode == "on":
        return None
    if device.type != "cuda":
        return (f"skipped: no fp8 scaled-matmul path on {device.type} (--fp8 on measures the engine's "
                "reference path, dequantized weights)")
    if not hasattr(torch, "_scaled_mm"):
        return f"skipped: torch {torch.__version__} has no torch._scaled_mm"
    capability = torch.cuda.get_device_capability(device)
    if not scaled_mm_capable(capability):
        return (f"skipped: {torch.cuda.get_device_name(device)} has compute capability "
                f"{capability[0]}.{capability[1]}; rowwise torch._scaled_mm needs 9.0+")
    if config.hidden_size % 16 or config.moe_intermediate_size % 16:
        return "skipped: hidden and expert intermediate sizes must be multiples of 16 for torch._scaled_mm"
    return None


# ---------------------------------------------------------------- the trainer side


def train_config(args, num_samples: int) -> GRPOConfig:
    # group_size 1 and reinforce_plus_plus only pass the config checks for a batch of distinct prompts
    # (as in bench/train_throughput.py); the loss is GRPO's PPO-clip token loss on the given advantages.
    overrides = [f"trainer.micro_batch_tokens={args.micro_batch_tokens}", f"trainer.micro_batch_size={num_samples}",
                 f"trainer.mini_batch_size={num_samples}", f"rollout.batch_size={num_samples}", "rollout.group_size=1",
                 "algorithm.advantage=reinforce_plus_plus", f"rollout.max_new_tokens={args.new_tokens}",
                 "rollout.temperature=1.0"]
    return load_config(GRPOConfig, None, overrides + list(args.set))


def to_samples(completions) -> list[Sample]:
    """Training samples of engine completions, with the engine's logprobs and routes (as GRPO's
    training_samples); advantages alternate +1/-1."""
    return [Sample(list(c.prompt_token_ids), list(c.token_ids), list(c.logprobs), 1.0 if i % 2 else -1.0, 0.0,
                   ref_logprobs=list(c.logprobs), routed_experts=c.routed_experts)
            for i, c in enumerate(completions)]


def mismatch(model, completions, cfg: GRPOConfig, device, replay: bool) -> dict:
    """The trainer's old-logprob forward on the engine's completions: |engine - trainer| logprobs."""
    metrics = recompute_old_logprobs(model, to_samples(completions), 0, device,
                                     autocast_context(device, torch.bfloat16), trainer=cfg.trainer,
                                     rollout=cfg.rollout, model_cfg=cfg.model, router_replay=replay)
    row = {"mean": metrics["rollout/logprob_mismatch_mean"], "max": metrics["rollout/logprob_mismatch_max"],
           "tokens": sum(len(c.token_ids) for c in completions)}
    if "moe/route_agreement" in metrics:
        row["route_agreement"] = metrics["moe/route_agreement"]
    return row


@torch.no_grad()
def trainer_logprobs(model, completions, cfg: GRPOConfig, device) -> torch.Tensor:
    """The trainer's logprobs of the completions' tokens (R3 on: their routes replayed), flat."""
    samples = to_samples(completions)
    recompute_old_logprobs(model, samples, 0, device, autocast_context(device, torch.bfloat16), trainer=cfg.trainer,
                           rollout=cfg.rollout, model_cfg=cfg.model, router_replay=True)
    return torch.tensor([x for s in samples for x in s.old_logprobs])


def train_mfu(model, completions, args, device) -> dict:
    cfg = train_config(args, len(completions))
    samples = to_samples(completions)
    autocast = autocast_context(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    prepare_for_training(model, cfg.trainer, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, args.train_warmup + args.train_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.train_warmup + args.train_steps):
        if i == args.train_warmup:
            _sync(device)
            start = time.perf_counter()
        metrics = policy_update(model, optimizer, scheduler, samples, 0, device, autocast,
                                algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                                moe_cfg=cfg.moe)
    _sync(device)
    seconds = (time.perf_counter() - start) / args.train_steps
    counts = param_counts(model)
    lengths = [s.num_tokens for s in samples]
    flops = step_flops(model, counts["active"], lengths)
    row = {"tokens_per_step": sum(lengths), "seconds_per_step": seconds, "tokens_per_s": sum(lengths) / seconds,
           "flops_per_step": flops, "attention_share": 1 - 6 * counts["active"] * sum(lengths) / flops,
           "mfu": flops / seconds / (args.peak_tflops * 1e12), "steps": args.train_steps,
           "layout": "packed" if packs_samples(model, cfg.trainer.micro_batch_tokens, autocast) else "padded",
           "micro_batch_tokens": cfg.trainer.micro_batch_tokens,
           "replayed": any(s.routed_experts is not None for s in samples) and cfg.moe.router_replay,
           "loss": metrics.get("loss/policy", float("nan"))}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del optimizer, scheduler
    return row


# ---------------------------------------------------------------- report


def table(results: dict) -> str:
    """The markdown rows for docs/benchmarks.md."""
    def get(*keys):
        node = results
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def state(section):  # a skipped or failed section's reason, else None
        node = results.get(section)
        if not isinstance(node, dict):
            return "not run"
        return node.get("skipped") or node.get("error")

    rows = []
    c = results.get("correctness", {})
    if state("correctness"):
        rows.append(("greedy: engine vs transformers", state("correctness"), ""))
    else:
        rows.append((f"greedy: engine vs transformers ({c['prompts']} prompts x {c['tokens']} tokens, {c['dtype']})",
                     f"{c['identical']}/{c['prompts']} identical; first divergence {c['first_divergence']}",
                     "identical in fp32"))
    w = results["meta"]["workload"]
    engine = get("engine", "tokens_per_s")
    graphs = "CUDA graphs" if get("engine", "cuda_graphs") else "no CUDA graphs"
    roof = get("engine", "roofline_share")
    rows.append((f"engine tokens/s ({w}, {graphs})",
                 state("engine") or f"{engine:,.0f}" + (f" ({roof:.1%} of the HBM roofline)" if roof else ""), ""))
    for key, name in (("hf_dynamic", "transformers generate, dynamic cache"),
                      ("hf_static", "transformers generate, static cache")):
        rate = get(key, "tokens_per_s")
        if rate is None:
            rows.append((name, state(key) or "-", "engine >= 3x" if key == "hf_dynamic" else ""))
        else:
            rows.append((name, f"{rate:,.0f} tok/s; engine {engine / rate:.2f}x" if engine else f"{rate:,.0f} tok/s",
                         "engine >= 3x"))
    t = results.get("trainer", {})
    rows.append(("trainer MFU (active params + attention)", state("trainer") or
                 f"{t['mfu']:.1%} ({t['tokens_per_s']:,.0f} tok/s, {t['tokens_per_step']:,} tokens/step, {t['layout']}, "
                 f"R3 {'on' if t['replayed'] else 'off'})", ""))
    dense = get("mismatch_dense", "mean")
    for key, name in (("moe_r3_on", "mismatch MoE, R3 on"), ("moe_r3_off", "mismatch MoE, R3 off")):
        m = get("mismatch", key)
        if m is None:
            rows.append((name, state("mismatch") or "-", ""))
            continue
        # With R3 on, route agreement is what replay overrode; the R3-off row shows it as is.
        agree = f", route agreement {m['route_agreement']:.1%}" if key == "moe_r3_off" else ""
        ratio = f", {m['mean'] / dense:.2f}x dense" if dense else ""
        rows.append((name, f"mean {m['mean']:.2e}, max {m['max']:.2e}{ratio}{agree}",
                     "<= 2x dense" if key == "moe_r3_on" else ""))
    m = results.get("mismatch_dense", {})
    rows.append((f"mismatch dense ({results['meta']['dense_shape']})",
                 state("mismatch_dense") or f"mean {m['mean']:.2e}, max {m['max']:.2e}", ""))
    if state("fp8"):
        rows.append(("fp8 experts (issue 35)", state("fp8"), ""))
    else:
        f = results["fp8"]
        for key in ("bf16", "fp8"):
            r = f[key]
            rows.append((f"engine {key} experts, eager decode ({f.get('new_tokens', '?')} new tokens)",
                         (f"{r['tokens_per_s']:,.0f} tok/s; vs trainer (R3) mean {r['mismatch']['mean']:.2e}, "
                          f"max {r['mismatch']['max']:.2e}"), ""))
        d = f["trainer_fp8_vs_bf16"]
        rows.append(("trainer logprobs, fp8 vs bf16 experts (same tokens, R3)",
                     (f"mean {d['mean']:.2e}, max {d['max']:.2e}; fp8/bf16 engine tokens/s {f['speedup']:.2f}x; "
                      f"{f['path']}"), ""))
        a = f["greedy_fp8_vs_bf16"]
        rows.append((f"engine greedy, fp8 vs bf16 experts ({a['prompts']} prompts x {a['tokens']} tokens)",
                     f"{a['identical']}/{a['prompts']} identical; first divergence {a['first_divergence']}", ""))
    meta = results["meta"]
    p = meta["params"]
    lines = [f"- **Date:** {meta['date']}",
             f"- **Device:** {meta['device']} (torch {meta['torch']}, transformers {meta['transformers']})",
             f"- **Command:** `{meta['command']}`",
             (f"- **Model:** random-init {meta['shape']}, {p['total'] / 1e6:,.1f}M parameters, "
              f"{p['active'] / 1e6:,.1f}M active; {meta['workload']}; {meta.get('total_s', float('nan')):.0f} s in all"),
             *(f"- **Note:** {note}" for note in meta.get("notes", [])),
             "", "| measurement | result | goal |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {g} |" for a, b, g in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="qwen3-moe-2b", choices=sorted(SHAPES))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--greedy-prompts", type=int, default=4, help="correctness: prompts compared greedily")
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--fp8", default="auto", choices=FP8_MODES,
                        help="auto: the GPU scaled-matmul path where it runs, else skipped; scaled_mm / reference "
                        "force a path (also on a CPU); off")
    parser.add_argument("--fp8-new-tokens", type=int, default=128, help="tokens per prompt of the eager fp8/bf16 rows")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--train-warmup", type=int, default=1)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--hf", default=None, help="transformers backends, comma-separated: dynamic,static "
                        "(default both on cuda, dynamic on cpu)")
    parser.add_argument("--time-budget", type=float, default=300.0,
                        help="seconds: the static-cache baseline (it compiles) starts only before this")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer config override")
    parser.add_argument("--json", default=None, help="write the results here (after every section)")
    parser.add_argument("--table-from", default=None, metavar="JSON",
                        help="only print the table of an earlier run's JSON (e.g. one cut short)")
    args = parser.parse_args(argv)
    if args.table_from:
        results = json.loads(Path(args.table_from).read_text())
        print(table(results))
        return results
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    hf_backends = (args.hf or ("dynamic,static" if cuda else "dynamic")).split(",")
    began = time.perf_counter()
    moe_kwargs, dense_shape = SHAPES[args.shape]
    vocab = min(moe_kwargs["vocab_size"], DENSE_SHAPES[dense_shape][2]["vocab_size"])
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    cfg = train_config(args, args.prompts)

    master = build_moe(args.shape, device, cfg.model.attn_implementation)
    counts = param_counts(master)
    results: dict = {"meta": {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python bench/moe.py " + " ".join(sys.argv[1:] if argv is None else argv), "shape": args.shape,
        "config": moe_kwargs, "params": counts, "dense_shape": dense_shape,
        "workload": f"{args.prompts} prompts x {args.prompt_len} + {args.new_tokens} tokens", "notes": [],
    }}
    notes = results["meta"]["notes"]
    print(f"# bench/moe.py {results['meta']['date']} | {results['meta']['device']} | torch {torch.__version__} | "
          f"transformers {transformers.__version__}")
    print(f"# {args.shape}: {counts['total'] / 1e6:,.1f}M parameters, {counts['active'] / 1e6:,.1f}M active "
          f"({counts['active_without_embedding'] / 1e6:,.1f}M without the embedding); dense baseline {dense_shape}",
          flush=True)

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    def section(name, fn, *, budget: bool = False):
        if budget and time.perf_counter() - began > args.time_budget:
            results[name] = {"skipped": f"skipped: --time-budget {args.time_budget:.0f} s passed"}
        else:
            start = time.perf_counter()
            try:
                results[name] = fn()
            except Exception as exc:  # noqa: BLE001 - keep going: one failing section must not lose the others' numbers
                traceback.print_exc(limit=4)
                message = str(exc).splitlines()[0][:200] if str(exc) else ""
                results[name] = {"error": f"error: {type(exc).__name__}: {message}"}
            results[name]["section_s"] = time.perf_counter() - start
        print(f"## {name}: " + json.dumps(results[name], default=lambda v: str(v))[:600], flush=True)
        save()
        _free(device)

    # The rollout model: bf16 copy on a GPU (as bench/rollout_throughput.py), the float32 model on a
    # CPU (exact greedy parity); the transformers copy is taken before any engine touches the blocks.
    rollout = copy.deepcopy(master).to(torch.bfloat16 if cuda else torch.float32)
    hf = copy.deepcopy(rollout)
    try:  # plain sdpa for transformers' generate (the trainer's sdpa_varlen falls back to it there anyway)
        hf.set_attn_implementation("sdpa")
    except Exception as exc:  # noqa: BLE001 - a baseline detail, not worth losing the run over
        notes.append(f"transformers copy kept attn_implementation={cfg.model.attn_implementation}: {exc}")
    if cuda:  # moe.router.dtype=float32, posttrain's default (on a CPU the engine's bf16 weight swap cannot hold it)
        apply_router_dtype(master, "float32")
    state: dict = {}

    def correctness():
        n = min(args.greedy_tokens, args.new_tokens)
        reference = hf_greedy(hf, prompts[: args.greedy_prompts], n, device)
        start = time.perf_counter()
        state["engine"] = engine = make_engine(rollout, args, device, master=False, notes=notes)
        setup = time.perf_counter() - start
        timed_generate(engine, prompts, 2, device)  # warm-up: a full-batch prefill, sampled decode steps
        state["greedy"] = tokens = greedy(engine, prompts[: args.greedy_prompts], n)
        return {**agreement(tokens, reference), "dtype": str(next(rollout.parameters()).dtype).split(".")[-1],
                "engine_setup_s": setup, "cuda_graphs": bool(engine.runner.graphs)}

    def engine_rate():
        if "engine" not in state:
            return {"skipped": "skipped: no engine (the correctness section failed)"}
        row, _ = timed_generate(state["engine"], prompts, args.new_tokens, device)
        # at a batch of 64 x top-8 of 64 experts nearly every expert runs each step: all weights are read
        roofline = decode_roofline_tokens_per_s(rollout, len(prompts), args.prompt_len + args.new_tokens / 2, device)
        return {**row, "cuda_graphs": bool(state["engine"].runner.graphs),
                "roofline_share": row["tokens_per_s"] / roofline if roofline else None}

    def fp8():
        reason = fp8_skip_reason(args.fp8, device, master.config)
        if reason or "engine" not in state:
            return {"skipped": reason or "skipped: no engine (the correctness section failed)"}
        engine = state["engine"]
        engine.runner.release_graphs()  # the fp8 engine decodes without graphs (a host sync per layer): so does bf16 here
        new_tokens, greedy_tokens = min(args.fp8_new_tokens, args.new_tokens), min(args.greedy_tokens, args.new_tokens)
        rows, completions, greedy_tokens_of = {}, {}, {}
        rows["bf16"], completions["bf16"] = timed_generate(engine, prompts, new_tokens, device)
        greedy_tokens_of["bf16"] = greedy(engine, prompts[: args.greedy_prompts], greedy_tokens)
        start = time.perf_counter()
        fp8_engine = make_engine(rollout, args, device, master=False, notes=notes, expert_dtype="fp8")
        setup = time.perf_counter() - start
        timed_generate(fp8_engine, prompts, 2, device)  # warm-up
        rows["fp8"], completions["fp8"] = timed_generate(fp8_engine, prompts, new_tokens, device)
        greedy_tokens_of["fp8"] = greedy(fp8_engine, prompts[: args.greedy_prompts], greedy_tokens)
        quantized = fp8_engine.fp8_experts
        probe = torch.empty(0, device=device, dtype=next(rollout.parameters()).dtype)
        path = "rowwise torch._scaled_mm (W8A8)" if scaled_mm_supported(probe, quantized[0]) else "reference (dequantized)"
        fp8_gib = sum(q.nbytes() for q in quantized) / 2**30
        del fp8_engine, quantized
        _free(device)
        for key, row in rows.items():
            row["mismatch"] = mismatch(master, completions[key], cfg, device, replay=True)
        # The same tokens and routes through the trainer with bf16 and with fp8 experts.
        bf16_lp = trainer_logprobs(master, completions["fp8"], cfg, device)
        moe = use_grouped_experts(master)
        with moe.using_fp8(moe.quantize_fp8()):
            fp8_lp = trainer_logprobs(master, completions["fp8"], cfg, device)
        diff = (fp8_lp - bf16_lp).abs()
        rollout_gib = sum(p.numel() * p.element_size() for name, p in rollout.named_parameters() if ".experts." in name) / 2**30
        return {**rows, "new_tokens": new_tokens, "path": path, "fp8_engine_setup_s": setup,
                "speedup": rows["fp8"]["tokens_per_s"] / rows["bf16"]["tokens_per_s"],
                "trainer_fp8_vs_bf16": {"mean": diff.mean().item(), "max": diff.max().item(), "tokens": diff.numel()},
                "greedy_fp8_vs_bf16": agreement(greedy_tokens_of["fp8"], greedy_tokens_of["bf16"]),
                "expert_gib": {"fp8": fp8_gib, str(next(rollout.parameters()).dtype).split(".")[-1]: rollout_gib}}

    def mismatch_section():
        engine = make_engine(master, args, device, master=True, notes=notes)
        _, state["completions"] = timed_generate(engine, prompts, args.new_tokens, device, seed=1)
        del engine
        _free(device)
        return {"moe_r3_on": mismatch(master, state["completions"], cfg, device, replay=True),
                "moe_r3_off": mismatch(master, state["completions"], cfg, device, replay=False),
                "dtype": "float32 weights, bf16 autocast" if cuda else "bf16 engine weights, bf16 CPU autocast trainer"}

    def dense_section():
        dense = build_dense(dense_shape, device, torch.float32)
        if hasattr(dense, "set_attn_implementation"):  # the trainer's attention, as the MoE policy's
            dense.set_attn_implementation(cfg.model.attn_implementation)
        engine = make_engine(dense, args, device, master=True, notes=notes)
        _, completions = timed_generate(engine, prompts, args.new_tokens, device, seed=1)
        del engine
        return {"shape": dense_shape, **mismatch(dense, completions, cfg, device, replay=True)}

    def hf_rate(static: bool):
        if ("static" if static else "dynamic") not in hf_backends:
            return {"skipped": f"skipped: not in --hf {','.join(hf_backends)}"}
        row = run_hf(hf, prompts, [[args.new_tokens] for _ in prompts], device, static, len(prompts), 1)
        return {**row, "tokens_per_s": row["tokens"] / row["seconds"],
                "experts_implementation": getattr(hf.config, "_experts_implementation", None)}

    section("correctness", correctness)
    section("engine", engine_rate)
    section("fp8", fp8)
    state.pop("engine", None)
    _free(device)
    section("mismatch", mismatch_section)
    section("mismatch_dense", dense_section)
    with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):  # either section failed: no ratio
        results["mismatch"]["r3_on_vs_dense"] = results["mismatch"]["moe_r3_on"]["mean"] / results["mismatch_dense"]["mean"]
    section("trainer", lambda: train_mfu(master, state["completions"], args, device))
    master = rollout = None  # frees them for the transformers baselines (the closures above hold the names)
    section("hf_dynamic", lambda: hf_rate(False))
    section("hf_static", lambda: hf_rate(True), budget=True)
    results["meta"]["total_s"] = time.perf_counter() - began
    save()
    print()
    print(table(results))
    return results


if __name__ == "__main__":
    main()
