"""Cheap structural checks of model folders and checkpoints, run before anything loads them.

A truncated safetensors file, an empty or garbage trainer_state.json or a step folder without
weights otherwise surface as a traceback deep inside transformers or torch (or as a misleading
"install sentencepiece" when a tokenizer file is missing). These checks read headers, not
weights: a safetensors file's header and its size, zip central directories of ``.pt`` files,
the small JSON files. Every problem names the file and what is wrong with it.

One validator for every reader: resume (:meth:`CheckpointManager.resolve` skips a broken latest
checkpoint for the previous complete one), model loading (``models.loading``) and ``merge``.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from posttrain.errors import PosttrainError

TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pt")
# trainer_state.json key: the optional state files (optimizer, scheduler) a checkpoint was saved
# with, so that one deleted later is a missing file, not a checkpoint.save_optimizer=false run.
STATE_FILES_KEY = "state_files"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# A header larger than this is not a real one (transformers' own limit is 100 MB).
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class InvalidCheckpoint(PosttrainError):
    """A model folder or checkpoint with a missing, truncated or malformed file."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (None when it is): the header must parse
    and the tensors it lists must fit in the file, which a cut-off download or disk-full write breaks."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "empty (0 bytes)" if size == 0 else f"truncated: only {size} bytes"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
                return f"truncated or corrupt: its header of {header_len} bytes does not fit in the file's {size} bytes"
            header = json.loads(f.read(header_len))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "safetensors header is not valid JSON (corrupt file)"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object (corrupt file)"
    data_len = size - 8 - header_len
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    needed = max(ends, default=0)
    if needed > data_len:
        return f"truncated: its tensors need {needed} bytes of data but the file holds {data_len}"
    return None


def _json_problem(path: Path, want: type = dict) -> str | None:
    try:
        value = json.loads(path.read_bytes())
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return "is empty" if not path.stat().st_size else f"is not valid JSON ({exc})"
    if not isinstance(value, want):
        return f"holds a JSON {type(value).__name__}, expected an object"
    return None


def _zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive; its central directory sits at the end, so a cut-off file fails here."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"is not a complete torch file ({exc}; truncated?)"
    return None


def model_folder_problems(folder: Path) -> list[str]:
    """Problems of a Hugging Face model or peft adapter folder: its config, weights and tokenizer.
    Each entry is ``"<file>: <problem>"`` (relative to ``folder``)."""
    if not folder.is_dir():
        return [f"is {'a file' if folder.exists() else 'missing'}, not a model folder"]
    if not any(folder.iterdir()):
        return ["the folder is empty: expected config.json, model weights (*.safetensors) and tokenizer files"]
    problems: list[str] = []
    adapter = (folder / ADAPTER_CONFIG_FILE).exists()
    config_name = ADAPTER_CONFIG_FILE if adapter else CONFIG_FILE
    if not (folder / config_name).is_file():
        problems.append(f"{config_name}: missing")
    elif (problem := _json_problem(folder / config_name)) is not None:
        problems.append(f"{config_name}: {problem}")
    weights = sorted(folder.glob("*.safetensors"))
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        if (problem := _json_problem(index)) is not None:
            problems.append(f"{SAFETENSORS_INDEX}: {problem}")
        else:
            shards = set(json.loads(index.read_bytes()).get("weight_map", {}).values())
            problems += [f"{name}: missing (listed in {SAFETENSORS_INDEX})" for name in sorted(shards)
                         if not (folder / name).is_file()]
    if not weights and not any(folder.glob("*.bin")) and not (folder / "dcp" / ".metadata").is_file():
        problems.append("no weights: expected " + ("adapter_model.safetensors" if adapter else "model.safetensors "
                        "(or *.safetensors shards)"))
    for path in weights:
        if (problem := safetensors_problem(path)) is not None:
            problems.append(f"{path.name}: {problem}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"no tokenizer files: expected one of {', '.join(TOKENIZER_FILES)}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file() and (problem := _json_problem(folder / name)) is not None:
            problems.append(f"{name}: {problem}")
    return problems


def trainer_state_problem(ckpt: Path) -> str | None:
    """Why ``ckpt``'s trainer_state.json is unusable (None when it is fine)."""
    path = ckpt / TRAINER_STATE_FILE
    if not path.is_file():
        return "missing"
    if (problem := _json_problem(path)) is not None:
        return problem
    state = json.loads(path.read_bytes())
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"'step' must be an integer >= 0, got {step!r}"
    for key in ("sampler", "data"):  # the data position of GRPO/PPO/DPO ("sampler") and SFT ("data")
        if key in state and not isinstance(state[key], dict):
            return f"'{key}' must be a JSON object, got {type(state[key]).__name__}"
    return None


def checkpoint_problems(ckpt: Path) -> list[str]:
    """Every problem of a checkpoint folder (trainer state, weights, tokenizer, optimizer files),
    each as ``"<file>: <problem>"``; empty when the checkpoint looks complete."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return [f"is {'a file' if ckpt.exists() else 'missing'}, not a checkpoint folder"]
    problems = []
    if (problem := trainer_state_problem(ckpt)) is not None:
        problems.append(f"{TRAINER_STATE_FILE}: {problem}")
    else:
        saved_with = json.loads((ckpt / TRAINER_STATE_FILE).read_bytes()).get(STATE_FILES_KEY)
        for name in saved_with if isinstance(saved_with, list) else []:
            if isinstance(name, str) and not (ckpt / name).is_file():
                problems.append(f"{name}: missing (the checkpoint was saved with it: deleted or lost since)")
    problems += model_folder_problems(ckpt)
    for name in TORCH_STATE_FILES:
        if (ckpt / name).is_file() and (problem := _zip_problem(ckpt / name)) is not None:
            problems.append(f"{name}: {problem}")
    return problems


def validate_checkpoint(ckpt: str | Path) -> Path:
    """``ckpt`` when it is a complete checkpoint, else raise InvalidCheckpoint naming the broken file."""
    ckpt = Path(ckpt)
    problems = checkpoint_problems(ckpt)
    if problems:
        raise InvalidCheckpoint(ckpt, "; ".join(problems))
    return ckpt


def validate_model_folder(folder: str | Path, what: str = "model.path") -> None:
    """Raise a PosttrainError naming the broken file when a local model folder cannot be loaded."""
    folder = Path(folder)
    problems = model_folder_problems(folder)
    if problems:
        raise InvalidCheckpoint(folder, f"cannot be loaded as {what}: " + "; ".join(problems)
                                + ". Point it at a complete model folder (config.json, *.safetensors, tokenizer "
                                "files), a .gguf file, a hub id or 'embedded'.")
