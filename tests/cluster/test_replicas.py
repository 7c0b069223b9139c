"""Engine replicas (rollout.mode=async): per-token weight versions, a 1-replica pool equal to the
synchronous path, partial rollouts that switch weights between two decode steps, and the local
pool's chunking, seeds, order, errors and timeouts."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from helpers import make_tiny_llama, make_tokenizer, save_tiny_model
from posttrain.config.schema import GRPOConfig
from posttrain.engine import Engine
from posttrain.errors import ConfigError
from posttrain.models.logprobs import make_token_batch, response_logprobs
from posttrain.models.weights import WeightLoadError, weights_checksum
from posttrain.rollout import SamplingParams
from posttrain.rollout.builder import build_engine, engine_max_model_len
from posttrain.rollout.hf_engine import HFEngine
from posttrain.cluster import build_replica_pool
from posttrain.cluster.replicas import EngineReplica, LocalReplicaPool, ReplicaError, split_contiguous
from posttrain.checkpoint.rng import seed_everything

TEXTS = ["What is 2+3?", "Hi", "A longer prompt here", "Count: 1, 2,", "xyz"]
SWITCH_STEP = 10  # partial-rollout tests load new weights after this many engine steps


def _cfg(backend: str = "engine", partial: bool = True, num_replicas: int = 1) -> GRPOConfig:
    cfg = GRPOConfig()
    cfg.rollout.backend = backend
    cfg.rollout.engine.max_model_len = 96
    cfg.rollout.engine.block_size = 4
    cfg.rollout.partial_rollouts = partial
    cfg.rollout.num_replicas = num_replicas
    cfg.rollout.generation_batch_size = 4
    return cfg


def _model(tok, seed: int = 0) -> torch.nn.Module:
    model = make_tiny_llama(tok, seed=seed)
    model.generation_config.max_length = None
    return model


def _other_head(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """``model`` with another final norm: other next-token distributions, but the same keys and
    values at every position (the final norm only feeds the LM head), so tokens sampled after a
    mid-generation switch must follow exactly this model's teacher-forced logprobs."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        other.model.norm.weight.copy_(torch.rand(other.model.norm.weight.shape, generator=generator) * 3 + 0.2)
    return other


def _prompts(tok) -> list[list[int]]:
    return [tok(t, add_special_tokens=False).input_ids for t in TEXTS]


def _teacher_forced(model, tok, completion) -> torch.Tensor:
    batch = make_token_batch([completion.prompt_token_ids], [completion.token_ids], tok.pad_token_id)
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, batch, temperature=1.0)
    return logprobs[0, : len(completion.token_ids)]


def test_both_engines_record_the_weight_version_of_every_token():
    tok = make_tokenizer()
    model = _model(tok)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12)
    for engine in (Engine(model, tok, max_model_len=96, block_size=4), HFEngine(model, tok)):
        engine.weight_version = 3
        for group in engine.generate(_prompts(tok), params):
            for c in group:
                assert c.token_versions == [3] * len(c.token_ids) and c.token_ids


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_one_replica_pool_reproduces_the_synchronous_path(backend):
    tok = make_tokenizer()
    model = _model(tok)
    cfg = _cfg(backend)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=16)
    seed_everything(1234)
    expected = build_engine(cfg.rollout, model, tok, torch.float32, max_model_len=engine_max_model_len(cfg, model),
                            float32_logits=cfg.model.float32_logits,
                            expert_dtype=cfg.moe.expert_dtype).generate(_prompts(tok), params)
    seed_everything(99)  # the pool seeds on its own
    pool = build_replica_pool(cfg, model, tok, torch.float32, start_version=7)
    try:
        got = pool.generate(_prompts(tok), params, seed=1234)
        assert pool.replicas[0].model is not model  # a copy, never the trainer's modules
    finally:
        pool.close()
    for exp_group, got_group in zip(expected, got, strict=True):
        for e, g in zip(exp_group, got_group, strict=True):
            assert g.token_ids == e.token_ids
            assert g.logprobs == e.logprobs
            assert g.token_versions == [7] * len(g.token_ids)


def _slow_switch(replica: EngineReplica, partial: bool) -> threading.Event:
    """Make the replica's engine pause after SWITCH_STEP steps: with partial rollouts until
    another thread has handed over new weights (so they land before step SWITCH_STEP + 1),
    else for a moment (a loader arriving then must wait for the generation to end)."""
    reached = threading.Event()
    step, count = replica.engine.step, [0]

    def paused_step():
        finished = step()
        count[0] += 1
        if count[0] == SWITCH_STEP:
            reached.set()
            deadline = time.monotonic() + 10
            while partial and replica._pending is None and time.monotonic() < deadline:
                time.sleep(0.001)
            if not partial:
                time.sleep(0.3)
        return finished

    replica.engine.step = paused_step
    return reached


