"""lowbit.runtime_ext: native ONNX Runtime custom ops (domain ``lowbit``) and their fallbacks.

Ops: ``MatMulLowbit`` (packed 4-bit weights x float32 or int8 activations), ``GatherLowbit``
(packed 4-bit embedding tables), ``ReorderNorm`` (channel permutation fused with RMS/LayerNorm),
``FgmpActQuant`` (FGMP's per-block FP8/NVFP4 activation quantizer), ``Hadamard`` (an online
orthogonal rotation of the last axis, :mod:`lowbit.runtime_ext.hadamard`), ``GroupQuant`` (run-time
per-token-group activation fake quantization, :mod:`lowbit.emit.dynamic_act`'s ops in one node).
The C++ library is built by ``runtime_ext/build.py`` (``make native``), never at import time;
every node also has an ONNX FunctionProto fallback so models run where it is not registered.
"""

from lowbit.runtime_ext.ir_support import (
    attach_functions_ir,
    gather_node_ir,
    group_quant_node_ir,
    hadamard_node_ir,
    matmul_node_ir,
    reorder_norm_node_ir,
)
from lowbit.runtime_ext.library import library_path, session_options
from lowbit.runtime_ext.nodes import (
    DOMAIN,
    attach_functions,
    function_protos,
    make_fgmp_node,
    make_gather_node,
    make_group_quant_node,
    make_hadamard_node,
    make_matmul_node,
    make_reorder_norm_node,
)
from lowbit.runtime_ext.packing import (
    decode_mixed,
    pack_gather_table,
    pack_matmul_weight,
    pack_mixed_matmul_weight,
)
from lowbit.runtime_ext.specs import FgmpSpec, GatherSpec, GroupQuantSpec, HadamardSpec, MatMulSpec, NormSpec

__all__ = [
    "DOMAIN", "FgmpSpec", "GatherSpec", "GroupQuantSpec", "HadamardSpec", "MatMulSpec", "NormSpec", "attach_functions",
    "attach_functions_ir", "decode_mixed", "function_protos", "gather_node_ir", "group_quant_node_ir", "hadamard_node_ir", "matmul_node_ir",
    "library_path", "make_fgmp_node", "make_gather_node", "make_group_quant_node", "make_hadamard_node", "make_matmul_node", "make_reorder_norm_node",
    "pack_gather_table", "pack_matmul_weight", "pack_mixed_matmul_weight", "reorder_norm_node_ir",
    "session_options",
]
