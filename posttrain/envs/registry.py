"""Environment registry: built-in names and 'package.module.Class' import paths.

``env.cls`` in the config is resolved here, in the trainer before training starts (so a typo
fails in a second, not after the model has loaded) and again inside every reward worker.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from posttrain.envs.base import Environment
from posttrain.errors import ConfigError

# Built-in environments by name. Values are import paths, not classes, so that importing the
# registry does not import every environment's dependencies (math_verify pulls in sympy).
ENVIRONMENTS: dict[str, str] = {
    "math": "posttrain.envs.math_env.MathEnvironment",
}


def _did_you_mean(name: str, candidates: list[str]) -> str:
    """' Did you mean 'x'?' for the closest candidate, or '' when nothing is close."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _environment_classes(module: Any) -> list[str]:
    """Names of the Environment subclasses a module defines or imports (base class excluded)."""
    return sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, Environment) and value is not Environment
    )


def resolve_env_class(name_or_path: str) -> type[Environment]:
    """The Environment subclass named by a registered name or a 'package.module.Class' path.

    Raises ConfigError (naming the problem and the fix) for an unknown name, a module that does
    not import, a missing attribute, or a class that is not an Environment subclass.
    """
    builtins = ", ".join(repr(n) for n in sorted(ENVIRONMENTS))
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ConfigError(
            f"env.cls={name_or_path!r} is empty or not a string. Set it to a built-in environment "
            f"({builtins}) or an import path 'package.module.Class'."
        )
    name_or_path = name_or_path.strip()
    path = ENVIRONMENTS.get(name_or_path, name_or_path)
    if "." not in path:
        raise ConfigError(
            f"env.cls={name_or_path!r} is not a registered environment.{_did_you_mean(name_or_path, list(ENVIRONMENTS))} "
            f"Built-in environments: {builtins}. For your own environment give its import path "
            f"'package.module.Class'."
        )

    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"env.cls={name_or_path!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}). "
            f"Check the spelling, and that the module is importable (install its package or add its "
            f"folder to PYTHONPATH)."
        ) from e
    except Exception as e:  # a module that imports but fails while running its top-level code
        raise ConfigError(
            f"env.cls={name_or_path!r}: importing module {module_name!r} raised {type(e).__name__}: {e}. "
            f"Fix the error in that module."
        ) from e

    if not hasattr(module, attr):
        found = _environment_classes(module)
        listing = ", ".join(found) if found else "none"
        raise ConfigError(
            f"env.cls={name_or_path!r}: module {module_name!r} has no attribute {attr!r}."
            f"{_did_you_mean(attr, found)} Environment subclasses in that module: {listing}."
        )
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ConfigError(
            f"env.cls={name_or_path!r} is {cls!r}, not an environment class. It must be a class that "
            f"subclasses posttrain.envs.base.Environment and implements step()."
        )
    return cls


def check_env_kwargs(cls: type, kwargs: Mapping[str, Any]) -> None:
    """Raise ConfigError if ``cls(**kwargs)`` would fail on keyword names.

    Unknown names are reported with the nearest valid name; a constructor taking ``**kwargs``
    accepts any name. Required parameters missing from ``kwargs`` are reported too.
    """
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return  # no introspectable signature (e.g. some C extensions): let construction decide
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    valid = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    given = [str(k) for k in kwargs]
    if not accepts_any:
        unknown = [k for k in given if k not in valid]
        if unknown:
            details = "; ".join(f"{k!r}{_did_you_mean(k, valid)}" for k in unknown)
            accepted = ", ".join(valid) if valid else "none"
            raise ConfigError(
                f"env.kwargs has arguments that {cls.__name__} does not accept: {details}. "
                f"Accepted arguments: {accepted}. Remove or rename them in env.kwargs."
            )
    missing = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in given
    ]
    if missing:
        raise ConfigError(
            f"{cls.__name__} requires the arguments {', '.join(missing)}; add them to env.kwargs."
        )


_MAX_LISTED_COLUMNS = 20


def check_required_metadata(env_cls: type, examples: Iterable[Any], what: str) -> None:
    """Raise ConfigError unless every example's metadata has each of ``env_cls.required_metadata``.

    examples: prompt examples (objects with a ``metadata`` dict, e.g. ``PromptExample``) or the
        metadata dicts themselves. A key whose value is None counts as missing.
    what: names the examples in the message, e.g. "training prompts".

    The message names the environment class, the missing key, how many rows lack it, the
    columns those rows do have, and the fix (for 'expected_answer': ``data.answer_column``).
    """
    required = getattr(env_cls, "required_metadata", ()) or ()
    if isinstance(required, str):
        required = (required,)  # a common slip for ("key",)
    name = getattr(env_cls, "__name__", repr(env_cls))
    if not all(isinstance(key, str) for key in required):
        raise ConfigError(
            f"{name}.required_metadata must be a tuple of metadata key names (strings), e.g. "
            f'("expected_answer",); got {required!r}.'
        )
    if not required:
        return
    metadata = [getattr(ex, "metadata", ex) for ex in examples]
    metadata = [m if isinstance(m, Mapping) else {} for m in metadata]
    problems = []
    for key in required:
        lacking = [m for m in metadata if m.get(key) is None]
        if not lacking:
            continue
        columns = sorted({str(c) for m in lacking for c in m})
        listed = ", ".join(repr(c) for c in columns[:_MAX_LISTED_COLUMNS])
        if len(columns) > _MAX_LISTED_COLUMNS:
            listed += f", ... ({len(columns) - _MAX_LISTED_COLUMNS} more)"
        if columns:
            have = f"columns of those rows besides the prompt: {listed}"
        else:
            have = "those rows have no column besides the prompt"
        if key == "expected_answer":
            example = next((c for c in columns if "answer" in c.lower() and c != key), "<column>")
            fix = (
                "Set data.answer_column to the column holding the reference answer (it reaches the "
                f"environment as 'expected_answer'), e.g. data.answer_column={example}"
            )
        else:
            fix = (
                f"Add a {key!r} column to the data: every column except the prompt "
                "(data.prompt_column / data.messages_column) reaches the environment as metadata"
            )
        if 0 < len(lacking) < len(metadata):
            fix += "; or fill in or drop the rows without it"
        problems.append(
            f"{name} needs metadata {key!r} in every prompt row, but {len(lacking)} of "
            f"{len(metadata)} {what} lack it ({have}). {fix}."
        )
    if problems:
        raise ConfigError(" ".join(problems))
