"""Rollout routing replay (R3) in the trainer: posttrain's engine generates with a tiny random MoE
and records its routes; the trainer's old-logprob and training forwards replay them. With the
trainer's router perturbed after the rollout, replay keeps the engine's routes (the logprobs equal
a forward forced to them) and the engine/trainer logprob mismatch drops; the router still gets
gradients; padded and packed micro-batches agree; without replay ``moe/route_agreement`` says how
often the routers agree."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from helpers import make_tokenizer
from posttrain.config.schema import GRPOConfig
from posttrain.engine import Engine
from posttrain.models.logprobs import lay_out_per_token, make_packed_token_batch, make_token_batch
from posttrain.models.moe import build_random_moe_model, find_routers
from posttrain.models.moe.hf_blocks import use_grouped_experts
from posttrain.rollout import SamplingParams
from posttrain.trainer.optim import build_optimizer, build_scheduler
from posttrain.trainer.policy import policy_update
from posttrain.trainer.rollouts import recompute_old_logprobs
from posttrain.trainer.samples import Sample, collate, routes_like_tokens

TEXTS = ["What is 2+3?", "Hi", "A longer prompt here, long enough to span several blocks", "2+2"]
CPU = torch.device("cpu")


def _config(family: str) -> GRPOConfig:
    cfg = GRPOConfig()
    init = cfg.moe.random_init
    init.family, init.hidden_size, init.intermediate_size, init.num_layers, init.seed = family, 32, 32, 2, 0
    cfg.moe.router.num_experts, cfg.moe.router.top_k = 6, 2
    cfg.rollout.temperature = 1.0
    cfg.rollout.batch_size = cfg.trainer.mini_batch_size = 8
    cfg.rollout.max_new_tokens = 12
    cfg.trainer.micro_batch_size, cfg.trainer.micro_batch_tokens = 4, 0
    return cfg


def _rollout(family: str):
    """(policy, cfg, samples): 8 sampled completions of a tiny random MoE from posttrain's engine,
    with their routes. The engine runs on a copy, so the policy keeps transformers' own experts."""
    cfg, tok = _config(family), make_tokenizer()
    policy = build_random_moe_model(cfg.moe, tok, "sdpa")
    engine = Engine(copy.deepcopy(policy), tok, max_model_len=128, block_size=4, max_num_seqs=8)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    torch.manual_seed(0)
    groups = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=12, ignore_eos=True))
    samples = [Sample(p, c.token_ids, list(c.logprobs), 1.0, 0.0, routed_experts=c.routed_experts)
               for p, group in zip(prompts, groups) for c in group]
    assert all(s.routed_experts.shape == (2, s.num_tokens - 1, 2) for s in samples)
    return policy, cfg, samples


def _perturb_routers(model: torch.nn.Module, scale: float = 1.0, seed: int = 1) -> None:
    """The trainer's routers drift from the engine's after the rollout: noise on the gate weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in find_routers(model)[0]:
            router.weight += scale * router.weight.std() * torch.randn(router.weight.shape, generator=g)


def _recompute(model, cfg, samples, replay: bool) -> tuple[list[list[float]], dict[str, float]]:
    samples = [copy.copy(s) for s in samples]
    metrics = recompute_old_logprobs(model, samples, 0, CPU, contextlib.nullcontext, trainer=cfg.trainer,
                                     rollout=cfg.rollout, model_cfg=cfg.model, router_replay=replay)
    return [s.old_logprobs for s in samples], metrics


def _forced_logprobs(model, sample: Sample) -> list[float]:
    """The sample's response logprobs from a plain forward whose MoE layers are forced to the
    engine's routes (the last token, which the engine never ran, routed anywhere)."""
    moe = use_grouped_experts(model)
    routes = torch.cat([sample.routed_experts, torch.zeros_like(sample.routed_experts[:, :1])], dim=1)
    tokens = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad(), moe.replaying(list(routes)):
        logits = model(tokens).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)[:-1].gather(-1, tokens[0, 1:, None])[:, 0]
    return logprobs[len(sample.prompt_ids) - 1:].tolist()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_replay_follows_the_engine_routes_and_the_mismatch_drops(family):
    policy, cfg, samples = _rollout(family)
    # Unperturbed: the trainer reproduces the engine's logprobs with or without replay, and its
    # router agrees with the engine's everywhere.
    same, metrics = _recompute(policy, cfg, samples, replay=True)
    assert metrics["rollout/logprob_mismatch_max"] < 1e-4
    assert metrics["moe/route_agreement"] == 1.0
    _, metrics = _recompute(policy, cfg, samples, replay=False)
    assert metrics["rollout/logprob_mismatch_max"] < 1e-4 and metrics["moe/route_agreement"] == 1.0

    _perturb_routers(policy)
    replayed, on = _recompute(policy, cfg, samples, replay=True)
    free, off = _recompute(policy, cfg, samples, replay=False)
    # Replay: exactly the forward forced to the engine's routes, whatever the router now prefers.
    for s, logprobs in zip(samples, replayed):
        assert logprobs == pytest.approx(_forced_logprobs(policy, s), abs=1e-5)
    assert replayed != free
    # The router now disagrees with the engine on many tokens; replay removes that part of the mismatch.
    assert 0.2 < off["moe/route_agreement"] < 0.95
    assert set(off) >= {"moe/route_agreement/layer_0", "moe/route_agreement/layer_1"}
    assert on["moe/route_agreement"] == pytest.approx(off["moe/route_agreement"], abs=0.25)  # the router's own choice
    assert on["rollout/logprob_mismatch_mean"] < 0.5 * off["rollout/logprob_mismatch_mean"]
    assert on["rollout/logprob_mismatch_max"] < off["rollout/logprob_mismatch_max"]


