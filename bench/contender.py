"""Registry of bench contenders: ways to turn an FP32 export into a (low-bit) ONNX model.

A contender is a name, a description, a note on the weight grid it produces, the model kinds it
applies to, ``build(fp32_dir, ctx) -> (model_path, compile_seconds)`` and optionally a factory
of the ORT SessionOptions its result must be run with. Contenders whose result ONNX Runtime does
not run (a peer's OpenVINO IR, GGUF, GenAI model) name their ``runtime`` and bring ``logits``
(each window's logits, which the bench scores like everyone's), ``speed`` and ``info`` (what the
build reported: weight grid, bits per weight); ``build`` raises
:class:`~lowbit.bench.peer_envs.PeerUnavailable` for a configuration that cannot run here. ``ctx`` is a
:class:`BuildContext`: the calibration data (token windows and ready-made ORT feeds, identical for
every contender of a run) and a private ``work_dir`` to write into. ``compile_seconds`` is the
wall time of the contender's own work, excluding the export.

The registry only; :mod:`lowbit.bench.contenders` fills it (peers first, then lowbit's recipes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["BuildContext", "Contender", "CONTENDERS", "register", "contenders_for", "windows_cell"]


@dataclass(frozen=True)
class BuildContext:
    """What every contender of one bench run shares."""

    feeds: tuple[dict[str, np.ndarray], ...]  # calibration batches, keyed by model input name
    windows: np.ndarray | None  # causal LMs: calibration token windows [N, T]; None for encoders
    work_dir: Path  # the contender's own empty directory
    description: str  # e.g. "8 windows x 512 tokens of the calibration split"
    # Causal LMs: how many of ``feeds`` the peers (ORT quantize_static) calibrate on -- the count
    # the lowbit recipes they are compared with use, so compile times compare like for like.
    # None: all of them.
    peer_windows: int | None = None

    def __post_init__(self) -> None:
        if not self.feeds:
            raise LowbitError("a bench needs at least one calibration batch")


@dataclass(frozen=True)
class Contender:
    name: str
    description: str
    weight_grid: str  # the grid the weights end on, e.g. "int8 per-channel symmetric"
    build: Callable[[Path, BuildContext], tuple[Path, float]] = field(repr=False)
    kinds: frozenset[str] = frozenset({"causal-lm", "encoder"})
    # Fresh onnxruntime.SessionOptions to evaluate the result with (e.g. a custom-op library
    # registered); None: ORT's defaults.
    session_options: Callable[[], Any] | None = field(default=None, repr=False)
    # Also evaluate the result in OpenVINO (CPU plugin), next to ONNX Runtime.
    openvino: bool = False
    # What the contender calibrated on, as a table cell (e.g. "8 windows"); None: no calibration.
    calibration: Callable[[BuildContext], str] | None = field(default=None, repr=False)
    runtime: str = "onnxruntime"  # what runs the result (a peer's own runtime where not ORT)
    # (model_path, windows [N, T], scratch dir) -> each window's [T, V] logits; None: ONNX Runtime
    logits: Callable[[Path, np.ndarray, Path], Iterator[np.ndarray]] | None = field(default=None, repr=False)
    # (model_path, prompt ids [T], scratch dir) -> {"prefill_ms", "decode_ms_per_token", ...}; None: ORT latency
    speed: Callable[[Path, np.ndarray, Path], dict] | None = field(default=None, repr=False)
    # model_path -> what the build reported ({"weight_grid", "bits_per_weight", "calibration_windows", "note"})
    info: Callable[[Path], dict] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise LowbitError(f"contender names are non-empty without spaces: {self.name!r}")
        unknown = set(self.kinds) - {"causal-lm", "encoder"}
        if unknown:
            raise LowbitError(f"contender {self.name}: unknown model kinds {sorted(unknown)}")


CONTENDERS: dict[str, Contender] = {}


def register(contender: Contender) -> Contender:
    """Add a contender (names are unique; registration order is the table order)."""
    if contender.name in CONTENDERS:
        raise LowbitError(f"contender {contender.name!r} is already registered")
    CONTENDERS[contender.name] = contender
    return contender


def contenders_for(kind: str, names: list[str] | None = None) -> list[Contender]:
    """Contenders applicable to ``kind``, optionally restricted to ``names`` (in that order)."""
    if names is None:
        return [c for c in CONTENDERS.values() if kind in c.kinds]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise LowbitError(f"unknown contender(s) {unknown}; known: {', '.join(CONTENDERS)}")
    return [CONTENDERS[n] for n in names if kind in CONTENDERS[n].kinds]


def windows_cell(count: int, ctx: BuildContext) -> str:
    """A calibration-column cell: ``count`` token windows (causal LMs) or text batches (encoders)."""
    unit = "window" if ctx.windows is not None else "batch"
    return f"{count} {unit}" + ("" if count == 1 else "es" if unit == "batch" else "s")
