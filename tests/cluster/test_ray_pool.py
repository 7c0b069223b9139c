"""Engine replicas as Ray actors: generation split over replicas, weight pushes, restarts after a kill."""

from __future__ import annotations

import copy
import os
import signal
import sys

import pytest
import torch

from posttrain.config.loader import load_config
from posttrain.config.schema import GRPOConfig
from posttrain.errors import PosttrainError
from posttrain.models import load_model_and_tokenizer
from posttrain.models.weights import weights_checksum
from posttrain.sampling import SamplingParams
from posttrain.cluster.replicas import EngineReplica, ReplicaError, split_contiguous
from tests.helpers import save_tiny_model

ray = pytest.importorskip("ray")

PARAMS = SamplingParams(n=2, max_tokens=6, temperature=1.0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ray-model"))


def make_cfg(model_path: str, *overrides: str) -> GRPOConfig:
    return load_config(GRPOConfig, overrides=[
        f"model.path={model_path}", "model.device=cpu", "rollout.backend=hf", "rollout.mode=async",
        "cluster.backend=ray", "rollout.num_replicas=2", "cluster.wait_timeout_s=120", "sync.collective_timeout_s=30",
        *overrides,
    ])


def trainer_model(cfg: GRPOConfig, shift: float):
    """The trainer's policy: the saved model moved away from it, so a replica that loaded only
    cfg.model.path (and missed the push) would differ."""
    model, tokenizer = load_model_and_tokenizer(cfg.model, torch.device("cpu"))
    nudge(model, shift)
    return model, tokenizer


@torch.no_grad()
def nudge(model: torch.nn.Module, shift: float) -> None:
    for i, p in enumerate(model.parameters()):
        p.add_(shift * torch.sin(torch.arange(p.numel(), dtype=p.dtype) + i).view_as(p))


def local_reference(cfg, model, tokenizer, prompts, seed, version):
    """What the pool must return: replica i generates chunk i with seed + i on the same weights."""
    replica = EngineReplica(cfg, copy.deepcopy(model).requires_grad_(False), tokenizer, torch.float32, version=version)
    groups = []
    for i, (start, end) in enumerate(split_contiguous(len(prompts), cfg.rollout.num_replicas)):
        groups += replica.generate(prompts[start:end], PARAMS, seed + i)
    return groups


def token_ids(groups):
    return [[c.token_ids for c in group] for group in groups]


@pytest.fixture(scope="module")
def broadcast_pool(ray_local, model_path):
    from posttrain.cluster.ray_pool import RayReplicaPool

    cfg = make_cfg(model_path, "sync.mode=auto")
    model, tokenizer = trainer_model(cfg, 0.02)
    pool = RayReplicaPool(cfg, start_version=3, model=model)
    yield cfg, pool, model, tokenizer
    pool.close()


def test_generate_over_replicas_equals_local_replicas(broadcast_pool):
    cfg, pool, model, tokenizer = broadcast_pool
    assert (pool.mode, pool.backend) == ("broadcast", "gloo")  # auto on CPU
    prompts = [tokenizer.encode(text) for text in ("ab", "cd", "efg")]
    got = pool.generate(prompts, PARAMS, seed=11)
    assert token_ids(got) == token_ids(local_reference(cfg, model, tokenizer, prompts, 11, version=3))
    assert all(c.token_versions == [3] * len(c.token_ids) for group in got for c in group)
    assert len({info["pid"] for info in pool.info()}) == 2  # two actor processes


def test_broadcast_push_and_a_push_after_a_replica_was_killed(broadcast_pool):
    cfg, pool, model, tokenizer = broadcast_pool
    nudge(model, 0.05)
    stats = pool.push_weights(model, version=4)
    assert stats["sync/bytes"] > 0
    assert pool.checksums() == [weights_checksum(model)] * 2
    assert pool.metrics()["rollout/replica_version_min"] == 4

    # a replica killed between pushes: the next push finds it dead, restarts it and repeats itself
    os.kill(pool.info()[0]["pid"], signal.SIGKILL)
    nudge(model, 0.05)
    pool.push_weights(model, version=5)
    assert pool.metrics()["rollout/replica_restarts"] == 1
    assert pool.checksums() == [weights_checksum(model)] * 2
    prompts = [tokenizer.encode(text) for text in ("hi", "yo")]
    got = pool.generate(prompts, PARAMS, seed=2)
    assert token_ids(got) == token_ids(local_reference(cfg, model, tokenizer, prompts, 2, version=5))


def test_a_stuck_replica_gives_a_timeout_error_naming_it(broadcast_pool):
    cfg, pool, _, tokenizer = broadcast_pool
    pid = pool.info()[1]["pid"]
    pool.timeout_s = 2.0  # cluster.wait_timeout_s, shortened once the replicas are up
    os.kill(pid, signal.SIGSTOP)  # stuck: alive, but it never answers
    try:
        with pytest.raises(ReplicaError, match=r"Engine replica\(s\) 1 did not finish generating .* within "
                                               r"cluster.wait_timeout_s=2s"):
            pool.generate([tokenizer.encode(text) for text in ("ab", "cd")], PARAMS, seed=0)
        with pytest.raises(ReplicaError, match=r"Engine replica 1 did not answer info\(\) within cluster.wait_timeout_s=2s"):
            pool.info()
    finally:
        os.kill(pid, signal.SIGCONT)
        pool.timeout_s = cfg.cluster.wait_timeout_s


def test_checkpoint_push_and_a_generate_after_a_replica_was_killed(ray_local, model_path):
    from posttrain.cluster.ray_pool import RayReplicaPool

    cfg = make_cfg(model_path, "sync.mode=checkpoint")
    model, tokenizer = trainer_model(cfg, -0.03)
    pool = RayReplicaPool(cfg, start_version=0, model=model)
    try:
        assert pool.mode == "checkpoint"
        assert pool.checksums() == [weights_checksum(model)] * 2
        nudge(model, 0.04)
        pool.push_weights(model, version=1)
        assert pool.checksums() == [weights_checksum(model)] * 2

        # killed before its chunk arrives: the chunk fails, the replica restarts with version 1 and redoes it
        os.kill(pool.info()[1]["pid"], signal.SIGKILL)
        prompts = [tokenizer.encode(text) for text in ("ab", "cd", "ef", "gh")]
        got = pool.generate(prompts, PARAMS, seed=7)
        assert token_ids(got) == token_ids(local_reference(cfg, model, tokenizer, prompts, 7, version=1))
        assert pool.metrics() == {"rollout/replica_restarts": 1.0, "rollout/replica_version_min": 1.0}
    finally:
        pool.close()


def test_too_many_restarts_stops_with_the_cause(ray_local, model_path):
    from posttrain.cluster.ray_pool import RayReplicaPool

    cfg = make_cfg(model_path, "sync.mode=checkpoint", "rollout.num_replicas=1", "cluster.max_replica_restarts=0")
    model, tokenizer = trainer_model(cfg, 0.01)
    pool = RayReplicaPool(cfg, start_version=0, model=model)
    try:
        pid = pool.info()[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(PosttrainError) as caught:
            pool.generate([tokenizer.encode("ab")], PARAMS, seed=0)
        message = str(caught.value)
        assert "replica 0" in message and f"pid {pid}" in message
        assert "cluster.max_replica_restarts=0" in message
        assert "worker process has died" in message and "killed" in message  # Ray's cause, not just "actor died"
    finally:
        pool.close()


def test_missing_ray_says_how_to_install(monkeypatch):
    from posttrain.cluster.ray_cluster import init_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(PosttrainError, match=r"pip install 'posttrain\[ray\]'"):
        init_ray(GRPOConfig().cluster)


@pytest.mark.parametrize(("mode", "backend", "trainer", "replicas", "expected"), [
    ("auto", "auto", None, [None, None], ("broadcast", "gloo")),  # CPU
    ("auto", "auto", "gpu0", ["gpu1", "gpu2"], ("broadcast", "nccl")),  # a GPU each
    ("auto", "auto", "gpu0", ["gpu0", "gpu1"], ("checkpoint", "gloo")),  # a replica beside the trainer
    ("auto", "auto", "gpu0", ["gpu1", "gpu1"], ("checkpoint", "gloo")),  # two replicas on one GPU (0.5 each)
    ("auto", "auto", "gpu0", [None], ("broadcast", "gloo")),  # CPU replicas of a GPU trainer
    ("broadcast", "auto", "gpu0", ["gpu0"], ("broadcast", "gloo")),  # forced broadcast goes through host memory
    ("checkpoint", "auto", "gpu0", ["gpu1"], ("checkpoint", "nccl")),
])
def test_weight_transport_follows_placement(mode, backend, trainer, replicas, expected):
    from posttrain.cluster.ray_pool import choose_weight_transport

    assert choose_weight_transport(mode, backend, trainer, replicas)[:2] == expected


def test_nccl_broadcast_to_a_shared_gpu_is_a_config_error():
    from posttrain.cluster.ray_pool import choose_weight_transport
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="sync.mode=checkpoint"):
        choose_weight_transport("broadcast", "nccl", "gpu0", ["gpu0"])
