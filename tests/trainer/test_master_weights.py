"""trainer.master_weights: bf16 parameters with float32 masters in AdamW learn like float32 parameters
(where pure bf16 parameters do not), resume exactly, skip non-finite steps, train only LoRA adapters,
and are refused where they do not work (FSDP, float32 parameters)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from distributed.ranks import make_config, make_samples
from helpers import make_tiny_llama, make_tokenizer, save_tiny_model
from posttrain.config.loader import load_config
from posttrain.config.schema import GRPOConfig, LoRAConfig, TrainerConfig
from posttrain.errors import ConfigError
from posttrain.models.lora import apply_lora
from posttrain.trainer.master_weights import MASTERS_KEY, MasterWeightAdamW
from posttrain.trainer.memory import prepare_for_training
from posttrain.trainer.optim import build_optimizer, build_scheduler, clip_and_step
from posttrain.trainer.policy import policy_update

TOKENIZER = make_tokenizer()
_g = torch.Generator().manual_seed(0)
BATCHES = [torch.randint(4, 90, (2, 24), generator=_g) for _ in range(2)]  # two micro-batches per step


def _model() -> torch.nn.Module:
    """The tiny Llama with bf16-representable float32 weights: every mode starts from the same point."""
    model = make_tiny_llama(TOKENIZER)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def _trainer_cfg(mode: str, lr: float = 1e-5) -> TrainerConfig:
    cfg = TrainerConfig()
    cfg.lr = lr
    cfg.param_dtype = "float32" if mode == "float32" else "bfloat16"
    cfg.master_weights = mode == "master"
    return cfg


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for tokens in BATCHES:
            (_loss(model, tokens) / len(BATCHES)).backward()
        clip_and_step(optimizer, model.parameters(), 1.0)


def _run(mode: str, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    cfg = _trainer_cfg(mode)
    model = prepare_for_training(_model(), cfg, torch.device("cpu"), torch.float32)
    optimizer = build_optimizer(model, cfg)
    _train(model, optimizer, steps)
    return model, optimizer


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def test_master_weights_track_float32_where_pure_bf16_parameters_stall():
    # At lr 1e-5 an AdamW step (about lr) is below half the bf16 spacing of most weights (|w|/512):
    # pure bf16 parameters keep most of them where they were.
    steps = 20
    start = _flat(_model().parameters())
    fp32_model, _ = _run("float32", steps)
    bf16_model, _ = _run("bfloat16", steps)
    mw_model, mw_opt = _run("master", steps)
    assert {p.dtype for p in mw_model.parameters()} == {torch.bfloat16}
    assert {s["exp_avg"].dtype for s in mw_opt.state.values()} == {torch.float32}
    fp32_delta = _flat(fp32_model.parameters()) - start

    def error(delta: torch.Tensor) -> float:  # distance from the float32 trajectory, relative to its length
        return float((delta - fp32_delta).norm() / fp32_delta.norm())

    assert error(_flat(mw_opt.master_params()) - start) < 0.1  # measured 0.04 (bf16 forward/backward)
    assert error(_flat(mw_model.parameters()) - start) < 0.35  # the masters rounded to bf16: measured 0.19
    assert error(_flat(bf16_model.parameters()) - start) > 0.8  # measured 0.93: most weights never moved
    assert float((_flat(bf16_model.parameters()) != start).float().mean()) < 0.3  # measured 0.15
    assert float((_flat(mw_model.parameters()) != start).float().mean()) > 0.9  # measured 0.99

    with torch.no_grad():
        tokens = torch.cat(BATCHES)
        drop = {name: float(_loss(_model(), tokens) - _loss(m.float(), tokens))
                for name, m in (("float32", fp32_model), ("bfloat16", bf16_model), ("master", mw_model))}
    assert drop["float32"] > 0
    assert drop["master"] == pytest.approx(drop["float32"], rel=0.25)  # measured 0.0110 vs 0.0102
    assert drop["bfloat16"] < 0.4 * drop["float32"]  # measured 0.0018


def test_master_weights_resume_exactly_from_a_saved_optimizer_state(tmp_path):
    model, optimizer = _run("master", 2)
    torch.save(model.state_dict(), tmp_path / "model.pt")  # bf16: the checkpoint's model files
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    _train(model, optimizer, 2)

    def resumed(drop_masters: bool) -> tuple[torch.nn.Module, MasterWeightAdamW]:
        cfg = _trainer_cfg("master")
        again = prepare_for_training(_model(), cfg, torch.device("cpu"), torch.float32)
        again.load_state_dict(torch.load(tmp_path / "model.pt"))
        opt = build_optimizer(again, cfg)
        state = torch.load(tmp_path / "optimizer.pt")
        if drop_masters:
            del state[MASTERS_KEY]
        opt.load_state_dict(state)
        _train(again, opt, 2)
        return again, opt

    again, opt = resumed(drop_masters=False)
    assert torch.equal(_flat(again.parameters()), _flat(model.parameters()))
    assert torch.equal(_flat(opt.master_params()), _flat(optimizer.master_params()))
    # The masters are what makes it exact: masters rebuilt from the bf16 weights lose their low bits.
    again, opt = resumed(drop_masters=True)
    assert not torch.equal(_flat(opt.master_params()), _flat(optimizer.master_params()))


def test_master_weights_load_a_float32_run_state_and_check_shapes():
    fp32_model, fp32_opt = _run("float32", 1)
    cfg = _trainer_cfg("master")
    model = prepare_for_training(_model(), cfg, torch.device("cpu"), torch.float32)
    model.load_state_dict(fp32_model.state_dict())  # rounded to bf16
    optimizer = build_optimizer(model, cfg)
    optimizer.load_state_dict(fp32_opt.state_dict())  # no masters: made from the loaded weights
    assert torch.equal(_flat(optimizer.master_params()), _flat(model.parameters()))
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {torch.float32}
    state = optimizer.state_dict()
    state[MASTERS_KEY] = state[MASTERS_KEY][:-1]
    with pytest.raises(ValueError, match="do not match"):
        build_optimizer(model, cfg).load_state_dict(state)


@pytest.mark.parametrize("fused", [False, True])  # fused: the found_inf path CUDA takes (CPU has the kernel too)
def test_a_non_finite_gradient_skips_the_step_and_is_not_carried_over(fused):
    cfg = _trainer_cfg("master", lr=1e-2)
    model = prepare_for_training(_model(), cfg, torch.device("cpu"), torch.float32)
    optimizer = MasterWeightAdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, fused=fused)
    _train(model, optimizer, 1)
    before = _flat(optimizer.master_params()), _flat(model.parameters())
    moments = _flat(s["exp_avg"] for s in optimizer.state.values())
    optimizer.zero_grad()
    _loss(model, BATCHES[0]).backward()
    optimizer.master_params()[0].grad[0] = float("nan")
    norm = clip_and_step(optimizer, model.parameters(), 1.0)
    assert not torch.isfinite(norm)
    assert torch.equal(_flat(optimizer.master_params()), before[0])
    assert torch.equal(_flat(model.parameters()), before[1])
    assert torch.equal(_flat(s["exp_avg"] for s in optimizer.state.values()), moments)
    optimizer.zero_grad()
    _train(model, optimizer, 1)  # the next step is finite and moves the weights
    assert not torch.equal(_flat(optimizer.master_params()), before[0])
    assert torch.isfinite(_flat(model.parameters())).all()


def test_lora_trains_only_the_adapters_through_float32_masters():
    cfg = _trainer_cfg("master", lr=1e-3)
    model = apply_lora(_model(), LoRAConfig(r=4, alpha=8.0, target_modules=["all-linear"]))
    model = prepare_for_training(model, cfg, torch.device("cpu"), torch.float32)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = build_optimizer(model, cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert isinstance(optimizer, MasterWeightAdamW) and len(optimizer.master_params()) == len(trained)
    assert sum(m.numel() for m in optimizer.master_params()) < sum(p.numel() for p in frozen.values())
    _train(model, optimizer, 2)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.dtype == torch.bfloat16 and p.abs().sum() > 0 for p in lora_b)  # B starts at 0


def test_policy_update_with_master_weights_matches_float32():
    def step(master: bool) -> dict:
        cfg = make_config()
        cfg.trainer.lr, cfg.trainer.adam_eps = 1e-5, 1e-8
        if master:
            cfg.trainer.param_dtype, cfg.trainer.master_weights = "bfloat16", True
        model = prepare_for_training(_model(), cfg.trainer, torch.device("cpu"), torch.float32)
        optimizer = build_optimizer(model, cfg.trainer)
        scheduler = build_scheduler(optimizer, cfg.trainer, 1)
        return policy_update(model, optimizer, scheduler, make_samples(1),
                             0, torch.device("cpu"), contextlib.nullcontext,
                             algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                             moe_cfg=cfg.moe)

    fp32, master = step(False), step(True)
    assert master["loss/policy"] == pytest.approx(fp32["loss/policy"], abs=2e-2)
    assert master["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=0.05)


def test_master_weights_config_checks(monkeypatch):
    with pytest.raises(ConfigError, match="trainer.param_dtype=bfloat16"):
        load_config(GRPOConfig, overrides=["trainer.master_weights=true"])
    load_config(GRPOConfig, overrides=["trainer.master_weights=true", "trainer.param_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="not supported with FSDP"):
        load_config(GRPOConfig, overrides=["trainer.master_weights=true", "trainer.param_dtype=bfloat16",
                                           "trainer.num_processes=2", "rollout.batch_size=64",
                                           "trainer.mini_batch_size=64"])
    monkeypatch.setattr("posttrain.trainer.memory.is_distributed", lambda: True)
    with pytest.raises(ConfigError, match="not supported with FSDP"):
        prepare_for_training(_model(), _trainer_cfg("master"), torch.device("cpu"), torch.float32)


def test_dry_run_counts_the_float32_masters(tmp_path, monkeypatch, capsys):
    from trainer.test_dry_run import RL_ARGS, run_dry

    model_dir = save_tiny_model(tmp_path / "model")
    args = ["grpo", f"model.path={model_dir}", *RL_ARGS, "trainer.param_dtype=bfloat16"]
    pure = run_dry(args, tmp_path, monkeypatch, capsys).split("memory (estimate")[1]
    master = run_dry([*args, "trainer.master_weights=true"], tmp_path, monkeypatch, capsys).split("memory (estimate")[1]
    assert "parameters and AdamW states in bfloat16" in pure and "float32 masters" not in pure
    assert "parameters in bfloat16, float32 masters, gradients and AdamW states" in master
    assert "\n  float32 masters" in master


@pytest.mark.timeout(600)
def test_grpo_run_with_master_weights_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from posttrain.cli import main
    from trainer.test_grpo_e2e import read_metrics, tiny_run_args

    model_dir = save_tiny_model(tmp_path / "model")
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    options = ("trainer.param_dtype=bfloat16", "trainer.master_weights=true", "trainer.lr=1e-5", "moe.router.dtype=auto")
    assert main(tiny_run_args(model_dir, interrupted, 2, *options)) == 0
    assert main(tiny_run_args(model_dir, interrupted, 3, "--resume", *options)) == 0
    assert main(tiny_run_args(model_dir, straight, 3, *options)) == 0
    resumed, uninterrupted = read_metrics(interrupted), read_metrics(straight)
    for key in ("loss/policy", "grad_norm", "reward/mean"):
        assert resumed[3][key] == pytest.approx(uninterrupted[3][key], rel=1e-6, abs=1e-9), key
    final = [load_file(run / "checkpoints" / "step_000003" / "model.safetensors") for run in (interrupted, straight)]
    assert {t.dtype for t in final[0].values()} == {torch.bfloat16}
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])
    optimizers = [torch.load(run / "checkpoints" / "step_000003" / "optimizer.pt") for run in (interrupted, straight)]
    assert all(torch.equal(a, b) for a, b in zip(optimizers[0][MASTERS_KEY], optimizers[1][MASTERS_KEY]))
    start = load_file(str(model_dir) + "/model.safetensors")
    assert any(not torch.equal(final[1][k], start[k].to(torch.bfloat16)) for k in start)  # it trained


def test_a_second_optimizer_over_the_same_model_gets_the_gradients():
    cfg = _trainer_cfg("master", lr=1e-3)
    model = prepare_for_training(_model(), cfg, torch.device("cpu"), torch.float32)
    first = build_optimizer(model, cfg)
    second = build_optimizer(model, cfg)  # e.g. rebuilt after a failed start: the first one's hooks must go
    before = _flat(second.master_params())
    _train(model, second, 1)
    assert not torch.equal(_flat(second.master_params()), before)
    assert all(m.grad is None for m in first.master_params())
