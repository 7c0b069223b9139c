"""The local Ray instance of the Ray tests: one per test module, shared by its tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # 4 logical CPUs: two pools of one-CPU actors may be up at once; the machine may have 2 cores
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="posttrain-tests")
    yield ray
    ray.shutdown()