def test_samples_without_routes_are_neither_replayed_nor_compared():
    policy, cfg, samples = _rollout("mixtral")
    _perturb_routers(policy)
    bare = [copy.copy(s) for s in samples]
    for s in bare:
        s.routed_experts = None
    logprobs, metrics = _recompute(policy, cfg, bare, replay=True)
    assert "moe/route_agreement" not in metrics
    assert logprobs == _recompute(policy, cfg, samples, replay=False)[0]


def test_routes_are_laid_out_like_the_tokens_padded_and_packed():
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, (p, r) in enumerate([(3, 4), (5, 1), (2, 6)]):
        routes = torch.randint(0, 8, (2, p + r - 1, 2), generator=g, dtype=torch.int16)
        samples.append(Sample(list(range(10 * i, 10 * i + p)), list(range(5, 5 + r)), [0.0] * r, 0.0, 0.0,
                              routed_experts=routes))
    prompts, responses = [s.prompt_ids for s in samples], [s.response_ids for s in samples]
    for tokens in (make_token_batch(prompts, responses, 0), make_packed_token_batch(prompts, responses, 0),
                   make_packed_token_batch(prompts, responses, 0, rows=[[2], [1, 0]])):
        routes = routes_like_tokens(samples, tokens, CPU)
        width = tokens.input_ids.shape[1]
        assert len(routes) == 2 and all(r.shape == (tokens.input_ids.numel(), 2) for r in routes)
        rows, cols = tokens.sample_starts
        for b, s in enumerate(samples):
            flat = int(rows[b]) * width + int(cols[b])
            # The sample's own tokens sit there, and so do its routes.
            assert tokens.input_ids.flatten()[flat: flat + s.num_tokens].tolist() == s.prompt_ids + s.response_ids
            for layer in range(2):
                assert torch.equal(routes[layer][flat: flat + s.num_tokens - 1], s.routed_experts[layer])
                assert routes[layer][flat + s.num_tokens - 1].tolist() == [0, 0]  # never ran: expert 0
    laid = lay_out_per_token(make_token_batch(prompts, responses, 0), [torch.ones(2), torch.ones(6), torch.ones(1)])
    assert laid.sum(1).tolist() == [2.0, 6.0, 1.0]
    samples[1].routed_experts = samples[1].routed_experts[:, :3]
    with pytest.raises(Exception, match="routed_experts of shape"):
        collate(samples, 0, CPU, routes=True)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_packed_and_padded_micro_batches_replay_the_same(family):
    policy, cfg, samples = _rollout(family)
    _perturb_routers(policy)
    padded, metrics_padded = _recompute(policy, cfg, samples, replay=True)
    cfg.trainer.micro_batch_tokens = 64  # packed rows (sdpa keeps documents apart by position ids)
    packed, metrics_packed = _recompute(policy, cfg, samples, replay=True)
    for a, b in zip(padded, packed):
        assert a == pytest.approx(b, abs=1e-5)
    assert metrics_packed["moe/route_agreement"] == pytest.approx(metrics_padded["moe/route_agreement"])
    # The training forward too: the same update from a padded and a packed micro-batch (one each:
    # the router losses are per forward pass, so only the same split gives the same ones).
    updates = []
    for tokens in (0, 1024):
        model, run = copy.deepcopy(policy), copy.deepcopy(cfg)
        run.trainer.micro_batch_size, run.trainer.micro_batch_tokens = 8, tokens
        updates.append(_update(model, run, samples))
    for key in ("loss/policy", "grad_norm", "moe/load_max_vio", "loss/moe_aux"):
        assert updates[0][key] == pytest.approx(updates[1][key], rel=1e-4), key