def _generate_in_thread(replica: EngineReplica, prompt: list[int], params: SamplingParams) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        result["out"] = replica.generate([prompt], params, seed=5)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_partial_rollout_switches_weights_between_two_decode_steps():
    tok = make_tokenizer()
    old = _model(tok)
    new = _other_head(old)
    replica = EngineReplica(_cfg("engine", partial=True), copy.deepcopy(old), tok, torch.float32)
    reached = _slow_switch(replica, partial=True)
    params = SamplingParams(n=1, temperature=1.0, max_tokens=40, ignore_eos=True)
    thread, result = _generate_in_thread(replica, _prompts(tok)[0], params)
    assert reached.wait(10)
    replica.load_weights(new.named_parameters(), version=1)  # returns once the generating thread applied them
    thread.join(10)
    [[c]] = result["out"]
    # One prefill then decode steps, one token each: SWITCH_STEP tokens from the old weights.
    assert c.token_versions == [0] * SWITCH_STEP + [1] * (40 - SWITCH_STEP)
    lp = torch.tensor(c.logprobs)
    torch.testing.assert_close(lp[:SWITCH_STEP], _teacher_forced(old, tok, c)[:SWITCH_STEP], atol=1e-4, rtol=0)
    torch.testing.assert_close(lp[SWITCH_STEP:], _teacher_forced(new, tok, c)[SWITCH_STEP:], atol=1e-4, rtol=0)
    assert not torch.allclose(lp[SWITCH_STEP:], _teacher_forced(old, tok, c)[SWITCH_STEP:], atol=1e-2)
    assert replica.version == 1 and weights_checksum(replica.model) == weights_checksum(new)
    assert replica.info()["requests_done"] == 1


@pytest.mark.parametrize("recompute_kv", [False, True])
def test_partial_rollout_with_other_keys_and_values_keeps_or_recomputes_the_kv_cache(recompute_kv):
    """New weights that change every layer (other keys and values at every position). Kept (the
    default) the cache holds the old weights' keys and values of the tokens before the switch, so the
    later tokens do not follow the new model's teacher-forced logprobs; recomputed, they do exactly."""
    tok = make_tokenizer()
    old = _model(tok)
    new = _model(tok, seed=7)  # all weights differ
    cfg = _cfg("engine", partial=True)
    cfg.rollout.partial_recompute_kv = recompute_kv
    replica = EngineReplica(cfg, copy.deepcopy(old), tok, torch.float32)
    reached = _slow_switch(replica, partial=True)
    # A batch: every prompt's two samples are prefilled together, then decode one token per step.
    params = SamplingParams(n=2, temperature=1.0, max_tokens=30, ignore_eos=True)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", replica.generate(_prompts(tok), params, seed=5)))
    thread.start()
    assert reached.wait(10)
    replica.load_weights(new.named_parameters(), version=1)
    thread.join(10)
    assert not thread.is_alive()  # no deadlock
    completions = [c for group in result["out"] for c in group]
    assert len(completions) == 2 * len(TEXTS)
    for c in completions:
        assert c.token_versions == [0] * SWITCH_STEP + [1] * (30 - SWITCH_STEP)
        lp = torch.tensor(c.logprobs)
        torch.testing.assert_close(lp[:SWITCH_STEP], _teacher_forced(old, tok, c)[:SWITCH_STEP], atol=1e-4, rtol=0)
        after, fresh = lp[SWITCH_STEP:], _teacher_forced(new, tok, c)[SWITCH_STEP:]
        if recompute_kv:
            torch.testing.assert_close(after, fresh, atol=1e-4, rtol=0)
        else:
            assert (after - fresh).abs().max() > 1e-2
    # One re-prefill per running sequence per update, and only when asked for.
    assert replica.engine.stats()["engine/kv_recomputes"] == float(recompute_kv) * len(completions)
    assert replica.engine.stats()["engine/preemptions"] == 0.0


def test_recompute_kv_cache_keeps_the_order_and_the_samples_of_a_batch():
    """Re-prefilling every running sequence between two steps, with unchanged weights, changes no
    sampled token and no logprob (a seeded generator per sequence), and keeps the queue's order."""
    tok = make_tokenizer()
    model = _model(tok)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=20, ignore_eos=True, seed=11)
    plain = Engine(model, tok, max_model_len=96, block_size=4).generate(_prompts(tok), params)
    engine = Engine(model, tok, max_model_len=96, block_size=4)
    steps = [0]

    def recompute_now_and_then():
        steps[0] += 1
        if steps[0] in (3, 9):
            running = list(engine.scheduler.running)
            assert engine.recompute_kv_cache() == len(running) > 0
            assert list(engine.scheduler.waiting)[: len(running)] == running and not engine.scheduler.running

    again = engine.generate(_prompts(tok), params, before_step=recompute_now_and_then)
    for plain_group, group in zip(plain, again, strict=True):
        for p, c in zip(plain_group, group, strict=True):
            assert c.token_ids == p.token_ids
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(p.logprobs), atol=1e-4, rtol=0)
    assert engine.num_kv_recomputes > 0


