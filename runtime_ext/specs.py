"""What a lowbit node needs beyond its attributes, encoded in the node's ``overload`` string.

ONNX functions are keyed by (domain, op_type, overload) and cannot branch on a string attribute,
so each distinct variant of an op (format, block size, scale dtype, activation mode, norm kind)
gets its own fallback FunctionProto, named by the overload. The native kernel ignores the
overload and reads the attributes; both always describe the same variant because the node
builders in :mod:`lowbit.runtime_ext.nodes` write both from one spec.
"""

from __future__ import annotations

__all__ = ["MatMulSpec", "GatherSpec", "NormSpec", "FgmpSpec", "HadamardSpec", "ACT_MODES", "SCALE_DTYPES", "NORM_KINDS",
           "int8_group_reason"]

import dataclasses

from lowbit.errors import LowbitError
from lowbit.runtime_ext.hadamard import hadamard_factors
from lowbit.runtime_ext.reference import FORMATS

ACT_MODES = ("float32", "int8_dynamic", "int8_static", "int8_group")
SCALE_DTYPES = ("float32", "uint8")  # uint8: E4M3 bits (nvfp4) or E8M0 bits (mxfp4)
NORM_KINDS = ("rms", "layer")


def _check_block(block_size: int, fmt: str) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not (
            block_size == 16 or (block_size >= 32 and block_size % 32 == 0)):
        raise LowbitError(f"{fmt}: block_size must be 16 or a positive multiple of 32 for the "
                          f"lowbit ORT ops, got {block_size!r}")


