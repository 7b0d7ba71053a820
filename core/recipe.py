"""Recipes: named TOML files mapped onto frozen, validated dataclasses.

Every key is a dataclass field documented once, in its ``doc`` metadata; ``lowbit recipes``
prints those docs. Unknown keys and bad values raise :class:`LowbitError` naming the key, so a
typo never silently falls back to a default. ``--set section.key=value`` overrides any key.

The dataclasses check themselves (:class:`_Spec`): every field against its annotation (ints are
not bools, floats are finite, list elements have the element type), then each section's ranges
and combinations -- so a ``Recipe`` built in Python is held to the same rules as a TOML file.
Recipe files are regular UTF-8 files of at most :data:`MAX_RECIPE_BYTES`; values quoted in
messages are shortened so that every message stays one line.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import reprlib
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.formats import ScaleKind, get_format

__all__ = [
    "ActivationSpec",
    "CalibrationSpec",
    "KVCacheSpec",
    "NpuSpec",
    "OrtCpuSpec",
    "PrecisionSpec",
    "ReorderSpec",
    "RotateSpec",
    "RoundingSpec",
    "SmoothSpec",
    "Recipe",
    "SiteSpec",
    "WeightSpec",
    "available_recipes",
    "describe_keys",
    "load_recipe",
    "parse_override",
]

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"

WEIGHT_FORMATS = (
    "int8", "int4", "int2", "int3", "int5", "int6", "int7", "dint4", "dint3", "dint5",
    "fp8_e4m3", "fp4_e2m1", "nvfp4", "mxfp4", "mxfp8", "none",
)  # fmt: skip
ACTIVATION_FORMATS = ("int8", "int16", "int4", "fp8_e4m3", "none")  # int4: symmetric only
TARGETS = ("qdq", "qdq-fp4", "ort-cpu", "npu")


def _doc(text: str, default: Any) -> Any:
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise LowbitError(f"recipe key '{key}': {message}")


# Values quoted in messages are cut short: a recipe value can be a megabyte string or a deeply
# nested list, and the message must stay one readable line (repr escapes control characters).
_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 4, 4, 2


def _show(value: Any) -> str:
    try:
        return _repr.repr(value)
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        return f"<a {type(value).__name__} too long to print>"


_SCALAR_TYPES = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}


def _scalar(value: Any, ftype: str) -> Any:
    """``value`` as the field type ``ftype`` (int, float, bool, str), or raise ``TypeError``."""
    if ftype == "bool":
        if isinstance(value, bool):
            return value
    elif ftype == "int":
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif ftype == "float":
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float range
                number = math.inf
            if math.isfinite(number):
                return number
    elif ftype == "str":
        if isinstance(value, str):
            return value
    raise TypeError(ftype)


def _typed(value: Any, ftype: str, key: str) -> Any:
    """Check ``value`` against a field annotation (``int``, ``float``, ``bool``, ``str``,
    ``tuple[T, ...]``, or a section class name) and normalise it (int -> float, list -> tuple)."""
    if ftype in _SCALAR_TYPES:
        try:
            return _scalar(value, ftype)
        except TypeError:
            raise LowbitError(f"recipe key {key!r} must be {ftype} ({_SCALAR_TYPES[ftype]}), got {_show(value)}") from None
    if ftype.startswith("tuple[") and ftype.endswith(", ...]"):
        elem = ftype[len("tuple["):-len(", ...]")]
        if not isinstance(value, (list, tuple)):
            raise LowbitError(f"recipe key {key!r} must be a list of {elem}, got {_show(value)}")
        items = []
        for v in value:
            try:
                items.append(_scalar(v, elem))
            except TypeError:
                raise LowbitError(f"recipe key {key!r} must be a list of {elem} ({_SCALAR_TYPES[elem]} each), "
                                  f"got {_show(v)} in it") from None  # fmt: skip
        return tuple(items)
    section = _SECTIONS.get(key)
    if section is not None and section.__name__ == ftype:
        if not isinstance(value, section):
            raise LowbitError(f"recipe key {key!r} must be a table, got {_show(value)}")
        return value
    raise AssertionError(f"recipe field {key} has an annotation the checker does not know: {ftype}")


class _Spec:
    """Base of every recipe section: each field is checked against its annotation (so a value of
    the wrong type fails naming its key, whether it came from TOML, ``--set`` or Python), then
    the section's own ``_validate`` checks ranges and combinations."""

    def __post_init__(self) -> None:
        section = _SECTION_NAMES.get(type(self), "")
        for f in dataclasses.fields(self):
            key = f"{section}.{f.name}" if section else f.name
            value = getattr(self, f.name)
            checked = _typed(value, f.type, key)
            if checked is not value:
                object.__setattr__(self, f.name, checked)  # frozen: normalise in place
        self._validate()

    def _validate(self) -> None:
        pass


