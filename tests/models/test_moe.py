"""MoE policies: router metrics and losses against hand-computed values, router discovery and
recording on tiny random Mixtral and Qwen3-MoE models, the router dtype, the config and hardware
checks, and the router losses and metrics inside the policy update."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from helpers import make_tiny_llama, make_tokenizer, save_tiny_model
from posttrain.algorithms.objective import Objective
from posttrain.config.schema import GRPOConfig
from posttrain.errors import ConfigError, PosttrainError
from posttrain.models.logprobs import make_packed_token_batch, make_token_batch, response_logprobs
from posttrain.models.moe import (
    RouterRecorder, RouterStats, apply_router_dtype, build_random_moe_model, check_expert_dtype, check_moe_model,
    dropped_assignments, expert_load, find_routers, load_balancing_loss, load_max_vio, moe_config_problems,
    moe_shape, prepare_moe_policy, route_agreement, router_token_index, router_z_loss, routing_confidence, routing_entropy,
)
from posttrain.trainer.optim import build_optimizer, build_scheduler
from posttrain.trainer.policy import policy_update
from posttrain.trainer.samples import Sample

FAMILIES = ["mixtral", "qwen3_moe"]


def tiny_moe(family: str = "mixtral", seed: int = 0, num_layers: int = 2, experts: int = 4, top_k: int = 2):
    cfg = GRPOConfig()
    cfg.moe.random_init.family = family
    cfg.moe.random_init.hidden_size = 32
    cfg.moe.random_init.intermediate_size = 32
    cfg.moe.random_init.num_layers = num_layers
    cfg.moe.random_init.seed = seed
    cfg.moe.router.num_experts, cfg.moe.router.top_k = experts, top_k
    return build_random_moe_model(cfg.moe, make_tokenizer(), "sdpa"), cfg


# ---------------------------------------------------------------- pure functions, by hand


def test_expert_load_counts_each_chosen_expert_of_unmasked_tokens():
    selected = torch.tensor([[0, 1], [0, 2], [3, 1]])
    load = expert_load(selected, torch.tensor([1.0, 1.0, 0.0]), num_experts=4)
    assert load.tolist() == [2.0, 1.0, 1.0, 0.0]
    assert float(load_max_vio(load)) == pytest.approx(1.0)  # max 2 / mean 1 - 1
    assert float(load_max_vio(torch.tensor([3.0, 3.0, 3.0]))) == pytest.approx(0.0)


def test_load_balancing_loss_by_hand():
    # Two counted tokens, both sent to expert 0; probabilities [0.75, 0.25] and [0.5, 0.5].
    # f = [1, 0], P = [0.625, 0.375]: loss = E * sum f * P = 2 * 0.625. The masked third token
    # (all its probability on expert 1) changes nothing.
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 9.0]])
    selected = torch.tensor([[0], [0], [1]])
    weights = torch.tensor([1.0, 1.0, 0.0])
    assert float(load_balancing_loss(logits, selected, weights)) == pytest.approx(1.25)
    # Uniform routing gives 1 for any top-k.
    uniform = load_balancing_loss(torch.zeros(2, 4), torch.tensor([[0, 1], [2, 3]]), torch.ones(2))
    assert float(uniform) == pytest.approx(1.0)


def test_load_balancing_loss_is_transformers_one_divided_by_top_k():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(37, 8, generator=torch.Generator().manual_seed(0))
    selected = torch.softmax(logits, -1).topk(2, dim=-1).indices
    ours = load_balancing_loss(logits, selected, torch.ones(37))
    theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert float(ours) == pytest.approx(float(theirs) / 2, rel=1e-5)


def test_load_balancing_loss_gradient_flows_through_the_probabilities_only():
    logits = torch.tensor([[1.0, 0.0], [0.5, 0.0]], requires_grad=True)
    load_balancing_loss(logits, torch.tensor([[0], [0]]), torch.ones(2)).backward()
    # d/dlogits of E * sum_i f_i P_i with f = [1, 0]: E / N * p_0 * (1 - p_0) on logit 0, the negative on logit 1.
    p0 = torch.sigmoid(torch.tensor([1.0, 0.5]))
    expected = 2 / 2 * p0 * (1 - p0)
    torch.testing.assert_close(logits.grad[:, 0], expected)
    torch.testing.assert_close(logits.grad[:, 1], -expected)


def test_z_loss_entropy_and_confidence_by_hand():
    zeros = torch.zeros(2, 4)
    masked = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]])
    assert float(router_z_loss(masked, torch.tensor([1.0, 0.0]))) == pytest.approx(math.log(4) ** 2)
    assert float(routing_entropy(zeros, torch.ones(2))) == pytest.approx(math.log(4))
    assert float(routing_entropy(masked, torch.ones(2))) == pytest.approx(math.log(4) / 2, abs=1e-6)
    # p = [1/2, 1/6, 1/6, 1/6]: the chosen experts 0 and 1 hold 2/3.
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]])
    assert float(routing_confidence(logits, torch.tensor([[0, 1]]), torch.ones(1))) == pytest.approx(2 / 3)


def test_dropped_assignments_beyond_capacity():
    load = torch.tensor([5.0, 1.0, 1.0, 1.0])  # 8 tokens, top-1, 4 experts: balanced load 2
    assert float(dropped_assignments(load, top_k=1, capacity_factor=1.0)) == 3.0  # capacity 2
    assert float(dropped_assignments(load, top_k=1, capacity_factor=1.25)) == 2.0  # capacity ceil(2.5) = 3
    assert float(dropped_assignments(load, top_k=1, capacity_factor=4.0)) == 0.0


def test_route_agreement_compares_expert_sets():
    a = torch.tensor([[0, 1], [2, 3], [1, 0]])
    b = torch.tensor([[1, 0], [2, 1], [3, 2]])
    assert float(route_agreement(a, b, torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(0.5)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("family", FAMILIES)
def test_routers_are_found_in_layer_order(family):
    model, _ = tiny_moe(family, num_layers=3)
    routers, index = find_routers(model)
    assert len(routers) == 3 and index == 0
    assert routers == [layer.mlp.gate for layer in model.model.layers]
    shape = moe_shape(model)
    assert (shape.num_layers, shape.num_experts, shape.top_k) == (3, 4, 2)
    dense = make_tiny_llama(make_tokenizer())
    assert find_routers(dense) == ([], 0) and moe_shape(dense) is None


def test_random_init_is_seeded_and_sized_from_config():
    a, _ = tiny_moe(seed=3)
    b, _ = tiny_moe(seed=3)
    c, _ = tiny_moe(seed=4)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    d, _ = tiny_moe(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's RNG is left alone
    for (name, x), y, z in zip(a.named_parameters(), b.parameters(), d.parameters()):
        assert torch.equal(x, y) and torch.equal(x, z), name
    assert not torch.equal(a.model.layers[0].mlp.gate.weight, c.model.layers[0].mlp.gate.weight)
    assert a.config.num_local_experts == 4 and a.config.hidden_size == 32
    assert a.config.vocab_size == len(make_tokenizer())


@pytest.mark.parametrize("family", FAMILIES)
def test_recorder_matches_transformers_router_logits_and_records_only_inside(family):
    model, cfg = tiny_moe(family)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    model(input_ids=ids, output_router_logits=True)  # transformers installs its own capture hooks
    hooks = lambda: sum(len(r._forward_hooks) for r in find_routers(model)[0])  # noqa: E731
    before = hooks()
    recorder = RouterRecorder(model, moe_shape(model))
    assert hooks() == before + 2
    with recorder.recording() as routes:
        out = model(input_ids=ids, output_router_logits=True)
    assert len(routes) == 2
    for ours, theirs in zip(routes, out.router_logits):
        torch.testing.assert_close(ours.logits, theirs)
        assert ours.selected.shape == (10, 2)
        # The model's own decision: the top-2 of its routing probabilities.
        assert torch.equal(ours.selected.sort(-1).values, theirs.topk(2, -1).indices.sort(-1).values)
    out.logits.sum().backward()  # recomputes the checkpointed layers: nothing more is recorded
    model(input_ids=ids)
    assert len(routes) == 2
    recorder.remove()
    assert hooks() == before


def test_router_tokens_are_the_positions_that_predict_response_tokens():
    padded = make_token_batch([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], pad_token_id=0)
    index, weights = router_token_index(padded, padded.response_mask)
    # Row width 5: sample 0 predicts its responses from positions 2, 3; sample 1 from 1, 2, 3.
    assert index.tolist() == [2, 3, 6, 7, 8] and weights.tolist() == [1.0] * 5


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_and_packed_batches_give_the_same_router_loss_and_metrics(family):
    model, cfg = tiny_moe(family)
    cfg.moe.router.capacity_factor = 1.0
    shape = moe_shape(model)
    recorder = RouterRecorder(model, shape)
    prompts, responses = [[5, 6, 7], [8, 9], [20, 21, 22, 23]], [[10, 11], [12, 13, 14], [15]]
    results = []
    for batch in (make_token_batch(prompts, responses, 0), make_packed_token_batch(prompts, responses, 0)):
        for chunk_size in (0, 64):  # the model's own head, and the backbone + chunked head
            stats = RouterStats(shape, cfg.moe.router, torch.device("cpu"))
            with recorder.recording() as routes:
                response_logprobs(model, batch, chunk_size=chunk_size)
            mask = batch.response_mask.clone()
            mask[2] = 0  # an untrainable sample: its token counts nowhere
            aux, z = stats.add(routes, *router_token_index(batch, mask))
            loss = Objective.from_config(cfg.algorithm, router=cfg.moe.router).router_loss(aux, z)
            results.append((float(loss.detach()), stats.metrics()))
    for loss, metrics in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for key, value in results[0][1].items():
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert sum(results[0][1][f"moe/load_max_vio/layer_{i}"] >= 0 for i in range(2)) == 2
    assert "moe/dropped_fraction/layer_1" in results[0][1]


def test_float32_router_dtype_under_bf16_autocast_and_deepcopy():
    model, _ = tiny_moe()
    shape = moe_shape(model)
    ids = torch.tensor([[5, 6, 7, 8]])

    def router_dtype(m):
        recorder = RouterRecorder(m, shape)
        with torch.autocast("cpu", dtype=torch.bfloat16), recorder.recording() as routes:
            m(input_ids=ids)
        recorder.remove()
        return routes[0].logits.dtype

    assert router_dtype(model) == torch.bfloat16
    assert apply_router_dtype(model, "auto") == 0
    assert apply_router_dtype(model, "float32") == 2
    assert router_dtype(model) == torch.float32
    reference = copy.deepcopy(model)  # the KL reference: its routers are bound to themselves
    gate = reference.model.layers[0].mlp.gate
    assert gate.forward.__self__ is gate
    assert router_dtype(reference) == torch.float32


# ---------------------------------------------------------------- checks


def test_expert_dtype_needs_the_gpu_capability():
    check_expert_dtype("auto", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"fp8 needs an NVIDIA GPU of compute capability 8.9.*on the CPU.*moe.expert_dtype=auto"):
        check_expert_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"this GPU \(NVIDIA A100\) has compute capability 8.0"):
        check_expert_dtype("fp8", torch.device("cuda"), capability=(8, 0), gpu_name="NVIDIA A100")
    with pytest.raises(ConfigError, match=r"nvfp4 needs .*10.0 or newer \(Blackwell\).*H100\) has compute capability 9.0.*expert_dtype=fp8"):
        check_expert_dtype("nvfp4", torch.device("cuda"), capability=(9, 0), gpu_name="NVIDIA H100")
    # The hardware check passes: nvfp4 experts do not exist yet, and the message says so; fp8 runs.
    with pytest.raises(ConfigError, match=r"B200 \(capability 10.0\) supports it, but posttrain's nvfp4 experts are not implemented"):
        check_expert_dtype("nvfp4", torch.device("cuda"), capability=(10, 0), gpu_name="NVIDIA B200")
    check_expert_dtype("fp8", torch.device("cuda"), capability=(9, 0), gpu_name="NVIDIA H100")  # the engine's fp8 experts


def test_config_problems_name_their_keys():
    cfg = GRPOConfig()
    assert moe_config_problems(cfg) == []
    cfg.moe.router.num_experts, cfg.moe.router.top_k = 4, 5
    cfg.moe.router.aux_loss_coef = -1.0
    cfg.trainer.param_dtype = "bfloat16"
    cfg.moe.random_init.family = "mixtral"
    cfg.moe.random_init.num_attention_heads = 5
    problems = "\n".join(moe_config_problems(cfg))
    assert "moe.router.top_k=5 must be <= moe.router.num_experts=4" in problems
    assert "moe.router.aux_loss_coef=-1.0 must be >= 0" in problems
    assert "trainer.param_dtype=bfloat16" in problems and "moe.router.dtype=auto" in problems
    assert "moe.random_init.num_attention_heads=5 must divide moe.random_init.hidden_size=64" in problems


def test_bf16_parameters_need_no_router_setting_for_a_dense_policy():
    from helpers import make_tiny_llama, make_tokenizer

    cfg = GRPOConfig()
    cfg.trainer.param_dtype = "bfloat16"  # moe.router.dtype stays at its default, float32
    assert moe_config_problems(cfg) == []  # a dense model has no router: nothing to ask for
    assert prepare_moe_policy(make_tiny_llama(make_tokenizer()), cfg) is None


def test_model_checks_against_the_moe_section():
    model, cfg = tiny_moe()
    assert check_moe_model(model, cfg).num_experts == 4
    cfg.moe.router.num_experts = 8
    with pytest.raises(ConfigError, match=r"moe.router.num_experts=8, but the policy \(MixtralForCausalLM\) has 4"):
        check_moe_model(model, cfg)
    dense_cfg = GRPOConfig()
    assert check_moe_model(make_tiny_llama(make_tokenizer()), dense_cfg) is None
    dense_cfg.moe.router.top_k = 2
    with pytest.raises(ConfigError, match="moe.router.top_k set, but the policy .* is not a mixture-of-experts model; "
                                          "remove it or"):
        check_moe_model(make_tiny_llama(make_tokenizer()), dense_cfg)
    dense_cfg.moe.ep_mode = "ipc"
    with pytest.raises(ConfigError, match="moe.router.top_k, moe.ep_mode set, .*; remove them or"):
        check_moe_model(make_tiny_llama(make_tokenizer()), dense_cfg)


def test_posttrain_engine_refuses_an_moe_family_it_lacks_naming_the_backend_to_use():
    """Mixtral, Qwen2/Qwen3-MoE, OLMoE and GraniteMoE run in the engine (tests/engine/test_moe_engine.py);
    another MoE family is refused with the supported types and rollout.backend=hf named."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from posttrain.engine import Engine

    tok = make_tokenizer()
    model = PhimoeForCausalLM(PhimoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))
    with pytest.raises(PosttrainError, match="model type 'phimoe'.*mixtral, qwen2_moe, qwen3_moe.*rollout.backend=hf"):
        Engine(model, tok, max_model_len=64)


