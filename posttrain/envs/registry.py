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
    "calculator": "posttrain.envs.calculator_env.CalculatorEnvironment",
    "code": "posttrain.envs.code_env.CodeEnvironment",
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
        metadata dicts themselves. A key whose value is None counts as missing. They are looked at
        once, in one pass, and not kept (a lazy sequence of a large file stays lazy).
    what: names the examples in the message, e.g. "training prompts".

    The message names the environment class, the missing key, how many rows lack it, the
    columns those rows do have, and the fix (for 'expected_answer': ``data.answer_column``).
    """
    tally = _MetadataTally(env_cls)
    tally.check_declaration()
    if not tally.keys:
        return
    for ex in examples:
        tally.add(ex)
    tally.raise_problems(what)


class _MetadataTally:
    """Counts, over examples seen one at a time, the rows lacking each required metadata key."""

    def __init__(self, env_cls: type) -> None:
        required = getattr(env_cls, "required_metadata", ()) or ()
        if isinstance(required, str):
            required = (required,)  # a common slip for ("key",)
        self.required = required
        self.name = getattr(env_cls, "__name__", repr(env_cls))
        try:
            valid = all(isinstance(key, str) for key in required)
        except TypeError:
            valid = False
        self.keys: tuple[str, ...] = tuple(required) if valid else ()
        self.total = 0
        self.lacking = {key: 0 for key in self.keys}
        self.columns: dict[str, set[str]] = {key: set() for key in self.keys}

    def check_declaration(self) -> None:
        if self.keys or not self.required:
            return
        raise ConfigError(
            f"{self.name}.required_metadata must be a tuple of metadata key names (strings), e.g. "
            f'("expected_answer",); got {self.required!r}.'
        )

    def add(self, example: Any) -> None:
        metadata = getattr(example, "metadata", example)
        if not isinstance(metadata, Mapping):
            metadata = {}
        self.total += 1
        for key in self.keys:
            if metadata.get(key) is None:
                self.lacking[key] += 1
                self.columns[key].update(str(c) for c in metadata)

    def raise_problems(self, what: str) -> None:
        self.check_declaration()
        problems = []
        for key in self.keys:
            lacking = self.lacking[key]
            if not lacking:
                continue
            columns = sorted(self.columns[key])
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
            if 0 < lacking < self.total:
                fix += "; or fill in or drop the rows without it"
            problems.append(
                f"{self.name} needs metadata {key!r} in every prompt row, but {lacking} of "
                f"{self.total} {what} lack it ({have}). {fix}."
            )
        if problems:
            raise ConfigError(" ".join(problems))


#: Task name of a single-environment run (``env.cls`` / ``env.kwargs``, ``env.tasks`` empty).
SINGLE_TASK = ""


def env_specs(
    cls: str, kwargs: Mapping[str, Any] | None, tasks: Mapping[str, Any] | None = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Task name -> (class name or import path, constructor kwargs), every entry checked.

    With ``tasks`` empty (``env.tasks`` unset) the single environment ``cls(**kwargs)`` serves every
    row, under the task name ``SINGLE_TASK``. Otherwise each ``tasks[name]`` is a mapping
    ``{"cls": ..., "kwargs": {...}}``. Raises ConfigError (naming ``env.tasks.<name>``) for a
    malformed entry, an unknown class, or kwargs its constructor does not accept.
    """
    if not tasks:
        check_env_kwargs(resolve_env_class(cls), kwargs or {})
        return {SINGLE_TASK: (cls, dict(kwargs or {}))}
    example = "env.tasks: {math: {cls: math}, weather: {cls: my_module.MyEnv, kwargs: {tolerance: 0.5}}}"
    if not isinstance(tasks, Mapping):
        raise ConfigError(f"env.tasks must map task names to environments, e.g. {example}; got {tasks!r}.")
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, spec in tasks.items():
        where = f"env.tasks.{name}"
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ConfigError(f"env.tasks has the task name {name!r}; task names must be non-empty strings "
                              f"without surrounding spaces, e.g. {example}.")
        if not isinstance(spec, Mapping) or not spec.get("cls"):
            raise ConfigError(f"{where} must be a mapping with a 'cls' (and optional 'kwargs'), got {spec!r}; "
                              f"e.g. {example}.")
        unknown = sorted(str(k) for k in spec if k not in ("cls", "kwargs"))
        if unknown:
            raise ConfigError(f"{where} has unknown keys {unknown}; an environment spec has only 'cls' and "
                              f"'kwargs' (constructor arguments), e.g. {example}.")
        task_kwargs = spec.get("kwargs") or {}
        if not isinstance(task_kwargs, Mapping):
            raise ConfigError(f"{where}.kwargs must be a mapping of constructor arguments, got {task_kwargs!r}.")
        try:
            check_env_kwargs(resolve_env_class(spec["cls"]), task_kwargs)
        except ConfigError as e:  # name the entry, not env.cls / env.kwargs
            message = str(e).replace("env.cls=", f"{where}.cls=").replace("env.kwargs", f"{where}.kwargs")
            raise ConfigError(message if where in message else f"{where}: {message}") from None
        specs[name] = (spec["cls"], dict(task_kwargs))
    return specs


def resolve_env_classes(specs: Mapping[str, tuple[str, Any]]) -> dict[str, type[Environment]]:
    """Task name -> Environment subclass, for the specs of :func:`env_specs`."""
    return {task: resolve_env_class(cls) for task, (cls, _) in specs.items()}


def row_task(example: Any) -> Any:
    """The ``task`` metadata of a prompt example (or metadata dict); None when it has none."""
    metadata = getattr(example, "metadata", example)
    task = metadata.get("task") if isinstance(metadata, Mapping) else None
    try:
        hash(task)
    except TypeError:
        return repr(task)
    return task


def check_task_data(env_classes: Mapping[str, type], examples: Iterable[Any], what: str) -> None:
    """Raise ConfigError unless every example can be scored by the environments of ``env_classes``.

    Single environment (the only key is ``SINGLE_TASK``): :func:`check_required_metadata`.
    Several tasks: every row's ``metadata["task"]`` must name a configured task (the message names
    the unknown or missing task, how many rows have it, and the configured task names), and each
    task's rows must carry that task's ``required_metadata``.
    """
    if list(env_classes) == [SINGLE_TASK]:
        check_required_metadata(env_classes[SINGLE_TASK], examples, what)
        return
    # One pass, keeping counts, not rows: the examples may be a lazy sequence of a large file.
    by_task: dict[Any, int] = {}
    tallies = {task: _MetadataTally(cls) for task, cls in env_classes.items()}
    for ex in examples:
        task = row_task(ex)
        by_task[task] = by_task.get(task, 0) + 1
        if task in tallies and tallies[task].keys:
            tallies[task].add(ex)
        elif task in tallies:
            tallies[task].total += 1
    total = sum(by_task.values())
    bad = [(task, n) for task, n in by_task.items() if task not in env_classes]
    if bad:
        configured = ", ".join(repr(t) for t in env_classes)
        parts = [
            f"{n} rows have no 'task' column" if task is None else f"{n} rows have task {task!r}"
            + _did_you_mean(str(task), list(env_classes))
            for task, n in bad
        ]
        raise ConfigError(
            f"{'; '.join(parts)} (of {total} {what}), but env.tasks configures only the tasks "
            f"{configured}. Every row's 'task' column must name one of them: add the missing tasks to "
            "env.tasks, fix the rows' task column, or tag each data.mix source with its task."
        )
    for task in by_task:
        tallies[task].raise_problems(f"{what} of task {task!r}")
