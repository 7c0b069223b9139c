"""Engine replicas in child processes (cluster.backend=process): the same samples as the trainer's
engine, weights pushed through shared memory, a killed replica restarted with the last weights
(its share generated again), the cause named once restarts run out. GRPO end to end on them:
tests/trainer/test_async_process_e2e.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from helpers import make_tokenizer, save_tiny_model

from posttrain.checkpoint.rng import seed_everything
from posttrain.cluster import build_replica_pool
from posttrain.cluster.process_pool import ProcessReplicaPool, flatten_weights, unflatten_weights
from posttrain.cluster.replicas import ReplicaError
from posttrain.config.schema import GRPOConfig
from posttrain.models import load_model_and_tokenizer
from posttrain.models.weights import weights_checksum
from posttrain.rollout import SamplingParams
from posttrain.rollout.builder import build_engine, engine_max_model_len

TEXTS = ["What is 2+3?", "Hi", "A longer prompt here", "Count: 1, 2,"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model")


def _cfg(model_dir: str, num_replicas: int = 1, max_restarts: int = 3) -> GRPOConfig:
    cfg = GRPOConfig()
    cfg.model.path = model_dir
    cfg.model.device = "cpu"
    cfg.rollout.engine.max_model_len = 96
    cfg.rollout.engine.block_size = 4
    cfg.rollout.engine.cpu_kv_cache_gb = 0.05
    cfg.rollout.num_replicas = num_replicas
    cfg.cluster.backend = "process"
    cfg.cluster.wait_timeout_s = 120
    cfg.cluster.max_replica_restarts = max_restarts
    return cfg


def _trainer(cfg: GRPOConfig):
    return load_model_and_tokenizer(cfg.model, torch.device("cpu"))


def _prompts(tok) -> list[list[int]]:
    return [tok(t, add_special_tokens=False).input_ids for t in TEXTS]


def test_flat_weights_round_trip():
    tok = make_tokenizer()
    from helpers import make_tiny_llama

    model = make_tiny_llama(tok)
    specs, buffers = flatten_weights(model)
    named = dict(unflatten_weights(specs, buffers))
    for name, param in model.named_parameters():
        if name in named:
            assert torch.equal(named[name], param.detach())
    assert sum(b.numel() for b in buffers.values()) == sum(t.numel() for t in named.values())


def test_a_replica_process_samples_as_the_trainers_engine_and_takes_pushed_weights(model_dir):
    cfg = _cfg(model_dir)
    model, tok = _trainer(cfg)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12)
    seed_everything(1234)
    expected = build_engine(cfg.rollout, model, tok, torch.float32, max_model_len=engine_max_model_len(cfg, model),
                            float32_logits=cfg.model.float32_logits,
                            expert_dtype=cfg.moe.expert_dtype).generate(_prompts(tok), params)
    pool = build_replica_pool(cfg, model, tok, torch.float32, start_version=3)
    try:
        assert isinstance(pool, ProcessReplicaPool)
        assert all(pid != os.getpid() for pid in pool.pids())
        got = pool.generate(_prompts(tok), params, seed=1234)
        for exp_group, got_group in zip(expected, got, strict=True):
            for e, g in zip(exp_group, got_group, strict=True):
                assert g.token_ids == e.token_ids
                assert g.logprobs == pytest.approx(e.logprobs, abs=1e-6)
                assert g.token_versions == [3] * len(g.token_ids)
        with torch.no_grad():  # the trainer moves on; the push brings the replica along
            for param in model.parameters():
                param.add_(0.01)
        metrics = pool.push_weights(model, 4)
        assert metrics["sync/bytes"] > 0
        assert pool.checksums() == [weights_checksum(model)]
        assert pool.info()[0]["version"] == 4
    finally:
        pool.close()
    assert all(not r.process.is_alive() for r in pool.replicas)


def test_a_killed_replica_is_restarted_with_the_last_weights_and_generates_its_share_again(model_dir):
    cfg = _cfg(model_dir, num_replicas=2)
    model, tok = _trainer(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.01)
    pool = build_replica_pool(cfg, model, tok, torch.float32, start_version=0)
    try:
        pool.push_weights(model, 5)
        victim = pool.replicas[1].process.pid
        os.kill(victim, signal.SIGKILL)
        params = SamplingParams(n=2, temperature=1.0, max_tokens=8)
        groups = pool.generate(_prompts(tok), params, seed=7)
        assert len(groups) == len(TEXTS) and all(len(g) == 2 for g in groups)
        assert pool.metrics()["rollout/replica_restarts"] == 1.0
        assert pool.replicas[1].process.pid != victim
        assert pool.checksums() == [weights_checksum(model)] * 2  # the restarted one got version 5's weights
        assert all(c.token_versions == [5] * len(c.token_ids) for g in groups for c in g)
    finally:
        pool.close()


def test_a_replica_that_keeps_dying_stops_with_its_signal_and_log(model_dir):
    cfg = _cfg(model_dir, max_restarts=0)
    model, tok = _trainer(cfg)
    pool = build_replica_pool(cfg, model, tok, torch.float32, start_version=0)
    try:
        os.kill(pool.replicas[0].process.pid, signal.SIGKILL)
        with pytest.raises(ReplicaError) as error:
            pool.generate(_prompts(tok), SamplingParams(n=1, max_tokens=4), seed=0)
        message = str(error.value)
        assert "engine replica 0" in message and "SIGKILL" in message and "max_replica_restarts=0" in message
        assert "replica_0.log" in message  # the last lines of its log follow
    finally:
        pool.close()


def test_a_replica_that_cannot_load_the_model_says_why(tmp_path):
    cfg = _cfg(str(tmp_path / "missing"))
    cfg.model.path = str(tmp_path / "missing")
    with pytest.raises(ReplicaError, match="engine replica 0 failed to start"):
        ProcessReplicaPool(cfg, start_version=0)


def test_generations_from_two_threads_each_get_their_own_answers(model_dir):
    # The async producer and validation call the pool from different threads at once.
    import threading

    cfg = _cfg(model_dir)
    model, tok = _trainer(cfg)
    pool = build_replica_pool(cfg, model, tok, torch.float32, start_version=0)
    results: dict[str, list] = {}
    try:
        calls = {"four_by_one": (_prompts(tok), SamplingParams(n=1, max_tokens=6)),
                 "two_by_three": (_prompts(tok)[:2], SamplingParams(n=3, max_tokens=6))}
        def run(key, args):
            results.setdefault(key, []).append(pool.generate(*args, seed=1))

        threads = [threading.Thread(target=run, args=(k, a))
                   for _ in range(4) for k, a in calls.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        pool.close()
    assert len(results["four_by_one"]) == len(results["two_by_three"]) == 4
    assert all([len(g) for g in out] == [1, 1, 1, 1] for out in results["four_by_one"])
    assert all([len(g) for g in out] == [3, 3] for out in results["two_by_three"])