# ---------------------------------------------------------------- the policy update


def _samples(advantage: float):
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(8):
        prompt = torch.randint(4, 90, (3 + i % 4,), generator=g).tolist()
        response = torch.randint(4, 90, (2 + (i * 3) % 7,), generator=g).tolist()
        old = (-torch.rand(len(response), generator=g) * 3).tolist()
        samples.append(Sample(prompt, response, old, advantage=advantage * (i % 3 - 1), reward=0.0,
                              trainable=i != 5))
    return samples


def _update(model, cfg, micro_batch_size: int, advantage: float = 1.0):
    cfg.rollout.batch_size = cfg.trainer.mini_batch_size = 8
    cfg.rollout.max_new_tokens = 16
    cfg.trainer.micro_batch_size = micro_batch_size
    cfg.trainer.micro_batch_tokens = 0
    cfg.trainer.lr = 1e-2
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, 1)
    return policy_update(model, optimizer, scheduler, _samples(advantage),
                         0, torch.device("cpu"), contextlib.nullcontext,
                         algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                         moe_cfg=cfg.moe)


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_update_logs_router_metrics_per_layer(family):
    model, cfg = tiny_moe(family)
    cfg.moe.router.capacity_factor = 1.0
    hooks = lambda: sum(len(r._forward_hooks) for r in find_routers(model)[0])  # noqa: E731
    before = hooks()
    metrics = _update(model, cfg, 4)
    for name in ("load_max_vio", "routing_entropy", "routing_confidence", "dropped_fraction"):
        assert f"moe/{name}" in metrics and f"moe/{name}/layer_0" in metrics and f"moe/{name}/layer_1" in metrics
        per_layer = [metrics[f"moe/{name}/layer_{i}"] for i in range(2)]
        assert metrics[f"moe/{name}"] == pytest.approx(sum(per_layer) / 2)
    assert 0 < metrics["moe/routing_entropy"] <= math.log(4) + 1e-6
    assert 0.5 - 1e-6 <= metrics["moe/routing_confidence"] <= 1.0  # top-2 of 4 hold at least half
    assert 0.5 < metrics["loss/moe_aux"] < 2.0  # 1 under uniform routing; a random router is near it
    assert metrics["loss/moe_z"] > 0
    assert hooks() == before  # the update removes its hooks