@dataclass(frozen=True)
class WeightSpec(_Spec):
    format: str = _doc("weight format (a lowbit.formats name, or 'none' to keep float)", "int8")
    block_size: int = _doc("0 = one scale per output channel; >0 = blocks of this size along the reduction axis", 0)
    symmetric: bool = _doc("symmetric (zero point 0) integer weights; false = asymmetric with zero point", True)
    scale_method: str = _doc("weight scale chooser: absmax | mse (clip-ratio search)", "absmax")

    def _validate(self) -> None:
        _require(self.format in WEIGHT_FORMATS, "weights.format", f"{_show(self.format)} is not one of {', '.join(WEIGHT_FORMATS)}")
        _require(self.block_size >= 0, "weights.block_size", "must be >= 0")
        _require(self.scale_method in ("absmax", "mse"), "weights.scale_method", f"{_show(self.scale_method)} is not absmax or mse")
        _require(self.symmetric or self.format.startswith("int"), "weights.symmetric", "only int formats can be asymmetric")


@dataclass(frozen=True)
class ActivationSpec(_Spec):
    format: str = _doc("activation format at every linear-site input: int8 | int16 | int4 | fp8_e4m3 | none", "int8")
    symmetric: bool = _doc("int8/int16: symmetric signed codes; false = uint8/uint16 with a zero point (ORT's default)", False)
    granularity: str = _doc("per_tensor | per_channel static scales from calibration | per_token_group: symmetric scale computed at run time per token and group of group_size contiguous channels (after any RPTQ reorder), standard ops", "per_tensor")
    range: str = _doc("calibrated range: minmax | percentile", "minmax")
    percentile: float = _doc("percentile of |x| per channel used when range = percentile", 99.99)
    group_size: int = _doc("per_token_group: channels per group; where it does not divide an input's channels, the largest divisor below it (at least 8, or group_size if smaller; the report gives each site's); 0 = the whole token", 0)
    outlier_format: str = _doc("per_token_group with RPTQ: none | int8 -- groups holding the widest-range cluster's channels use int8 codes (the report gives the average bits)", "none")

    def _validate(self) -> None:
        _require(self.format in ACTIVATION_FORMATS, "activations.format", f"{_show(self.format)} is not one of {', '.join(ACTIVATION_FORMATS)}")
        _require(self.format != "int4" or self.symmetric, "activations.symmetric", "int4 activations are symmetric (set symmetric = true)")
        _require(self.granularity in ("per_tensor", "per_channel", "per_token_group"), "activations.granularity", f"{_show(self.granularity)} is not per_tensor, per_channel or per_token_group")
        dynamic = self.granularity == "per_token_group"
        _require(not dynamic or self.format == "none" or (self.format in ("int8", "int4") and self.symmetric),
                 "activations.granularity", "per_token_group takes symmetric int8 or int4 activations")
        _require(self.group_size >= 0, "activations.group_size", "must be >= 0")
        _require(self.group_size == 0 or dynamic, "activations.group_size", "needs granularity = per_token_group")
        _require(self.outlier_format in ("none", "int8"), "activations.outlier_format", f"{_show(self.outlier_format)} is not none or int8")
        _require(self.outlier_format == "none" or (dynamic and self.format == "int4"), "activations.outlier_format", "needs granularity = per_token_group and format = int4")
        _require(self.range in ("minmax", "percentile"), "activations.range", f"{_show(self.range)} is not minmax or percentile")
        _require(50.0 < self.percentile <= 100.0, "activations.percentile", "must be in (50, 100]")