def _update(model, cfg, samples, replay: bool = True) -> dict[str, float]:
    cfg.moe.router_replay = replay
    cfg.trainer.lr = 1e-2
    samples = [copy.copy(s) for s in samples]
    for i, s in enumerate(samples):
        s.advantage = float(i % 3 - 1)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, 1)
    return policy_update(model, optimizer, scheduler, samples, 0, CPU, contextlib.nullcontext,
                         algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                         moe_cfg=cfg.moe)


def test_the_router_still_learns_under_replay_and_the_update_replays():
    policy, cfg, samples = _rollout("mixtral")
    _perturb_routers(policy)
    cfg.moe.router.aux_loss_coef = cfg.moe.router.z_loss_coef = 0.0  # only the policy loss moves the router
    gate = lambda m: m.model.layers[0].mlp.gate.weight  # noqa: E731
    replayed = copy.deepcopy(policy)
    on = _update(replayed, copy.deepcopy(cfg), samples)
    assert on["grad_norm"] > 0 and not torch.equal(gate(replayed), gate(policy))
    free = copy.deepcopy(policy)
    off = _update(free, copy.deepcopy(cfg), samples, replay=False)
    assert on["loss/policy"] != pytest.approx(off["loss/policy"], rel=1e-6)  # other experts computed the tokens
    # The load metrics count the experts the update used: the engine's under replay.
    assert on["moe/load_max_vio"] != pytest.approx(off["moe/load_max_vio"], rel=1e-6)


def test_replay_reaches_the_moe_blocks_under_lora():
    from posttrain.config.schema import LoRAConfig
    from posttrain.models.lora import apply_lora

    policy, cfg, samples = _rollout("qwen3_moe")
    _perturb_routers(policy)
    expected, _ = _recompute(policy, cfg, samples, replay=True)
    peft = apply_lora(copy.deepcopy(policy), LoRAConfig(r=4, alpha=8, target_modules=["all-linear"]))
    replayed, metrics = _recompute(peft, cfg, samples, replay=True)
    for a, b in zip(expected, replayed):  # fresh adapters (B = 0): the replayed base model's logprobs
        assert a == pytest.approx(b, abs=1e-5)
    assert metrics["moe/route_agreement"] < 0.95
    _update(peft, copy.deepcopy(cfg), samples)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_grouped_experts_apply_lora_on_the_router_and_the_experts(family):
    """peft's all-linear LoRA wraps the routers' and the experts' parameters (``ParamWrapper``): the
    swapped blocks call through the wrappers, so trained adapters count as in transformers' blocks."""
    from posttrain.config.schema import LoRAConfig
    from posttrain.models.lora import adapters_disabled, apply_lora

    cfg = _config(family)
    peft = apply_lora(build_random_moe_model(cfg.moe, make_tokenizer(), "sdpa"),
                      LoRAConfig(r=4, alpha=8, target_modules=["all-linear"]))
    wrapped = [name for name, m in peft.named_modules() if type(m).__name__ == "ParamWrapper"]
    assert any(name.endswith("mlp.gate") for name in wrapped) and any(name.endswith("mlp.experts") for name in wrapped)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    tokens = torch.randint(4, 90, (2, 9), generator=g)
    theirs = peft(tokens).logits
    with adapters_disabled(peft):
        base = peft(tokens).logits
    moe = use_grouped_experts(peft)
    assert moe.num_layers == 2
    ours = peft(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with adapters_disabled(peft):
        torch.testing.assert_close(peft(tokens).logits, base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapters do change the logits
    ours.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in peft.named_parameters()
               if "lora_A" in name and ("mlp.gate" in name or "mlp.experts" in name))
    moe.restore()
    torch.testing.assert_close(peft(tokens).logits, theirs, atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_recomputes_the_replayed_routes():
    policy, cfg, samples = _rollout("qwen3_moe")
    _perturb_routers(policy)
    plain = _update(copy.deepcopy(policy), copy.deepcopy(cfg), samples)
    checkpointed = copy.deepcopy(policy)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    again = _update(checkpointed, copy.deepcopy(cfg), samples)
    for key in ("loss/policy", "grad_norm", "moe/load_max_vio"):
        assert again[key] == pytest.approx(plain[key], rel=1e-5), key
    free = _update(copy.deepcopy(checkpointed), copy.deepcopy(cfg), samples, replay=False)
    assert free["grad_norm"] != pytest.approx(plain["grad_norm"], rel=1e-5)