def test_expert_load_metrics_do_not_depend_on_the_micro_batch_split():
    base, cfg = tiny_moe()
    whole = _update(copy.deepcopy(base), copy.deepcopy(cfg), 8)
    split = _update(copy.deepcopy(base), copy.deepcopy(cfg), 2)
    for key in ("moe/load_max_vio/layer_0", "moe/load_max_vio/layer_1", "moe/routing_entropy", "moe/routing_confidence"):
        assert whole[key] == pytest.approx(split[key], rel=1e-5), key


def test_router_losses_train_the_routers_without_any_advantage():
    base, cfg = tiny_moe()
    gate = lambda m: m.model.layers[0].mlp.gate.weight  # noqa: E731
    cfg.moe.router.aux_loss_coef = cfg.moe.router.z_loss_coef = 0.0
    still = copy.deepcopy(base)
    metrics = _update(still, copy.deepcopy(cfg), 4, advantage=0.0)
    assert metrics["grad_norm"] == 0.0 and torch.equal(gate(still), gate(base))
    cfg.moe.router.aux_loss_coef, cfg.moe.router.z_loss_coef = 0.1, 0.01
    moved = copy.deepcopy(base)
    metrics = _update(moved, cfg, 4, advantage=0.0)
    assert metrics["loss/policy"] == 0.0 and metrics["grad_norm"] > 0
    assert not torch.equal(gate(moved), gate(base))


