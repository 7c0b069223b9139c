"""Expert parallelism in training (``moe.ep_mode``) on 2 gloo ranks (CPU), through the trainer's
own path (``prepare_moe_policy``, ``prepare_for_training``, ``policy_update``): a tiny random
Mixtral's policy update (two optimizer steps, with and without activation checkpointing) equals
the one-process update; each rank holds half of every layer's experts; the sharded checkpoint
converts to a plain Hugging Face folder holding the same model; ranks generate different lengths
(and rank 0 alone) without collectives; router replay of given routes gives the one-process update
too. On 4 ranks as 2 nodes of 2 (``hybrid``: the experts also
FSDP-sharded over the ranks holding them) the update equals one process's too. Also the config
checks of ``moe.ep_mode``.

Tolerance (float32): weights within atol 2e-6 / rtol 1e-5 of the one-process update, metrics
within rel 1e-4, as the FSDP tests: EP only reorders additions (the all-to-all moves rows, the
experts sum the same products)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_tiny_llama, make_tokenizer
from transformers import AutoModelForCausalLM

from distributed.ranks import make_config, make_samples, run_on_ranks, update
from posttrain.checkpoint.sharded import ShardedCheckpointManager, full_model_state_dict
from posttrain.cli import main
from posttrain.config.schema import GRPOConfig
from posttrain.distributed import gathered_for_generation
from posttrain.distributed.fsdp import expert_parallel_modules
from posttrain.distributed.layout import ParallelLayout
from posttrain.errors import ConfigError
from posttrain.models.moe import (
    MoEShape,
    build_random_moe_model,
    check_moe_model,
    moe_checklist,
    moe_config_problems,
    prepare_moe_policy,
)
from posttrain.trainer.memory import prepare_for_training
from posttrain.trainer.optim import build_optimizer, build_scheduler

NUM_EXPERTS = 4
TOLERANCE = {"atol": 2e-6, "rtol": 1e-5}
PROMPT = [[5, 6, 7]]


def moe_config(ep_mode: str = "single", gradient_checkpointing: bool = False) -> GRPOConfig:
    cfg = make_config()
    cfg.moe.ep_mode = ep_mode
    cfg.moe.router.num_experts, cfg.moe.router.top_k = NUM_EXPERTS, 2
    init = cfg.moe.random_init
    init.family, init.hidden_size, init.intermediate_size, init.num_layers = "mixtral", 32, 16, 2
    cfg.model.gradient_checkpointing = gradient_checkpointing
    return cfg


def build_moe(cfg: GRPOConfig):
    """The tiny random Mixtral prepared as build_policy does (EP on several ranks), optimizer, scheduler."""
    tokenizer = make_tokenizer()
    model = build_random_moe_model(cfg.moe, tokenizer, "eager")
    if cfg.model.gradient_checkpointing:  # as posttrain.models.loading does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prepare_moe_policy(model, cfg)
    model = prepare_for_training(model, cfg.trainer, torch.device("cpu"), torch.float32, moe=cfg.moe)
    optimizer = build_optimizer(model, cfg.trainer)
    return model, tokenizer, optimizer, build_scheduler(optimizer, cfg.trainer, 4)


# variant -> (activation checkpointing, router replay of given routes)
VARIANTS = {"plain": (False, False), "activation-checkpointing": (True, False), "router-replay": (False, True)}


def samples_for(variant: str) -> list:
    """make_samples(1), with random engine routes (2 distinct experts per token) for router replay."""
    samples = make_samples(1)
    if VARIANTS[variant][1]:
        g = torch.Generator().manual_seed(7)
        for s in samples:
            first = torch.randint(0, NUM_EXPERTS, (2, s.num_tokens - 1), generator=g)
            second = (first + torch.randint(1, NUM_EXPERTS, first.shape, generator=g)) % NUM_EXPERTS
            s.routed_experts = torch.stack([first, second], -1).to(torch.int16)
    return samples


def ep_rank_job(rank: int, world_size: int, workdir: str) -> None:
    results = {}
    for variant, (checkpointing, _) in VARIANTS.items():
        cfg = moe_config("ipc", checkpointing)
        model, tokenizer, optimizer, scheduler = build_moe(cfg)
        experts = expert_parallel_modules(model)
        local = [m.gate_up_proj.to_local().shape[0] for m in experts]
        if variant == "plain":
            model.eval()
            with gathered_for_generation(model), torch.no_grad():  # different lengths: no collective inside
                n = 2 + 5 * rank
                tokens = model.generate(torch.tensor(PROMPT), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            with gathered_for_generation(model), torch.no_grad():
                if rank == 0:  # validation: rank 0 alone
                    model.generate(torch.tensor(PROMPT), max_new_tokens=3, do_sample=False)
            model.train()
        metrics = update(model, optimizer, scheduler, cfg, samples_for(variant))
        state = full_model_state_dict(model)
        if variant == "plain":
            ShardedCheckpointManager(f"{workdir}/run", keep_last=1).save(1, model, tokenizer, {"seed": 0}, optimizer,
                                                                        scheduler)
        results[variant] = {"metrics": metrics, "state": state, "layers": len(experts), "local": local}
    torch.save({**results, "tokens": tokens}, f"{workdir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ep")
    run_on_ranks(ep_rank_job, str(workdir), timeout_s=150)
    return workdir, [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def one_process_update(variant: str) -> tuple[dict, dict]:
    cfg = moe_config("single", VARIANTS[variant][0])
    model, _, optimizer, scheduler = build_moe(cfg)
    metrics = update(model, optimizer, scheduler, cfg, samples_for(variant))
    return metrics, {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ep_update_equals_the_one_process_update(ep_run, variant):
    _, ranks = ep_run
    metrics, state = one_process_update(variant)
    for rank, result in enumerate(ranks):
        mine = result[variant]
        assert mine["layers"] == 2 and mine["local"] == [NUM_EXPERTS // 2] * 2  # half of each layer's experts
        if rank == 0:  # the full state dict comes to rank 0
            assert set(mine["state"]) == set(state)
            for name, tensor in state.items():
                torch.testing.assert_close(mine["state"][name], tensor, **TOLERANCE, msg=name)
        for key in ("loss/policy", "grad_norm", "kl", "loss/moe_aux", "moe/load_max_vio"):
            assert mine["metrics"][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-7), key
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(state[name], one_process_start(moe_config())[name])  # the experts trained
    if variant == "router-replay":  # the replayed routes changed the update
        assert not torch.allclose(ranks[0][variant]["state"][name], ranks[0]["plain"]["state"][name], atol=1e-6)


def one_process_start(cfg: GRPOConfig) -> dict:
    return build_random_moe_model(cfg.moe, make_tokenizer(), "eager").state_dict()


def test_ep_checkpoint_converts_to_the_plain_hf_model(ep_run, tmp_path):
    workdir, ranks = ep_run
    output = tmp_path / "hf"
    assert main(["convert", str(workdir / "run"), str(output)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(output)
    assert type(loaded).__name__ == "MixtralForCausalLM"
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == NUM_EXPERTS  # the single-device layout
    state = loaded.state_dict()
    for name, tensor in ranks[0]["plain"]["state"].items():
        torch.testing.assert_close(state[name], tensor, atol=0, rtol=0, msg=name)
    assert loaded(torch.tensor(PROMPT)).logits.isfinite().all()


def test_ep_ranks_generate_different_lengths_like_one_process(ep_run):
    _, ranks = ep_run
    model = build_random_moe_model(moe_config().moe, make_tokenizer(), "eager").eval()
    for rank, result in enumerate(ranks):
        n = 2 + 5 * rank
        expected = model.generate(torch.tensor(PROMPT), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert torch.equal(result["tokens"], expected)


def hybrid_rank_job(rank: int, world_size: int, workdir: str) -> None:
    """4 ranks as 2 "nodes" of 2: EP groups of 2, each expert's weights also FSDP-sharded over the
    2 ranks holding them (expert_dp); rank 0 generates alone; one policy update."""
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    cfg = moe_config("hybrid")
    model, _, optimizer, scheduler = build_moe(cfg)
    local = [tuple(m.gate_up_proj.to_local().shape) for m in expert_parallel_modules(model)]
    model.eval()
    with gathered_for_generation(model), torch.no_grad():
        tokens = model.generate(torch.tensor(PROMPT), max_new_tokens=4, min_new_tokens=4, do_sample=False) \
            if rank == 0 else None
    model.train()
    metrics = update(model, optimizer, scheduler, cfg, make_samples(1))
    state = full_model_state_dict(model)
    if rank == 0:
        torch.save({"metrics": metrics, "state": state, "local": local, "tokens": tokens}, f"{workdir}/hybrid.pt")


def test_hybrid_ep_with_sharded_experts_on_4_ranks_equals_one_process(tmp_path):
    run_on_ranks(hybrid_rank_job, str(tmp_path), world_size=4, timeout_s=150)
    result = torch.load(tmp_path / "hybrid.pt", weights_only=False)
    # 4 experts over EP groups of 2: 2 per rank, and those 2 split again over the expert-DP pair.
    assert result["local"] == [(1, 32, 32)] * 2
    metrics, state = one_process_update("plain")
    for name, tensor in state.items():
        torch.testing.assert_close(result["state"][name], tensor, **TOLERANCE, msg=name)
    for key in ("loss/policy", "grad_norm", "kl"):
        assert result["metrics"][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-7), key
    model = build_random_moe_model(moe_config().moe, make_tokenizer(), "eager").eval()
    expected = model.generate(torch.tensor(PROMPT), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(result["tokens"], expected)


def test_ep_mode_config_checks(monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cfg = moe_config("ipc")
    cfg.trainer.num_processes = 1
    assert any("one; set trainer.num_processes" in p for p in moe_config_problems(cfg))
    cfg.trainer.num_processes = 3  # 4 experts do not split over 3 processes
    assert any("4 experts do not split evenly over ep=3" in p and "moe.ep_mode=single" in p
               for p in moe_config_problems(cfg))
    cfg.trainer.num_processes = 2
    assert moe_config_problems(cfg) == []
    cfg.trainer.fsdp_cpu_offload = True
    assert any("fsdp_cpu_offload" in p for p in moe_config_problems(cfg))
    for mode in ("single", "auto"):
        cfg = moe_config(mode)
        cfg.trainer.num_processes = 1
        assert moe_config_problems(cfg) == []
    # The start-up checklist shows the EP size the run uses.
    text = moe_checklist(MoEShape(2, NUM_EXPERTS, 2), moe_config("ipc"), ParallelLayout.from_world_size(2), "Mixtral")
    assert "experts: ep 2 x expert-dp 1" in text and "moe.ep_mode=ipc (2 experts per process" in text
    # A dense policy with ep_mode=ipc names the option.
    cfg = make_config()
    cfg.moe.ep_mode = "ipc"
    with pytest.raises(ConfigError, match="moe.ep_mode set, but the policy"):
        check_moe_model(make_tiny_llama(make_tokenizer()), cfg)