def int8_group_reason(block_size: int, group) -> str | None:
    """Why MatMulLowbit's ``act_mode=int8_group`` cannot quantize activations in groups of
    ``group`` against weight blocks of ``block_size``, or None. The kernels want whole 32-element
    chunks per group and whole (power-of-two) weight blocks per group; K % group is checked at
    run time."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 32 or group % 32 or (
            group % block_size or block_size & (block_size - 1)):
        return (f"act_mode=int8_group needs act_group a positive multiple of 32 and of a power-of-two "
                f"block_size, got act_group={group!r}, block_size={block_size}")
    return None


@dataclasses.dataclass(frozen=True)
class GatherSpec:
    """A packed 4-bit table: element format, block size along the packed axis, scale dtype."""

    fmt: str  # one of FORMATS
    block_size: int  # 16 or a multiple of 32
    scale_dtype: str = "float32"  # one of SCALE_DTYPES; uint8 only for nvfp4 / mxfp4

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise LowbitError(f"unknown 4-bit format {self.fmt!r}; expected one of {FORMATS}")
        _check_block(self.block_size, self.fmt)
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if self.scale_dtype == "uint8" and self.fmt not in ("nvfp4", "mxfp4"):
            raise LowbitError(f"uint8 scales exist only for nvfp4 (E4M3) and mxfp4 (E8M0), "
                              f"not {self.fmt}")

    @property
    def overload(self) -> str:
        return f"{self.fmt}_b{self.block_size}_{self.scale_dtype}"

    @classmethod
    def from_overload(cls, overload: str) -> "GatherSpec":
        fmt, block, scale_dtype = _split(overload, 3)
        return cls(fmt, int(block[1:]), scale_dtype)


@dataclasses.dataclass(frozen=True)
class MatMulSpec(GatherSpec):
    """A packed weight (see GatherSpec) plus how activations are treated."""

    act_mode: str = "float32"  # one of ACT_MODES
    fp8_blocks: bool = False  # FGMP mixed weights: some 16-blocks stored as FP8 (nvfp4/16 only)
    act_group: int | None = None  # int8_group only: channels per run-time activation scale (G)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_mode not in ACT_MODES:
            raise LowbitError(f"act_mode must be one of {ACT_MODES}, got {self.act_mode!r}")
        if self.fp8_blocks and (self.fmt, self.block_size, self.act_mode) != (
                "nvfp4", 16, "float32"):
            raise LowbitError("FP8 blocks (mixed NVFP4/FP8 weights) need nvfp4, block_size 16 "
                              "and float32 activations")
        if self.act_mode == "int8_group":
            reason = int8_group_reason(self.block_size, self.act_group)
            if reason is not None:
                raise LowbitError(reason)
        elif self.act_group is not None:
            raise LowbitError(f"act_group is only used with act_mode=int8_group, not {self.act_mode}")

    @property
    def overload(self) -> str:
        group = f"_g{self.act_group}" if self.act_mode == "int8_group" else ""
        return f"{super().overload}_{self.act_mode}{group}" + ("_mixed" if self.fp8_blocks else "")

    @classmethod
    def from_overload(cls, overload: str) -> "MatMulSpec":
        mixed = overload.endswith("_mixed")
        fmt, block, scale_dtype, act = _split(overload.removesuffix("_mixed"), 4)
        group = None
        if act.startswith("int8_group"):
            digits = act.removeprefix("int8_group_g")
            if digits == act or not digits.isdigit():
                raise LowbitError(f"malformed lowbit overload {overload!r}")
            act, group = "int8_group", int(digits)
        return cls(fmt, int(block[1:]), scale_dtype, act, mixed, group)


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """ReorderNorm variant: norm kind and whether a beta input is present."""

    kind: str  # one of NORM_KINDS
    has_beta: bool = False

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise LowbitError(f"norm kind must be one of {NORM_KINDS}, got {self.kind!r}")

    @property
    def overload(self) -> str:
        return f"{self.kind}_beta" if self.has_beta else self.kind

    @classmethod
    def from_overload(cls, overload: str) -> "NormSpec":
        kind, _, beta = overload.partition("_")
        return cls(kind, beta == "beta")


@dataclasses.dataclass(frozen=True)
class FgmpSpec:
    """FgmpActQuant variant: NVFP4 global scale given as an input (static) or from amax(x)."""

    static_global: bool = False

    @property
    def overload(self) -> str:
        return "static" if self.static_global else "dynamic"

    @classmethod
    def from_overload(cls, overload: str) -> "FgmpSpec":
        if overload not in ("static", "dynamic"):
            raise LowbitError(f"malformed FgmpActQuant overload {overload!r}")
        return cls(overload == "static")


@dataclasses.dataclass(frozen=True)
class HadamardSpec:
    """Hadamard variant: the length n of the transformed last axis (the matrix is built from n)."""

    size: int

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or hadamard_factors(self.size) is None:
            raise LowbitError(f"Hadamard: no Hadamard matrix of order {self.size!r} (n = c * 2^k with a Paley or Sylvester base c)")

    @property
    def overload(self) -> str:
        return f"n{self.size}"

    @classmethod
    def from_overload(cls, overload: str) -> "HadamardSpec":
        if not overload.startswith("n") or not overload[1:].isdigit():
            raise LowbitError(f"malformed Hadamard overload {overload!r}")
        return cls(int(overload[1:]))


@dataclasses.dataclass(frozen=True)
class GroupQuantSpec:
    """GroupQuant variant: the number of consecutive channels sharing one run-time scale."""

    group_size: int

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise LowbitError(f"GroupQuant: group_size must be an integer >= 1, got {self.group_size!r}")

    @property
    def overload(self) -> str:
        return f"g{self.group_size}"

    @classmethod
    def from_overload(cls, overload: str) -> "GroupQuantSpec":
        if not overload.startswith("g") or not overload[1:].isdigit():
            raise LowbitError(f"malformed GroupQuant overload {overload!r}")
        return cls(int(overload[1:]))


def _split(overload: str, n: int) -> list[str]:
    # int8_dynamic / int8_static contain an underscore: split from the left n-1 times.
    parts = overload.split("_", n - 1)
    if len(parts) != n or not parts[1].startswith("b") or not parts[1][1:].isdigit():
        raise LowbitError(f"malformed lowbit overload {overload!r}")
    return parts