@dataclass(frozen=True)
class CalibrationSpec(_Spec):
    seq_len: int = _doc("deploy sequence length: calibration windows have this many tokens (SLAC)", 512)
    windows: int = _doc("number of calibration windows at seq_len", 8)
    slac_lengths: tuple[int, ...] = _doc("extra sequence lengths probed for the SLAC range table", (64, 128, 256))
    slac_windows: int = _doc("windows per extra SLAC length", 2)
    sequential: bool = _doc("GPTQ-style: compile block by block, each block observed on the outputs of the blocks before "
                            "it as quantized (one extra run of each block; any model size)", False)

    def _validate(self) -> None:
        _require(self.seq_len >= 1, "calibration.seq_len", "must be >= 1")
        _require(self.windows >= 1, "calibration.windows", "must be >= 1")
        _require(all(n >= 1 for n in self.slac_lengths), "calibration.slac_lengths", "lengths must be >= 1")
        _require(self.slac_windows >= 0, "calibration.slac_windows", "must be >= 0")


@dataclass(frozen=True)
class SiteSpec(_Spec):
    exclude: tuple[str, ...] = _doc("fnmatch patterns over site names (weight initializer names) kept in float", ())
    int8_weights: tuple[str, ...] = _doc("fnmatch patterns over site names whose weights are int8 with one scale per "
                                         "output channel (round to nearest) whatever weights.format, e.g. the LM head, "
                                         "which llama.cpp and NNCF also keep at 8 bits", ())
    embeddings: str = _doc("token-embedding tables: float (as exported) | int8 (one scale per row, round to nearest, looked up "
                           "by standard Gather + Cast + Mul; a table tied to an LM head in sites.int8_weights holds the same "
                           "codes, so the file keeps one copy; with rotate.residual the head stays tied through one "
                           "float hidden x hidden MatMul after the final norm)", "float")

    def _validate(self) -> None:
        _require(self.embeddings in ("float", "int8"), "sites.embeddings", f"{_show(self.embeddings)} is not float or int8")


FEEDER_KINDS = ("norm", "attention_v", "gated_linear", "activated_linear")


@dataclass(frozen=True)
class SmoothSpec(_Spec):
    method: str = _doc("equivalent per-channel scaling folded into producers: none | smoothquant | awq | aqas", "none")
    alpha_grid: tuple[float, ...] = _doc("migration strengths searched per input group (the output-error objective picks one)", (0.0, 0.15, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85))
    feeders: tuple[str, ...] = _doc("producer kinds scales may be folded into: norm | attention_v | gated_linear | activated_linear "
                                    "(fc1 before a ReLU)", FEEDER_KINDS)
    sample_tokens: int = _doc("calibration rows kept per input group for the scale search (and OPTQ's X^T X uses all rows)", 512)

    def _validate(self) -> None:
        _require(self.method in ("none", "smoothquant", "awq", "aqas"), "smooth.method", f"{_show(self.method)} is not none, smoothquant, awq or aqas")
        _require(len(self.alpha_grid) > 0 and all(0.0 <= a <= 1.0 for a in self.alpha_grid), "smooth.alpha_grid", "needs values in [0, 1]")
        _require(all(k in FEEDER_KINDS for k in self.feeders), "smooth.feeders", f"kinds must be among {', '.join(FEEDER_KINDS)}")
        _require(self.sample_tokens >= 16, "smooth.sample_tokens", "must be >= 16")


@dataclass(frozen=True)
class ReorderSpec(_Spec):
    clusters: int = _doc("RPTQ: K-means clusters of channels by calibrated (min, max) per site input; 0 = off", 0)
    # attention_v is opt-in: on SmolLM2 w4a8-dint4 it measured 17.19 vs 17.09 without (BASIC, 8 x 512)
    feeders: tuple[str, ...] = _doc("inputs to reorder, by producer kind: norm (Gather + permuted gamma), gated_linear (permuted gate/up columns), activated_linear (fc1's columns before a ReLU), attention_v (o_proj inputs sorted inside each head: v_proj columns + o_proj rows); every other quantized input gets per-cluster ranges without reordering", ("norm", "gated_linear"))

    def _validate(self) -> None:
        _require(self.clusters >= 0, "reorder.clusters", "must be >= 0")
        _require(all(k in FEEDER_KINDS for k in self.feeders), "reorder.feeders", f"kinds must be among {', '.join(FEEDER_KINDS)}")


ONLINE_ROTATION_KINDS = ("gated_linear", "attention_qk")


