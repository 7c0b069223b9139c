"""Seed, capture and restore every random number generator a training step touches.

A resumed run only reproduces an uninterrupted one if sampling, dropout and data order
continue from the same generator states, so checkpoints store all of them.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    seed %= 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Return the states of Python's ``random``, NumPy's global generator, torch CPU and
    every visible CUDA device (key ``"cuda"``: a list with one ByteTensor per device, or
    absent when CUDA is unavailable).

    The dict holds only tuples, ints, floats, strings and tensors, so it round-trips through
    ``torch.save`` / ``torch.load(weights_only=True)`` without allow-listing NumPy types.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_safe(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states captured by :func:`capture_rng_state`.

    Missing keys are skipped. CUDA states are restored only when CUDA is available now; a
    checkpoint saved on a machine with more GPUs restores the first ``device_count`` states
    (a run moved to fewer GPUs cannot be bit-exact anyway).
    """
    if "python" in state:
        random.setstate(_as_python_state(state["python"]))
    if "numpy" in state:
        np.random.set_state(_numpy_state_from_safe(state["numpy"]))
    if "torch" in state:
        # torch.set_rng_state needs a CPU ByteTensor; a map_location may have moved it.
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for device, cuda_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), device)


def _as_python_state(value: Any) -> tuple:
    # random.setstate needs tuples; a state that went through a list-producing format
    # (e.g. JSON) comes back as nested lists.
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


def _numpy_state_to_safe(state: tuple) -> tuple:
    # ('MT19937', uint32 array of 624 keys, pos, has_gauss, cached_gaussian): the key array
    # becomes an int64 tensor because weights_only unpickling refuses NumPy arrays.
    name, keys, pos, has_gauss, cached_gaussian = state
    return (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached_gaussian))


def _numpy_state_from_safe(state: Any) -> tuple:
    name, keys, pos, has_gauss, cached_gaussian = state
    keys_array = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    return (name, keys_array.astype(np.uint32), int(pos), int(has_gauss), float(cached_gaussian))
