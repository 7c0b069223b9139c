"""Sharded checkpoints of multi-process (FSDP2) runs, and their conversion to a Hugging Face folder.

Layout (same folder names, listing, keep-last-K and resume as :mod:`posttrain.checkpoint.manager`)::

    <output_dir>/checkpoints/step_000010/
        dcp/                          torch.distributed.checkpoint: model + optimizer, one file per rank
        config.json, generation_config.json, tokenizer files      (rank 0)
        trainer_state.json            ({..., "step": 10, "format": "fsdp-dcp", "world_size": 2})
        scheduler.pt                  (rank 0; the same on every rank)
        rng_state_rank0.pt, ...       (one per rank)

Every rank writes its own shards straight into the temporary folder, so no rank ever holds the whole
model. Atomicity is the single-process manager's: everything goes to ``.tmp-step_000010-<pid>``,
then rank 0 fsyncs and renames it once every rank has finished writing. DCP stores tensors with
their global shapes, so a checkpoint can be resumed on a different number of ranks, and
``posttrain convert`` turns it into a Hugging Face folder in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from posttrain.checkpoint.manager import (
    _TMP_PREFIX,
    SCHEDULER_FILE,
    TRAINER_STATE_FILE,
    CheckpointManager,
    _fsync_tree,
    _torch_load,
    _torch_save,
    _write_bytes,
    checkpoint_name,
)
from posttrain.checkpoint.rng import capture_rng_state, restore_rng_state
from posttrain.distributed.process_group import barrier, broadcast_object, get_rank, get_world_size
from posttrain.errors import PosttrainError

DCP_SUBDIR = "dcp"
SHARDED_FORMAT = "fsdp-dcp"


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a checkpoint folder written by :class:`ShardedCheckpointManager`."""
    return (Path(path) / DCP_SUBDIR / ".metadata").is_file()


class ShardedCheckpointManager(CheckpointManager):
    """The checkpoint manager of a multi-process run. ``save`` and ``load`` are collectives: every
    rank calls them; rank 0 alone writes the small files and renames the folder."""

    def __init__(self, output_dir: str | Path, keep_last: int, prefix: str = "step") -> None:
        if get_rank() == 0:
            super().__init__(output_dir, keep_last, prefix)  # also tidies leftovers of a crashed save
        barrier()
        if get_rank() != 0:
            super().__init__(output_dir, keep_last, prefix)  # nothing left to tidy: no race with rank 0

    def save(self, step: int, model: Any, tokenizer: Any, trainer_state: dict,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None) -> Path:
        """Write the checkpoint of ``step`` atomically, prune old ones, return its folder (all ranks)."""
        rank = get_rank()
        name = checkpoint_name(step, self.prefix)
        final_dir = self.checkpoints_dir / name
        tmp_dir = Path(broadcast_object(str(self.checkpoints_dir / f"{_TMP_PREFIX}{name}-{os.getpid()}")))
        state = {**trainer_state, "step": step, "format": SHARDED_FORMAT, "world_size": get_world_size()}
        if rank == 0:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir()
        barrier()
        try:
            model_state, optimizer_state = get_state_dict(model, [optimizer] if optimizer is not None else [])
            to_save = {"model": model_state}
            if optimizer is not None:
                to_save["optimizer"] = optimizer_state
            dcp.save(to_save, checkpoint_id=tmp_dir / DCP_SUBDIR)
            _torch_save(capture_rng_state(), tmp_dir / rng_file(rank))
            if rank == 0:
                _write_bytes(tmp_dir / TRAINER_STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())
                model.config.save_pretrained(tmp_dir)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(tmp_dir)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp_dir)
                if scheduler is not None:
                    _torch_save(scheduler.state_dict(), tmp_dir / SCHEDULER_FILE)
            barrier()  # every rank's shards are written
            if rank == 0:
                _fsync_tree(tmp_dir)
                self._commit(tmp_dir, final_dir)
                self._prune(keep=final_dir)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        barrier()  # nobody reads or prunes before the folder is in place
        return final_dir

    @staticmethod
    def load(ckpt_dir: str | Path, model: Any, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any | None = None) -> dict:
        """Load model (and optimizer, scheduler, this rank's RNG) state into an already sharded
        ``model`` and the optimizer built on it; return the trainer state. A collective."""
        ckpt_dir = Path(ckpt_dir)
        if not is_sharded_checkpoint(ckpt_dir):
            raise PosttrainError(f"'{ckpt_dir}' is not a sharded checkpoint ({DCP_SUBDIR}/.metadata is missing).")
        trainer_state = json.loads((ckpt_dir / TRAINER_STATE_FILE).read_text())
        optimizers = [optimizer] if optimizer is not None else []
        model_state, optimizer_state = get_state_dict(model, optimizers)
        to_load = {"model": model_state}
        if optimizer is not None:
            to_load["optimizer"] = optimizer_state
        try:
            with warnings.catch_warnings():  # one process resuming a multi-rank run: intended
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(to_load, checkpoint_id=ckpt_dir / DCP_SUBDIR)
        except Exception as exc:  # a checkpoint without optimizer state, or of another model
            raise PosttrainError(
                f"Cannot load sharded checkpoint '{ckpt_dir}' into this model/optimizer ({exc}). Resume with the "
                "run's model.path, and a checkpoint saved with checkpoint.save_optimizer=true."
            ) from exc
        set_state_dict(model, optimizers, model_state_dict=to_load["model"],
                       optim_state_dict=to_load.get("optimizer", {}))
        if scheduler is not None and (ckpt_dir / SCHEDULER_FILE).is_file():
            scheduler.load_state_dict(_torch_load(ckpt_dir / SCHEDULER_FILE, "cpu"))
        rng = ckpt_dir / rng_file(get_rank())
        if rng.is_file():  # absent when resuming on more ranks than saved
            restore_rng_state(_torch_load(rng, "cpu"))
        return trainer_state


def full_model_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, on every rank (tests, small models; a collective)."""
    return get_state_dict(model, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]


def convert_to_hf(source: str | Path, output: str | Path) -> Path:
    """Write the sharded checkpoint ``source`` (a checkpoint folder, or a run folder: its latest) as a
    Hugging Face model folder ``output`` (config, tokenizer, safetensors) that
    ``AutoModelForCausalLM.from_pretrained`` loads. Runs in one process; needs no process group."""
    ckpt = CheckpointManager.resolve(source)
    if not is_sharded_checkpoint(ckpt):
        raise PosttrainError(
            f"'{ckpt}' is not a sharded checkpoint (no {DCP_SUBDIR}/ folder): checkpoints of single-process runs "
            "already are Hugging Face folders; load them directly."
        )
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise PosttrainError(f"'{output}' exists and is not empty; choose a new folder for the converted model.")
    metadata = FileSystemReader(str(ckpt / DCP_SUBDIR)).read_metadata()
    prefix = "model."
    weights = {
        key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": weights}, checkpoint_id=ckpt / DCP_SUBDIR, no_dist=True)
    config = AutoConfig.from_pretrained(ckpt)
    dtype = next(iter(weights.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise PosttrainError(f"Checkpoint '{ckpt}' does not match its config.json: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}.")
    model.tie_weights()
    if (ckpt / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(ckpt)
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ckpt).save_pretrained(tmp)
    _fsync_tree(tmp)
    if output.exists():
        output.rmdir()  # empty, checked above
    os.replace(tmp, output)
    return output


def _tied_keys(model: Any) -> set[str]:
    """Parameter names that share storage with another one (e.g. lm_head.weight with tied embeddings)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    return set(named) - set(unique)