# ---------------------------------------------------------------- the moe_demo preset, end to end


def _demo_args(tmp_path, *extra):
    # Only the tokenizer of model.path is used (a tiny vocabulary here); the policy is built at random.
    model_dir = save_tiny_model(tmp_path / "model")
    return ["grpo", "--config", "moe_demo", f"model.path={model_dir}", f"trainer.output_dir={tmp_path / 'run'}",
            "logging.progress_bar=false", "validation.at_start=false", *extra]


def _metrics(run_dir):
    import json

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "reward/mean" in m]


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_demo_preset_trains_on_cpu(tmp_path, caplog, family):
    import logging

    from posttrain.cli import main

    steps = 20 if family == "mixtral" else 2  # the preset's 20 steps; the shipped tokenizer: the slow test below
    with caplog.at_level(logging.INFO, logger="posttrain"):
        assert main(_demo_args(tmp_path, f"moe.random_init.family={family}", f"trainer.max_steps={steps}",
                               "validation.every=0", "validation.at_end=false")) == 0
    log = caplog.text
    assert "MoE policy:" in log and "4 MoE layers x 8 experts, top-2" in log
    assert "Parallel layout: 1 ranks" in log and "Router checklist:" in log
    metrics = _metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        for key in ("loss/moe_aux", "loss/moe_z", "moe/load_max_vio", "moe/load_max_vio/layer_3",
                    "moe/routing_entropy/layer_0", "moe/routing_confidence", "moe/dropped_fraction/layer_2"):
            assert math.isfinite(m[key]), key
    # The router losses are the only signal of a random model with zero reward: they must fall.
    assert metrics[-1]["loss/moe_z"] < metrics[0]["loss/moe_z"]
    saved = tmp_path / "run" / "checkpoints" / f"step_{steps:06d}"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(saved).model_type == family


