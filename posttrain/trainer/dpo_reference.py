"""Reference logprobs of every preference pair, computed once per run and cached in the run folder.

DPO's reference model never changes, so its logprobs are a property of the data: the recipe
scores every training and validation pair with the starting weights before the first update,
stores the sums in the pairs, and needs no second model during training.

They are also written to ``<run>/reference_logps.pt`` with a fingerprint of everything they
depend on (model path, compute dtype, every token id). A resumed run loads them from there, so
it continues with bit-identical values without loading the starting weights again; when the
file is missing or stale (e.g. a checkpoint copied elsewhere) the recipe recomputes them from
the starting model, which is deterministic for the same machine and settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
from array import array
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from posttrain.algorithms import sequence_logps
from posttrain.data.preference import PreferencePair
from posttrain.models import make_token_batch, response_logprobs

logger = logging.getLogger("posttrain.trainer")

REFERENCE_FILE = "reference_logps.pt"
_FORMAT_VERSION = "dpo-reference-v1"


def pair_token_logps(
    model: torch.nn.Module,
    pairs: Sequence[PreferencePair],
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token response logprobs ``(2B, R)`` and mask ``(2B, R)`` of B pairs in ONE forward
    pass: rows ``[:B]`` are the chosen responses, rows ``[B:]`` the rejected ones."""
    tokens = make_token_batch(
        [p.prompt_ids for p in pairs] * 2,
        [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
        pad_token_id,
        device,
    )
    with autocast():
        logprobs, _ = response_logprobs(model, tokens)
    return logprobs.float(), tokens.response_mask


@torch.no_grad()
def compute_reference_logps(
    model: torch.nn.Module,
    pairs: Sequence[PreferencePair],
    *,
    micro_batch_size: int,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> None:
    """Fill ``ref_chosen_logps``/``ref_rejected_logps`` (summed over response tokens) in place.

    Summed values serve every loss type: length-averaged ones are the sum over the length."""
    was_training = model.training
    model.eval()  # no dropout: the reference is a fixed function of the data
    for start in range(0, len(pairs), micro_batch_size):
        chunk = pairs[start : start + micro_batch_size]
        logprobs, mask = pair_token_logps(model, chunk, pad_token_id, device, autocast)
        sums = sequence_logps(logprobs, mask, average=False).cpu().tolist()
        for i, pair in enumerate(chunk):
            pair.ref_chosen_logps, pair.ref_rejected_logps = sums[i], sums[len(chunk) + i]
    model.train(was_training)


def reference_fingerprint(model_identity: Sequence[str], pairs: Sequence[PreferencePair]) -> str:
    """A hash of what the reference logprobs depend on: the model identity strings (path, GGUF
    file, compute dtype, ...) and every token id of every pair, in order."""
    digest = hashlib.sha256(_FORMAT_VERSION.encode())
    for part in model_identity:
        digest.update(b"\x00" + str(part).encode())
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(array("q", ids).tobytes())
    return digest.hexdigest()


def load_cached_reference(path: Path, fingerprint: str, pairs: Sequence[PreferencePair]) -> bool:
    """Fill the pairs from ``path`` when it matches ``fingerprint``; False when absent or stale."""
    if not path.is_file():
        return False
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged cache is only a reason to recompute
        logger.warning("Ignoring unreadable %s (%s); recomputing reference logprobs", path, exc)
        return False
    if cached.get("fingerprint") != fingerprint or tuple(cached["logps"].shape) != (len(pairs), 2):
        logger.warning("%s was computed for other data or another model; recomputing reference logprobs", path)
        return False
    for pair, (chosen, rejected) in zip(pairs, cached["logps"].tolist()):
        pair.ref_chosen_logps, pair.ref_rejected_logps = chosen, rejected
    return True


def save_reference(path: Path, fingerprint: str, pairs: Sequence[PreferencePair]) -> None:
    """Write the pairs' reference logprobs atomically (temporary file, then rename)."""
    logps = torch.tensor([[p.ref_chosen_logps, p.ref_rejected_logps] for p in pairs], dtype=torch.float64)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"fingerprint": fingerprint, "logps": logps.reshape(len(pairs), 2)}, tmp)
    os.replace(tmp, path)