def test_partial_rollout_under_cpu_bf16_updates_the_fp32_master_weights():
    tok = make_tokenizer()
    old = _model(tok)
    new = _other_head(old)
    cfg = _cfg("engine", partial=True)
    cfg.rollout.engine.cpu_dtype = "bfloat16"  # generate() computes with bf16 copies of the fp32 weights
    replica = EngineReplica(cfg, copy.deepcopy(old), tok, torch.float32)
    reached = _slow_switch(replica, partial=True)
    thread, result = _generate_in_thread(replica, _prompts(tok)[0], SamplingParams(max_tokens=20, ignore_eos=True))
    assert reached.wait(10)
    replica.load_weights(new.named_parameters(), version=1)
    thread.join(10)
    [[c]] = result["out"]
    assert c.token_versions == [0] * SWITCH_STEP + [1] * (20 - SWITCH_STEP)
    assert all(p.dtype == torch.float32 for p in replica.model.parameters())
    assert weights_checksum(replica.model) == weights_checksum(new)


def test_without_partial_rollouts_an_update_waits_for_the_generation():
    tok = make_tokenizer()
    old = _model(tok)
    new = _other_head(old)
    replica = EngineReplica(_cfg("engine", partial=False), copy.deepcopy(old), tok, torch.float32)
    reached = _slow_switch(replica, partial=False)
    params = SamplingParams(n=1, temperature=1.0, max_tokens=40, ignore_eos=True)
    thread, result = _generate_in_thread(replica, _prompts(tok)[0], params)
    assert reached.wait(10)
    replica.load_weights(new.named_parameters(), version=1)
    assert "out" in result  # load_weights returned only after the generation
    thread.join(10)
    [[c]] = result["out"]
    assert c.token_versions == [0] * 40
    torch.testing.assert_close(torch.tensor(c.logprobs), _teacher_forced(old, tok, c), atol=1e-4, rtol=0)
    assert replica.version == 1 and weights_checksum(replica.model) == weights_checksum(new)


@pytest.mark.parametrize("partial", [True, False])
def test_an_update_behind_a_stuck_generation_times_out_naming_the_replica(partial):
    tok = make_tokenizer()
    model = _model(tok)
    cfg = _cfg("engine", partial=partial)
    cfg.cluster.wait_timeout_s = 0.5
    replica = EngineReplica(cfg, copy.deepcopy(model), tok, torch.float32, replica_id=3)
    stuck, release = threading.Event(), threading.Event()
    step = replica.engine.step

    def stuck_step():  # a decode step that does not end until released
        stuck.set()
        release.wait(30)
        return step()

    replica.engine.step = stuck_step
    params = SamplingParams(n=1, temperature=1.0, max_tokens=4, ignore_eos=True)
    thread, result = _generate_in_thread(replica, _prompts(tok)[0], params)
    try:
        assert stuck.wait(10)
        start = time.monotonic()
        with pytest.raises(ReplicaError, match=r"engine replica 3 waited 0.5 s for its generation"):
            replica.load_weights(_other_head(model).named_parameters(), version=1)
        assert time.monotonic() - start < 5
    finally:
        release.set()
        thread.join(10)
    [[c]] = result["out"]
    assert c.token_versions == [0] * 4  # the update that gave up was not applied later
    assert replica.version == 0 and weights_checksum(replica.model) == weights_checksum(model)


def test_a_bad_update_fails_in_the_loading_thread_and_leaves_the_replica_as_it_was():
    tok = make_tokenizer()
    model = _model(tok)
    replica = EngineReplica(_cfg("engine"), copy.deepcopy(model), tok, torch.float32, version=2)
    with pytest.raises(WeightLoadError, match="not in the model"):
        replica.load_weights([("nope.weight", torch.zeros(2))], version=3)
    assert replica.version == 2 and weights_checksum(replica.model) == weights_checksum(model)
    names = [name for name, _, _ in replica.weight_specs()]
    assert names == [name for name, _ in model.named_parameters()]
    assert replica.weight_specs()[0][1:] == (list(model.model.embed_tokens.weight.shape), "float32")


def test_openai_is_not_a_replica_backend():
    tok = make_tokenizer()
    with pytest.raises(ConfigError, match="rollout.backend=openai"):
        EngineReplica(_cfg("openai"), _model(tok), tok, torch.float32)


