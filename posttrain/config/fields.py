"""Walking the config schemas: every option's dotted key, type, default, help and choices.

The loader (unknown keys, types), the validators (choices) and the reference (``--help``,
docs/config.md) all read the schemas through these functions.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any, NamedTuple


class FieldInfo(NamedTuple):
    """One leaf option of a schema (a plain tuple, so it also unpacks as 5 values)."""

    key: str  # full dotted path, e.g. "trainer.lr"
    type_name: str  # e.g. "float", "list", "dict"
    default: Any
    help: str
    choices: tuple[Any, ...] | None


class SectionInfo(NamedTuple):
    """A nested dataclass of a schema; ``key`` is "" for the schema's top level."""

    key: str
    help: str


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (the schema uses ``from __future__ import annotations``)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        # Classes defined inside a function cannot be resolved by name; take what we can.
        return {f.name: f.type for f in dataclasses.fields(cls)}


def type_name(tp: Any) -> str:
    """Short readable name of a field type: ``int``, ``list``, ``list[str]``, ``str | None``."""
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):  # Optional[...] / int | str
        names = [type_name(a) for a in args]
        if len(args) < len(typing.get_args(tp)):
            names.append("None")
        return " | ".join(names)
    base = getattr(origin, "__name__", str(origin))
    if not args or all(a is Any for a in args):
        return base
    return f"{base}[{', '.join(type_name(a) for a in args)}]"


def format_value(value: Any) -> str:
    """A value as a user would write it in YAML or a ``key=value`` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def iter_sections(schema: type, prefix: str = "", help: str = "") -> Iterator[SectionInfo]:
    """Yield the schema's top level (key "") and every nested dataclass, depth first."""
    yield SectionInfo(prefix, help)
    types = field_types(schema)
    for f in dataclasses.fields(schema):
        tp = types[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_sections(tp, f"{prefix}{f.name}.", f.metadata.get("help", ""))


def iter_fields(schema: type, prefix: str = "") -> Iterator[FieldInfo]:
    """Yield ``(dotted_key, type_name, default, help, choices)`` for every leaf option.

    Nested dataclasses are walked (their fields get dotted keys); free-form ``dict`` and
    ``list`` fields are leaves.
    """
    types = field_types(schema)
    for f in dataclasses.fields(schema):
        tp = types[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, key + ".")
            continue
        yield FieldInfo(key, type_name(tp), _default_of(f), f.metadata.get("help", ""), field_choices(f))


def field_choices(f: dataclasses.Field) -> tuple[Any, ...] | None:
    """The values a field allows: its fixed choices, or the names in its registry (see ``opt``)."""
    if "registry" in f.metadata:
        # Inside the function: the registries fill as posttrain.algorithms imports torch (1.7 s),
        # which the loader and `posttrain --help` without these options do not wait for.
        import posttrain.algorithms as algorithms

        name, where = f.metadata["registry"]
        registry = getattr(algorithms, name)
        return tuple(n for n in registry.names() if all(registry.property(n, k) == v for k, v in where.items()))
    choices = f.metadata.get("choices")
    return tuple(choices) if choices is not None else None