def test_ppo_trains_the_random_init_moe_policy(tmp_path, caplog):
    import logging

    from posttrain.cli import main

    args = _demo_args(tmp_path, "trainer.max_steps=2", "validation.every=0", "validation.at_end=false")
    args[0] = "ppo"
    with caplog.at_level(logging.INFO, logger="posttrain"):
        assert main(args) == 0
    assert "MoE policy:" in caplog.text and "4 MoE layers x 8 experts, top-2" in caplog.text
    metrics = _metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss/moe_z"]) and math.isfinite(m["moe/load_max_vio"]) for m in metrics)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "run" / "checkpoints" / "step_000002").model_type == "mixtral"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_moe_demo_preset_as_shipped_runs_20_steps(tmp_path):
    from posttrain.cli import main

    # The embedded SmolLM2 tokenizer (a GGUF conversion on first use), exactly the preset.
    assert main(["grpo", "--config", "moe_demo", f"trainer.output_dir={tmp_path / 'run'}", "logging.progress_bar=false"]) == 0
    assert len(_metrics(tmp_path / "run")) == 20


def test_fp8_experts_on_cpu_exit_2_before_the_run_folder_is_made(tmp_path, capsys):
    from posttrain.cli import main

    run = tmp_path / "run"
    assert main(["grpo", "--config", "moe_demo", "moe.expert_dtype=fp8", f"trainer.output_dir={run}"]) == 2
    assert "moe.expert_dtype=fp8 needs an NVIDIA GPU of compute capability 8.9" in capsys.readouterr().err
    assert not run.exists()


