"""The named, scaled formats lowbit knows, and lookup by name.

A :class:`ScaledFormat` pairs an element format (INT-b, dINT-b, E4M3, E5M2, E2M1) with the kind
of scale its blocks carry:

- ``FLOAT32``: one float32 scale per block (INT-b, dINT-b, plain fp8/fp4), chosen by a scale
  chooser; INT-b also supports asymmetric scaling with an int32 zero point;
- ``NVFP4``: E4M3-representable block scales times one float32 per-tensor scale (NVIDIA NVFP4);
- ``E8M0``: power-of-two block scales (OCP MX).

Names: ``int2``..``int8``, ``dint2``..``dint8``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1``,
``nvfp4``, ``mxfp4``, ``mxfp8``. An unknown name is a :class:`~lowbit.errors.LowbitError` that
lists the known ones.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats import constants as C
from lowbit.formats.dint import DintElement
from lowbit.formats.element import ElementFormat
from lowbit.formats.integer import IntElement
from lowbit.formats.minifloat import FP4_E2M1, FP8_E4M3, FP8_E5M2

__all__ = ["ScaleKind", "ScaledFormat", "FORMATS", "get_format", "code_table", "integer_codes"]


class ScaleKind(enum.Enum):
    """How a block's scale is represented."""

    FLOAT32 = "float32"  # any positive float32; symmetric: absmax / element max
    NVFP4 = "nvfp4"  # E4M3(block_amax / (6 * g)) times per-tensor FP32 g = tensor_amax / (6 * 448)
    E8M0 = "e8m0"  # 2^(floor(log2(block_amax)) - emax_elem), OCP MX v1.0


@dataclasses.dataclass(frozen=True)
class ScaledFormat:
    """A named format: element grid + scale kind (+ the MX element emax, the default block)."""

    name: str
    element: ElementFormat
    scale_kind: ScaleKind
    default_block_size: int | None = None
    mx_emax: int | None = None  # exponent of the element's largest normal (E8M0 scale rule)

    def __post_init__(self) -> None:
        if (self.scale_kind is ScaleKind.E8M0) != (self.mx_emax is not None):
            raise LowbitError(f"{self.name}: mx_emax is required exactly for E8M0-scaled formats")
        if self.default_block_size is not None and self.default_block_size < 1:
            raise LowbitError(f"{self.name}: default block size must be positive")

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def max_value(self) -> float:
        """Largest element magnitude (before scaling)."""
        return self.element.max_value

    @property
    def grid(self) -> np.ndarray:
        """Sorted distinct finite element values (before scaling), float32."""
        return self.element.grid

    @property
    def supports_asymmetric(self) -> bool:
        return isinstance(self.element, IntElement) and self.scale_kind is ScaleKind.FLOAT32

    @property
    def half_step_storage(self) -> bool:
        """Elements are multiples of 1/2 but not all integers (dINT, E2M1-based) and 2 * value fits
        int8: stored exactly in standard ONNX as int8 codes of 2 * value with half the scale
        (dINT8, whose 2 * 127 does not fit, has no exact standard-ONNX storage)."""
        grid = self.element.grid.astype(np.float64)
        halves = np.all(2 * grid == np.rint(2 * grid)) and not np.all(grid == np.rint(grid))
        return bool(halves and 2 * np.abs(grid).max() <= 127)

    def block_size(self, requested: int | None) -> int | None:
        """The block size a tensor of this format uses: ``requested`` (0/None = none asked), else
        the format's own (16 for NVFP4, 32 for MX), else None (per channel)."""
        return requested or self.default_block_size


def _build() -> dict[str, ScaledFormat]:
    formats: dict[str, ScaledFormat] = {}
    for b in range(2, 9):
        formats[f"int{b}"] = ScaledFormat(f"int{b}", IntElement(f"int{b}", b), ScaleKind.FLOAT32)
    for b in range(2, 9):
        formats[f"dint{b}"] = ScaledFormat(f"dint{b}", DintElement(f"dint{b}", b),
                                           ScaleKind.FLOAT32)
    for element in (FP8_E4M3, FP8_E5M2, FP4_E2M1):
        formats[element.name] = ScaledFormat(element.name, element, ScaleKind.FLOAT32)
    formats["nvfp4"] = ScaledFormat("nvfp4", FP4_E2M1, ScaleKind.NVFP4, C.NVFP4_BLOCK)
    formats["mxfp4"] = ScaledFormat("mxfp4", FP4_E2M1, ScaleKind.E8M0, C.MX_BLOCK, C.MX_E2M1_EMAX)
    formats["mxfp8"] = ScaledFormat("mxfp8", FP8_E4M3, ScaleKind.E8M0, C.MX_BLOCK, C.MX_E4M3_EMAX)
    return formats


FORMATS: dict[str, ScaledFormat] = _build()


def get_format(name: str | ScaledFormat) -> ScaledFormat:
    """The :class:`ScaledFormat` called ``name`` (a ScaledFormat is returned unchanged)."""
    if isinstance(name, ScaledFormat):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise LowbitError(
            f"unknown number format {name!r}; known formats: {', '.join(FORMATS)}"
        ) from None


def code_table(fmt: str | ScaledFormat) -> np.ndarray:
    """float32 array of length 2**bits: the element value of each code (before scaling).

    For nvfp4/mxfp4 this is the E2M1 table (16 entries), for mxfp8 the E4M3 one (256).
    """
    return get_format(fmt).element.code_table()


_INTEGER_BITS = {"int4": 4, "int8": 8, "int16": 16}


def integer_codes(name: str, signed: bool = True) -> tuple[int, int]:
    """(lowest, highest code) of an integer activation or K/V format ``int4`` / ``int8`` /
    ``int16``: signed two's complement, or unsigned codes with a zero point (``signed=False``).
    How the codes are stored in a graph is the emitters' business (``core.initializers``)."""
    bits = _INTEGER_BITS.get(name)
    if bits is None:
        raise LowbitError(f"{name!r} is not an integer code format ({', '.join(_INTEGER_BITS)})")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
