"""lowbit.formats: exact low-bit number formats in pure numpy (no graph code).

Element formats (``cast``): INT-b, dINT-b (see :mod:`lowbit.formats.dint` for lowbit's
definition, after Lee et al. 2023), FP8 E4M3FN / E5M2, FP4 E2M1 - round to nearest (ties to even
code), saturating. Scaled formats (``encode``/``decode``/``fake_quantize``): the same plus NVFP4
(E2M1, E4M3 block scales of 16, FP32 per-tensor scale) and MXFP4/MXFP8 (E8M0 scales, blocks of 32).
The module docstrings of ``blocking``, ``scales`` and ``choosers`` define granularity, scale rules
and scale choosers; ``codec`` states the encode/decode guarantees.
"""

from lowbit.formats.codec import Encoded, Scales, cast, choose_scale, decode, encode, encode_sliced, fake_quantize
from lowbit.formats.e8m0 import cast_e8m0, decode_e8m0, encode_e8m0
from lowbit.formats.packing import pack_nibbles, unpack_nibbles
from lowbit.formats.registry import FORMATS, ScaledFormat, ScaleKind, code_table, get_format, integer_codes

__all__ = [
    "cast", "fake_quantize", "encode", "encode_sliced", "decode", "Encoded", "Scales", "choose_scale",
    "pack_nibbles", "unpack_nibbles", "FORMATS", "get_format", "code_table", "ScaledFormat",
    "ScaleKind", "cast_e8m0", "encode_e8m0", "decode_e8m0", "integer_codes",
]