@dataclass(frozen=True)
class RotateSpec(_Spec):
    residual: bool = _doc("R1: rotate a pre-norm decoder's residual stream by a randomized Hadamard matrix of the hidden "
                          "size, in the weights (norm scales folded into the linears they feed, embedding rotated, a "
                          "tied LM head untied); a post-LN or LayerNorm model is left as it is, with the reason in the report", False)
    heads: bool = _doc("R2: rotate each attention head's V channels by a Hadamard matrix of the head size (v_proj "
                       "columns, o_proj rows), in the weights", False)
    online: tuple[str, ...] = _doc("values rotated at run time by a lowbit Hadamard op: gated_linear (down_proj's "
                                   "input, the SwiGLU product; the inverse folded into down_proj) | attention_qk (Q "
                                   "and K where attention reads them, after the rotary embedding: for K-cache "
                                   "quantization; Q K^T is unchanged)", ())
    seed: int = _doc("seed of the rotations' random signs", 0)

    def _validate(self) -> None:
        _require(all(k in ONLINE_ROTATION_KINDS for k in self.online), "rotate.online", f"kinds must be among {', '.join(ONLINE_ROTATION_KINDS)}")
        _require(self.seed >= 0, "rotate.seed", "must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.residual or self.heads or bool(self.online)


@dataclass(frozen=True)
class RoundingSpec(_Spec):
    method: str = _doc("weight rounding: rtn (round to nearest) | optq (GPTQ second-order error compensation with X^T X)", "rtn")
    damp: float = _doc("optq: damping added to the Hessian diagonal, as a fraction of its mean", 0.01)
    act_order: bool = _doc("optq: quantize input channels in order of decreasing Hessian diagonal (per-channel scales only)", False)
    refit_scales: bool = _doc("optq: with the codes fixed, refit each output column's scales by least squares on OPTQ's objective (kept only where it lowers the error; SmolLM2 w4a8-dint4 17.12 -> 16.96)", True)

    def _validate(self) -> None:
        _require(self.method in ("rtn", "optq"), "rounding.method", f"{_show(self.method)} is not rtn or optq")
        _require(0.0 < self.damp < 1.0, "rounding.damp", "must be in (0, 1)")


@dataclass(frozen=True)
class KVCacheSpec(_Spec):
    format: str = _doc("K/V (attention inputs) quantization: none | int8 | int4 (static, calibrated ranges)", "none")
    granularity: str = _doc("per_channel: one scale per head and head_dim channel | per_head: one per attention head | "
                            "per_tensor: one per K or V", "per_head")  # fmt: skip
    symmetric: bool = _doc("symmetric codes (true) or unsigned codes with a zero point from the calibrated min/max (false)", True)
    range: str = _doc("absmax: calibrated min/max | percentile: clip each channel at the mean over calibration windows "
                      "of its kv.percentile of |x| (int4 absmax is very sensitive to rare peaks)", "absmax")  # fmt: skip
    percentile: float = _doc("kv.range = percentile: the per-window percentile of |x|, in (0, 100]", 99.9)
    dynamic_k: bool = _doc("K: static per-channel scales normalise channels, then one int scale per token and head is "
                           "computed at run time (max over head_dim); V stays static unless kv.dynamic_v", False)  # fmt: skip
    dynamic_v: bool = _doc("V, as kv.dynamic_k does for K: static per-channel scales normalise channels, then one int "
                           "scale per token and head at run time", False)  # fmt: skip

    def _validate(self) -> None:
        _require(self.format in ("none", "int8", "int4"), "kv.format", f"{_show(self.format)} is not none, int8 or int4")
        _require(self.granularity in ("per_channel", "per_head", "per_tensor"), "kv.granularity",
                 f"{_show(self.granularity)} is not per_channel, per_head or per_tensor")  # fmt: skip
        _require(self.range in ("absmax", "percentile"), "kv.range", f"{_show(self.range)} is not absmax or percentile")
        _require(0.0 < self.percentile <= 100.0, "kv.percentile", "must be in (0, 100]")
        _require(self.symmetric or not self.dynamic_k, "kv.dynamic_k", "needs kv.symmetric = true")
        _require(self.symmetric or not self.dynamic_v, "kv.dynamic_v", "needs kv.symmetric = true")


@dataclass(frozen=True)
class PrecisionSpec(_Spec):
    enabled: bool = _doc("FGMP: weights.format (nvfp4) blocks of 16, the most sensitive kept in FP8 E4M3", False)
    assignment: str = _doc("which blocks keep FP8: fgmp (Fisher impact, global threshold) | random | per_layer (whole sites)", "fgmp")
    fp8_fraction: float = _doc("fraction of weight blocks kept in FP8 (ties at the threshold broken by position)", 0.3)
    avg_bits: float = _doc("if > 0: target average bits per weight instead (NVFP4 block 4.5, FP8 block 8.0)", 0.0)
    sensitivity: str = _doc("g^2 source: auto | fisher (side file or shipped model, torch) | proxy (diag(X^T X))", "auto")
    fisher_file: str = _doc("npz of empirical Fisher keyed weight/<site> (lowbit.models.fisher); '' = compute or proxy", "")
    clip: str = _doc("NVFP4 block scale chooser: fisher (sensitivity-weighted clip search) | mse | absmax", "fisher")
    seed: int = _doc("random seed of assignment = random", 0)
    activations: str = _doc("uniform: activations.format QDQ at every input | static: FP8 E4M3 or E2M1 per input channel, chosen from calibration, standard ops | runtime: FgmpActQuant per token-block of 16 (static and runtime need activations.format = none)", "uniform")
    act_fp8_fraction: float = _doc("static / runtime activations: fraction of FP8 channel blocks (static) or token-blocks on calibration data (runtime); < 0 = the weights' budget", -1.0)

    def _validate(self) -> None:
        _require(self.assignment in ("fgmp", "random", "per_layer"), "precision.assignment", f"{_show(self.assignment)} is not fgmp, random or per_layer")
        _require(0.0 <= self.fp8_fraction <= 1.0, "precision.fp8_fraction", "must be in [0, 1]")
        _require(self.avg_bits == 0.0 or 4.5 <= self.avg_bits <= 8.0, "precision.avg_bits", "must be 0 or in [4.5, 8.0]")
        _require(self.sensitivity in ("auto", "fisher", "proxy"), "precision.sensitivity", f"{_show(self.sensitivity)} is not auto, fisher or proxy")
        _require(self.clip in ("fisher", "mse", "absmax"), "precision.clip", f"{_show(self.clip)} is not fisher, mse or absmax")
        _require(self.activations in ("uniform", "static", "runtime"), "precision.activations", f"{_show(self.activations)} is not uniform, static or runtime")
        _require(self.act_fp8_fraction <= 1.0, "precision.act_fp8_fraction", "must be <= 1 (< 0: the weights' budget)")
        _require(self.seed >= 0, "precision.seed", "must be >= 0")
        if self.fisher_file:  # the file's layout now, not after minutes of calibration
            from lowbit.core.fisher_file import check_fisher_file

            check_fisher_file(self.fisher_file, "recipe key 'precision.fisher_file'")


@dataclass(frozen=True)
class OrtCpuSpec(_Spec):
    embeddings: bool = _doc("target ort-cpu: store the token-embedding table in packed 4 bits (GatherLowbit, weights.format); a tied lm_head shares the table", False)
    dynamic_activations: bool = _doc("target ort-cpu: 4-bit sites with float inputs quantize them to int8 per row at run time (W4A8 kernels; faster decode, no longer equal to the qdq model)", False)
    fuse_attention: bool = _doc("target ort-cpu: each exported eager-attention block (rotary, K/V cache concat, head repeat, masked softmax) becomes the standard RotaryEmbedding + Attention (opset 23, the ort-cpu target's output opset): the same function up to float32 rounding, ~45 fewer nodes per layer at every decode step", True)
    merge_siblings: bool = _doc("target ort-cpu: the MatMulLowbit nodes that read one activation (q/k/v, gate/up) become one node over their concatenated weights and a Split: the same outputs, one dispatch and one activation quantization instead of three or two", True)


@dataclass(frozen=True)
class NpuSpec(_Spec):
    power_of_two_scales: str = _doc("target npu: round every weight-channel and activation-cluster scale to a power of two: none | ceil (up: never clips, costs up to 1 bit) | nearest (in log2: may clip the largest values by up to sqrt 2)", "none")
    int4_storage: str = _doc("target npu, int4 weights: int8 (codes in [-7, 7] in int8 tensors: integer kernels in ORT CPU and OpenVINO) | int4 (INT4 tensors, half the size; ORT CPU runs them in float)", "int8")

    def _validate(self) -> None:
        _require(self.power_of_two_scales in ("none", "ceil", "nearest"), "npu.power_of_two_scales", f"{_show(self.power_of_two_scales)} is not none, ceil or nearest")
        _require(self.int4_storage in ("int8", "int4"), "npu.int4_storage", f"{_show(self.int4_storage)} is not int8 or int4")


NPU_WEIGHT_FORMATS = ("int8", "int7", "int6", "int5", "int4", "int3", "int2", "none")


def _check_int8_weights(r: Recipe) -> None:
    if r.sites.int8_weights:
        _require(r.weights.format != "none", "sites.int8_weights", "needs weights.format (the other sites' grid)")
        _require(not r.precision.enabled, "sites.int8_weights", "FGMP assigns formats itself (precision.enabled)")
        _require(r.target != "npu", "sites.int8_weights", "target npu has one weight grid")


def _check_npu(r: Recipe) -> None:
    """The npu target emits standard integer QDQ only: refuse what it cannot express."""
    _require(r.weights.format in NPU_WEIGHT_FORMATS, "weights.format", f"target npu takes symmetric integer weights ({', '.join(NPU_WEIGHT_FORMATS)}), not {_show(r.weights.format)}")
    _require(r.weights.block_size == 0, "weights.block_size", "target npu uses one scale per output channel (set 0)")
    _require(r.weights.symmetric, "weights.symmetric", "target npu weights are symmetric (zero point 0)")
    _require(r.activations.format in ("int8", "int16", "none"), "activations.format", f"target npu takes int8, int16 or none, not {_show(r.activations.format)}")
    _require(r.activations.granularity == "per_tensor", "activations.granularity", "target npu uses static per-tensor activation scales (RPTQ clusters get one each): "
             "use the npu-w8a8 recipe, or --set activations.granularity=per_tensor")
    _require(not r.precision.enabled, "precision.enabled", "target npu has no FP4/FP8 mixed precision")
    _require(r.kv.format == "none", "kv.format", "target npu does not quantize K/V (set none)")
    _require(not r.rotate.online, "rotate.online", "target npu takes standard ops only: the online Hadamard is a lowbit op (rotate.residual and rotate.heads are weights only)")
    _require(r.npu.power_of_two_scales == "none" or r.rounding.method == "rtn", "npu.power_of_two_scales", "needs rounding.method = rtn (OPTQ rounds on its own scales)")


def _check_cross_sections(r: Recipe) -> None:
    """Rules between sections, checked before any model is loaded (a pass would otherwise find
    them only after minutes of calibration, or silently do less than the recipe says)."""
    w, a, p = r.weights, r.activations, r.precision
    if w.format != "none":
        fmt = get_format(w.format)
        fixed = fmt.scale_kind is not ScaleKind.FLOAT32  # NVFP4 / MX scales are defined per block
        _require(not fixed or w.block_size in (0, fmt.default_block_size), "weights.block_size",
                 f"{w.format} blocks are {fmt.default_block_size} by definition (set 0 or {fmt.default_block_size})")
    if r.rounding.method == "optq":
        _require(w.format == "none" or (w.format.startswith(("int", "dint")) and w.symmetric), "rounding.method",
                 f"optq rounds symmetric int or dint weights, not {_show(w.format)}{'' if w.symmetric else ' (asymmetric)'}")
    if r.reorder.clusters:
        _require(a.format != "none", "reorder.clusters",
                 "RPTQ clusters set per-cluster activation ranges: needs activations.format (or set 0)")
    if p.enabled:
        _require(w.format == "nvfp4", "weights.format",
                 f"precision.enabled mixes NVFP4 and FP8 blocks: set weights.format = 'nvfp4' (got {_show(w.format)})")
        _require(p.activations == "uniform" or a.format == "none", "activations.format",
                 f"precision.activations = {_show(p.activations)} quantizes activations itself: set activations.format = 'none'")
    else:
        _require(p.activations == "uniform", "precision.activations", "needs precision.enabled = true")
    _require(not r.ort_cpu.embeddings or r.target == "ort-cpu", "ort_cpu.embeddings", "needs target = 'ort-cpu'")
    _require(not (r.ort_cpu.embeddings and r.sites.embeddings != "float"), "sites.embeddings",
             "ort_cpu.embeddings already packs the table in 4 bits (set one of them)")
    _require(not r.ort_cpu.dynamic_activations or r.target == "ort-cpu", "ort_cpu.dynamic_activations",
             "needs target = 'ort-cpu'")


def _check_ort_cpu(r: Recipe) -> None:
    """target ort-cpu packs 4-bit weights into the native kernels' layout: refuse a recipe whose
    weights they cannot hold, instead of leaving every site in QDQ."""
    from lowbit.runtime_ext.specs import FORMATS as KERNEL_FORMATS, GatherSpec

    w = r.weights
    if w.format == "none":
        _require(not r.ort_cpu.embeddings, "ort_cpu.embeddings", "needs a 4-bit weights.format")
        return
    _require(not r.precision.enabled, "precision.enabled",
             "target ort-cpu has no mixed NVFP4/FP8 kernel: use target qdq for FGMP")
    _require(w.format in KERNEL_FORMATS, "weights.format",
             f"target ort-cpu packs {', '.join(KERNEL_FORMATS)} weights, not {_show(w.format)}")
    _require(w.symmetric, "weights.symmetric", "target ort-cpu kernels take symmetric weights")
    block = get_format(w.format).block_size(w.block_size)
    _require(block is not None, "weights.block_size", f"target ort-cpu packs {w.format} in blocks: set 16 or a multiple of 32")
    try:
        GatherSpec(w.format, block)
    except LowbitError as e:
        _require(False, "weights.block_size", f"target ort-cpu: {e}")


@dataclass(frozen=True)
class Recipe(_Spec):
    name: str = _doc("recipe name (file stem)", "custom")
    description: str = _doc("one line shown by `lowbit recipes`", "")
    target: str = _doc("emission target: qdq (standard ONNX, exact in ORT CPU) | qdq-fp4 (FLOAT4E2M1 + FP8 scales) | ort-cpu (packed 4-bit weights in lowbit custom ops, ONNX function fallbacks) | npu (standard integer QDQ only: per-tensor activations, symmetric per-channel weights, RPTQ clusters as split MatMuls)", "qdq")
    weights: WeightSpec = field(default_factory=WeightSpec, metadata={"doc": "weight quantization"})
    activations: ActivationSpec = field(default_factory=ActivationSpec, metadata={"doc": "activation quantization"})
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec, metadata={"doc": "calibration (SLAC)"})
    sites: SiteSpec = field(default_factory=SiteSpec, metadata={"doc": "which linear sites to quantize"})
    smooth: SmoothSpec = field(default_factory=SmoothSpec, metadata={"doc": "equivalent scale folding (SmoothQuant, AWQ, AQAS)"})
    reorder: ReorderSpec = field(default_factory=ReorderSpec, metadata={"doc": "RPTQ channel clustering and reordering"})
    rotate: RotateSpec = field(default_factory=RotateSpec, metadata={"doc": "orthogonal rotations (QuaRot/SpinQuant R1, R2, online Hadamard)"})
    rounding: RoundingSpec = field(default_factory=RoundingSpec, metadata={"doc": "weight rounding (RTN, OPTQ)"})
    kv: KVCacheSpec = field(default_factory=KVCacheSpec, metadata={"doc": "KV (attention K/V input) quantization"})
    precision: PrecisionSpec = field(default_factory=PrecisionSpec, metadata={"doc": "FGMP mixed NVFP4/FP8 weight blocks"})
    ort_cpu: OrtCpuSpec = field(default_factory=OrtCpuSpec, metadata={"doc": "target ort-cpu lowering options"})
    npu: NpuSpec = field(default_factory=NpuSpec, metadata={"doc": "target npu emission options"})

    def _validate(self) -> None:
        _require(self.target in TARGETS, "target", f"{_show(self.target)} is not one of {', '.join(TARGETS)}")
        _check_cross_sections(self)
        _check_int8_weights(self)
        if self.target == "npu":
            _check_npu(self)
        elif self.target == "ort-cpu":
            _check_ort_cpu(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def needs_calibration(self) -> bool:
        """Whether compiling needs calibration windows (the one place that says so): static
        activation or K/V ranges, X^T X for smoothing or OPTQ, FGMP activation choices, the
        diag(X^T X) sensitivity proxy, or FGMP without ``precision.fisher_file`` (a shipped
        model's Fisher is computed on the calibration windows; ``auto`` falls back to the proxy)."""
        p = self.precision
        return (self.activations.format != "none" or self.kv.format != "none" or self.smooth.method != "none"
                or (self.rounding.method == "optq" and self.weights.format != "none")
                or (p.enabled and (p.activations != "uniform" or p.sensitivity == "proxy" or not p.fisher_file)))  # fmt: skip


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """``cls`` from a TOML table: unknown keys are refused here, values are checked by the
    dataclass itself (:class:`_Spec`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(f"{prefix}{k}" for k in fields)
            raise LowbitError(f"unknown recipe key {_show(dotted)} (known: {known})")
        sub = _SECTIONS.get(key) if not prefix else None
        if sub is not None and isinstance(value, dict):
            value = _build(sub, value, f"{key}.")
        kwargs[key] = value
    return cls(**kwargs)


_SECTIONS = {"weights": WeightSpec, "activations": ActivationSpec, "calibration": CalibrationSpec, "sites": SiteSpec,
             "smooth": SmoothSpec, "reorder": ReorderSpec, "rotate": RotateSpec, "rounding": RoundingSpec, "kv": KVCacheSpec,
             "precision": PrecisionSpec, "ort_cpu": OrtCpuSpec, "npu": NpuSpec}
_SECTION_NAMES = {cls: name for name, cls in _SECTIONS.items()}


def available_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.toml"))}


MAX_RECIPE_BYTES = 1 << 20  # the shipped recipes are under 2 KB; anything near this is not a recipe


def _parse_toml(text: str, what: str) -> dict[str, Any]:
    """tomllib, with its failures as one-line errors: TOMLDecodeError and int() limits are
    ValueErrors; its recursive descent overflows the stack on deeply nested arrays or tables."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise LowbitError(f"{what} is not a usable recipe: arrays or inline tables nested too deeply") from None
    except tomllib.TOMLDecodeError as e:  # "Invalid value (at line 3, column 5)"
        raise LowbitError(f"{what} is not valid TOML: {e}") from None
    except ValueError as e:  # int(): "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise LowbitError(f"{what} is not valid TOML: {str(e).split(':')[0]}") from None


def _read_recipe_file(path: Path) -> str:
    """The UTF-8 text of a recipe file: a regular file of at most MAX_RECIPE_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang us
    except FileNotFoundError:
        raise LowbitError(f"recipe file {path} does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise LowbitError(f"recipe file {path} cannot be opened ({getattr(e, 'strerror', None) or e})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise LowbitError(f"recipe file {path} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise LowbitError(f"recipe file {path} is not a regular file")
        chunks, size = [], 0
        while size <= MAX_RECIPE_BYTES and (chunk := os.read(fd, MAX_RECIPE_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise LowbitError(f"recipe file {path} cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_RECIPE_BYTES:
        raise LowbitError(f"recipe file {path} is larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # an editor's byte-order mark is harmless
    except UnicodeDecodeError as e:
        raise LowbitError(f"recipe file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'weights.block_size=32'`` -> (['weights', 'block_size'], 32); values use TOML syntax,
    bare words (and anything else TOML does not parse) are strings."""
    if "=" not in text:
        raise LowbitError(f"override {_show(text)} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (ValueError, RecursionError):  # not TOML (or too deep for tomllib): the raw string
        value = raw
    return key.strip().split("."), value


def load_recipe(name_or_path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load a named recipe (``recipes/NAME.toml``) or a TOML file, then apply overrides."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        recipes = available_recipes()
        if str(name_or_path) not in recipes:
            raise LowbitError(f"unknown recipe {_show(str(name_or_path))} (known: {', '.join(recipes)})")
        path = recipes[str(name_or_path)]
    data = _parse_toml(_read_recipe_file(path), f"recipe file {path}")
    data.setdefault("name", path.stem)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise LowbitError(f"override {_show(item)}: {_show(k)} is not a section")
        node[keys[-1]] = value
    return _build(Recipe, data, "")


def describe_keys() -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every recipe key, in declaration order."""
    rows = []
    for f in dataclasses.fields(Recipe):
        if f.name in _SECTIONS:
            for sf in dataclasses.fields(_SECTIONS[f.name]):
                rows.append((f"{f.name}.{sf.name}", sf.metadata["doc"], sf.default))
        else:
            rows.append((f.name, f.metadata["doc"], f.default))
    return rows
