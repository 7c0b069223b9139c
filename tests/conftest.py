import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
_SESSION_SIGTERM = signal.getsignal(signal.SIGTERM)

# Without a GPU, Triton kernels (posttrain/models/logit_kernels.py) run in Triton's interpreter when
# Triton is installed. triton.jit makes that choice when a kernel is defined: before posttrain loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    # Keep wandb/HF/posttrain caches out of the home folder and make runs offline.
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "posttrain-cache"))


@pytest.fixture(autouse=True)
def _ctrl_c_as_in_a_terminal():
    # A shell that starts a job in the background makes it ignore SIGINT; the Ctrl-C tests need
    # the handler a terminal gives (KeyboardInterrupt), so set it and restore the inherited one.
    import signal

    inherited = signal.getsignal(signal.SIGINT)
    if inherited is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


@pytest.fixture(autouse=True)
def _sigterm_as_the_session_found_it():
    # ray.init installs a SIGTERM handler in the driver (the pytest process, from a module-scoped
    # fixture) and leaves it there; the SIGTERM tests check that posttrain puts back what it found,
    # so every test starts and ends with the handler the session started with.
    signal.signal(signal.SIGTERM, _SESSION_SIGTERM)
    yield
    signal.signal(signal.SIGTERM, _SESSION_SIGTERM)
