"""Typed analyses shared between passes, and the pass base class that declares them.

An analysis is a fact about the model being compiled that more than one pass needs: the
linear-site map, calibration statistics, weight encodings, cluster labels, the precision
assignment. Each has one :class:`Key`, defined next to the type of its value (the lowest layer
that owns the type), so a reader of ``ctx.analyses.get(ACTIVATION_STATS)`` gets an
``ActivationStats`` and a type checker knows it.

Invalidation is explicit and by kind: a key marked ``structural`` describes the graph's structure
(which MatMul reads which weight), so it is dropped after any pass that edits the graph and rebuilt
on the next read; the others describe values (statistics, encodings) that function-preserving
rewrites keep exact in closed form (``passes.capture.transform_channels``), so they survive those
passes and are dropped only by a pass that lists them in ``INVALIDATES``.

Passes derive from :class:`lowbit.core.pass_base.LowbitPass` and declare ``REQUIRES`` (checked before the pass runs:
a missing analysis is a bug in the pipeline, named in the error) and ``ENSURES`` (checked after:
a pass that promised an analysis must leave it). The compile report is written by passes and never
read by them: a decision one pass hands to another is an analysis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from lowbit.formats import Encoded

__all__ = ["WEIGHT_ENCODINGS", "Analyses", "Key"]

T = TypeVar("T")


class Key(Generic[T]):
    """The name, meaning and invalidation kind of one analysis whose value is a ``T``."""

    def __init__(self, name: str, doc: str, *, structural: bool = False) -> None:
        self.name, self.doc, self.structural = name, doc, structural

    def __repr__(self) -> str:
        return f"Key({self.name!r})"


class Analyses:
    """Analysis values by key; a key with a registered builder is computed on first read."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._keys: dict[str, Key] = {}
        self._builders: dict[str, Callable[[], Any]] = {}

    def register(self, key: Key[T], builder: Callable[[], T]) -> None:
        self._keys[key.name], self._builders[key.name] = key, builder

    def put(self, key: Key[T], value: T) -> None:
        self._keys[key.name] = key
        self._values[key.name] = value

    def has(self, key: Key) -> bool:
        return key.name in self._values or key.name in self._builders

    def get(self, key: Key[T]) -> T:
        if key.name not in self._values:
            if key.name not in self._builders:
                raise KeyError(f"analysis {key.name!r} ({key.doc}) is not available; did its pass run?")
            self._values[key.name] = self._builders[key.name]()
        return self._values[key.name]

    def find(self, key: Key[T]) -> T | None:
        """The value when it exists or can be built, else None."""
        return self.get(key) if self.has(key) else None

    def invalidate(self, *keys: Key) -> None:
        for key in keys:
            self._values.pop(key.name, None)

    def graph_edited(self) -> None:
        """Drop every structural analysis (rebuilt from the edited graph on the next read)."""
        for name, key in self._keys.items():
            if key.structural:
                self._values.pop(name, None)

    def available(self) -> list[str]:
        return sorted(set(self._values) | set(self._builders))


# Shared by every rounding pass (RTN, OPTQ) and read by every emitter: site name -> exact encoding
# in the stored orientation of the site's initializer.
WEIGHT_ENCODINGS: Key[dict[str, Encoded]] = Key("weight_encodings", "exact per-site weight encodings")
