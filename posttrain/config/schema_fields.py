"""The two field makers every config schema uses: ``opt`` (a value with its help text) and
``section`` (a nested config). Their own module so that schema modules can import each other."""

from __future__ import annotations

import copy
from dataclasses import field
from typing import Any


def opt(default: Any, help: str, choices: tuple[Any, ...] | None = None, registry: str | None = None,
        where: dict[str, Any] | None = None) -> Any:
    """A dataclass field with a help text and, optionally, its allowed values: fixed ``choices``, or
    the names registered in ``registry`` (a registry of :mod:`posttrain.algorithms`, e.g.
    "POLICY_LOSSES"), those whose registered properties match ``where`` when given; the config then
    offers exactly what is registered, with no second list to keep in step."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if registry is not None:
        metadata["registry"] = (registry, dict(where or {}))
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})