def test_split_contiguous():
    assert split_contiguous(5, 2) == [(0, 3), (3, 5)]
    assert split_contiguous(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert split_contiguous(6, 3) == [(0, 2), (2, 4), (4, 6)]


def test_pool_gives_each_replica_a_contiguous_chunk_and_its_seed_in_prompt_order():
    tok = make_tokenizer()
    model_a = _model(tok)
    model_b = _model(tok, seed=3)  # other samples: shows which replica answered which prompt
    cfg = _cfg("engine")
    replicas = [EngineReplica(cfg, copy.deepcopy(m), tok, torch.float32, replica_id=i) for i, m in enumerate([model_a, model_b])]
    seeds = []
    for replica in replicas:
        generate = replica.generate
        replica.generate = lambda p, params, seed, generate=generate: seeds.append((len(p), seed)) or generate(p, params, seed)
    pool = LocalReplicaPool(replicas, timeout_s=60)
    # Seeded requests draw from their own generators: the same whichever thread runs them.
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=11)
    prompts = _prompts(tok)
    try:
        out = pool.generate(prompts, params, seed=40)
    finally:
        pool.close()
    assert sorted(seeds) == [(2, 41), (3, 40)]
    expected_a = Engine(model_a, tok, max_model_len=96).generate(prompts[:3], params)
    expected_b = Engine(model_b, tok, max_model_len=96).generate(prompts[3:], params)
    assert [[c.token_ids for c in g] for g in out] == [[c.token_ids for c in g] for g in expected_a + expected_b]
    assert [g[0].prompt_token_ids for g in out] == prompts
    assert [g[0].token_ids for g in expected_a] != [g[0].token_ids for g in Engine(model_b, tok, max_model_len=96).generate(prompts[:3], params)]


def test_push_weights_reaches_every_replica():
    tok = make_tokenizer()
    trainer = _model(tok)
    pool = build_replica_pool(_cfg("hf", num_replicas=2), trainer, tok, torch.float32, start_version=0)
    try:
        with torch.no_grad():
            trainer.model.norm.weight.mul_(2.0)  # an "optimizer step" the replicas do not see
        assert all(weights_checksum(r.model) != weights_checksum(trainer) for r in pool.replicas)
        metrics = pool.push_weights(torch.compile(trainer), version=4)  # torch.compile's wrapper is unwrapped
        assert all(weights_checksum(r.model) == weights_checksum(trainer) for r in pool.replicas)
        nbytes = sum(p.numel() * p.element_size() for p in trainer.parameters())
        assert metrics["sync/bytes"] == 2 * nbytes and metrics["sync/seconds"] >= 0
        assert pool.metrics() == {"rollout/replica_restarts": 0.0, "rollout/replica_version_min": 4.0}
        assert [r.info()["replica_id"] for r in pool.replicas] == [0, 1]
    finally:
        pool.close()


def test_pool_errors_name_the_replica():
    tok = make_tokenizer()
    cfg = _cfg("engine")
    model = _model(tok)
    replicas = [EngineReplica(cfg, copy.deepcopy(model), tok, torch.float32, replica_id=i) for i in range(2)]
    pool = LocalReplicaPool(replicas, timeout_s=0.5)
    params = SamplingParams(n=1, temperature=0.0, max_tokens=4)
    too_long = [5] * 200  # beyond max_model_len: the engine refuses it
    with pytest.raises(ReplicaError, match="engine replica 1 failed.*max_model_len"):
        pool.generate(_prompts(tok)[:1] + [too_long], params, seed=0)

    release = threading.Event()
    step = replicas[1].engine.step
    replicas[1].engine.step = lambda: release.wait(10) and step()  # replica 1 hangs
    try:
        with pytest.raises(ReplicaError, match=r"replica\(s\) 1 did not finish .*cluster.wait_timeout_s=0.5s"):
            pool.generate(_prompts(tok)[:2], params, seed=0)
    finally:
        release.set()
        pool.close()


def test_from_config_loads_its_own_copy_of_the_policy(tmp_path):
    cfg = _cfg("engine")
    cfg.model.path = save_tiny_model(tmp_path / "model")
    replica = EngineReplica.from_config(cfg, replica_id=2, version=5, device="cpu")
    tok = make_tokenizer()
    [[c]] = replica.generate(_prompts(tok)[:1], SamplingParams(max_tokens=6, ignore_eos=True), seed=0)
    assert c.token_versions == [5] * 6
    info = replica.info()
    assert (info["replica_id"], info["version"], info["device"], info["requests_done"]) == (2, 5, "cpu", 1)
    assert weights_checksum(replica.model) == weights_checksum(make_tiny_llama(tok, seed=0))
    replica.close()