def test_bf16_parameters_with_a_float32_router_stop_an_moe_policy_when_it_loads():
    model, cfg = tiny_moe()
    cfg.trainer.param_dtype = "bfloat16"
    with pytest.raises(ConfigError, match="moe.router.dtype=float32 needs float32 router weights"):
        prepare_moe_policy(model, cfg)
    cfg.moe.router.dtype = "auto"
    assert prepare_moe_policy(model, cfg) is not None


def test_moe_demo_replays_the_engines_routes_in_the_trainer(tmp_path, monkeypatch):
    # The engine records every token's experts (Completion.routed_experts); the GRPO recipe hands
    # them to its samples and the old-logprob and training forwards replay them (moe.router_replay).
    from posttrain.cli import main
    from posttrain.models.moe import hf_blocks

    replayed: list[int] = []
    original = hf_blocks.GroupedMoE.replaying

    def counting(self, topk_ids):
        replayed.append(len(topk_ids))
        return original(self, topk_ids)

    monkeypatch.setattr(hf_blocks.GroupedMoE, "replaying", counting)
    assert main(_demo_args(tmp_path, "trainer.max_steps=2", "validation.every=0", "validation.at_end=false",
                           "algorithm.off_policy_correction=tis_token")) == 0  # tis_token: old logprobs recomputed
    assert replayed and set(replayed) == {4}  # every replayed forward covers the 4 MoE layers
    for m in _metrics(tmp_path / "run"):
        assert 0.5 < m["moe/route_agreement"] <= 1.0  # the trainer's own routing vs the engine's
