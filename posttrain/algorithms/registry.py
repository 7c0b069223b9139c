"""Name -> function registries for the algorithm core.

The config names an advantage estimator, a policy loss and a loss aggregation by string
(``algorithm.advantage``, ``algorithm.policy_loss``, ``algorithm.loss_agg_mode``); the trainer
resolves them here. A typo becomes a :class:`~posttrain.errors.ConfigError` that lists what is
registered and suggests the nearest name, instead of a bare ``KeyError``.

The registries are filled when :mod:`posttrain.algorithms` is imported (``advantages.py``,
``losses.py`` and ``off_policy.py`` register their functions at import time); importing this
module goes through the package ``__init__`` first, so the getters below always see the built-in entries.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterator, TypeVar

from posttrain.errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry:
    """A small mapping from names to callables of one kind (e.g. "advantage estimator").

    Example::

        LOSSES = Registry("policy loss")

        @LOSSES.register("ppo_clip")
        def ppo_clip_loss(...): ...

        LOSSES.get("ppo_clip")  # -> ppo_clip_loss
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable] = {}
        self._properties: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **properties: Any) -> Callable[[F], F]:
        """Decorator registering a function under ``name``; returns the function unchanged.
        ``properties``: what the caller needs to know about the entry besides calling it, e.g.
        ``folds_kl_into_reward=True`` for an advantage estimator (read with :meth:`property`).

        Registering a name twice is a programming error (two plugins fighting over one name
        would otherwise silently depend on import order), so it raises ``ValueError``.
        """

        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
            self._entries[name] = fn
            self._properties[name] = dict(properties)
            return fn

        return decorator

    def property(self, entry: str | Callable, key: str, default: Any = None) -> Any:
        """Property ``key`` of a registered entry, given by name or as the registered function
        (``default`` when it was registered without it, or the function is not registered)."""
        if not isinstance(entry, str):
            entry = next((name for name, fn in self._entries.items() if fn is entry), "")
        return self._properties.get(entry, {}).get(key, default)

    def get(self, name: str) -> Callable:
        """The function registered as ``name``.

        Raises:
            ConfigError: unknown name; the message lists the registered names and the nearest match.
        """
        try:
            return self._entries[name]
        except KeyError:
            pass
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"Unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: "
            f"{', '.join(names) if names else '(none)'}."
        )

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
LOSS_AGGREGATIONS = Registry("loss aggregation mode")
OFF_POLICY_CORRECTIONS = Registry("off-policy correction")


def get_advantage_estimator(name: str) -> Callable:
    """The advantage estimator registered as ``name`` (e.g. "grpo"); ConfigError if unknown."""
    return ADVANTAGE_ESTIMATORS.get(name)


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered as ``name`` (e.g. "ppo_clip"); ConfigError if unknown."""
    return POLICY_LOSSES.get(name)


def get_off_policy_correction(name: str) -> Callable:
    """The off-policy correction registered as ``name`` (e.g. "icepop"); ConfigError if unknown."""
    return OFF_POLICY_CORRECTIONS.get(name)
