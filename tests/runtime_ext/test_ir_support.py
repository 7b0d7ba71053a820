"""The onnx_ir builders produce the same runnable model as the onnx.helper ones."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit import formats
from lowbit import runtime_ext as rx
from lowbit.runtime_ext import ir_support


def test_ir_built_matmul_and_gather_run_native_and_fallback(lb):
    rng = np.random.default_rng(0)
    v, h = 24, 64
    table = rng.standard_normal((v, h)).astype(np.float32)
    packed = rx.pack_gather_table(formats.encode(table, "dint4", axis=1, block_size=32))
    consts = {k: ir.Value(name=k, const_value=ir.tensor(a)) for k, a in packed.arrays.items()}
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2]))
    gather = ir_support.gather_node_ir(consts["codes"], consts["scales"], consts["global_scale"],
                                       ids, packed.spec)
    head = ir_support.matmul_node_ir(gather.outputs[0], consts["codes"], consts["scales"],
                                     consts["global_scale"], packed.matmul_spec("int8_dynamic"))
    head.outputs[0].name = "Y"
    head.outputs[0].dtype = ir.DataType.FLOAT
    graph = ir.Graph([ids], [head.outputs[0]], nodes=[gather, head],
                     initializers=list(consts.values()), opset_imports={"": 21})
    model = ir_support.attach_functions_ir(ir.Model(graph, ir_version=10))
    proto = ir.serde.serialize_model(model)
    assert {f.overload for f in proto.functions} == {packed.spec.overload,
                                                     packed.matmul_spec("int8_dynamic").overload}
    x = np.array([3, 17], np.int64)
    outs = [lb.session(proto, native).run(None, {"ids": x})[0] for native in (True, False)]
    e = formats.decode(formats.encode(table, "dint4", axis=1, block_size=32))
    want = ((lambda q_s: (q_s[0] * q_s[1]))(rx.reference.quantize_rows_int8(e[x]))) @ e.T
    for y in outs:
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
