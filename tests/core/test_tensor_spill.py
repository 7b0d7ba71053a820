"""lowbit.core.tensor_spill: spilled tensors read back unchanged, and the range of a spilled
tensor that no initializer holds any more (replaced by a later rewrite, or dropped) is punched
out of the scratch file at the next spill, while the live ones still read back."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit.core.tensor_spill import TensorSpill, drop_unused_initializers


def test_dead_spilled_ranges_become_holes_and_live_ones_read_back(tmp_path, holes_supported):
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal((256, 512)).astype(np.float32) for name in ("a", "b", "c")}
    values = {name: ir.Value(name=name, const_value=ir.tensor(array, name=name)) for name, array in arrays.items()}
    total = ir.node("Sum", list(values.values()))
    graph = ir.Graph([], total.outputs, nodes=[total], name="g")
    for value in values.values():
        graph.register_initializer(value)
    spill = TensorSpill(tmp_path, min_bytes=1)
    assert spill.spill(graph) == 3
    size, blocks = spill.path.stat().st_size, spill.path.stat().st_blocks
    graph.initializers["a"].const_value = ir.tensor(arrays["a"] * 2, name="a")  # a later rewrite
    total.replace_input_with(2, values["a"])  # "c" is read no more: dropped
    assert drop_unused_initializers(graph) == 1
    assert spill.spill(graph) == 1  # the new "a"
    nbytes = arrays["b"].nbytes
    if holes_supported:
        assert spill.reclaimed == 2 * nbytes
        # two tensors' blocks freed, one appended (a block of slack at each unaligned edge)
        assert spill.path.stat().st_blocks * 512 <= blocks * 512 - nbytes + 4 * 4096
    else:  # a file system without holes: the file only grows
        assert spill.reclaimed == 0
    assert spill.path.stat().st_size == size + nbytes  # offsets never move
    np.testing.assert_array_equal(graph.initializers["b"].const_value.numpy(), arrays["b"])
    np.testing.assert_array_equal(graph.initializers["a"].const_value.numpy(), arrays["a"] * 2)


def test_a_spilled_tensor_read_by_a_lazy_constant_is_kept(tmp_path):
    """A deferred rewrite over a spilled weight still reads it: its range is not punched out."""
    from lowbit.core.folding import rewrite_weight_kn
    from lowbit.core.linear_sites import LinearSite

    array = np.random.default_rng(1).standard_normal((128, 256)).astype(np.float32)
    value = ir.Value(name="w", const_value=ir.tensor(array, name="w"))
    user = ir.node("Identity", [value])
    graph = ir.Graph([], user.outputs, nodes=[user], name="g")
    graph.register_initializer(value)
    spill = TensorSpill(tmp_path, min_bytes=1)
    assert spill.spill(graph) == 1
    site = LinearSite(node=user, weight=value, weight_path=(), reduction_axis=0, name="w")
    rewrite_weight_kn(site, lambda w: 2 * w, defer=True)
    spill.spill(graph)
    assert spill.reclaimed == 0
    np.testing.assert_array_equal(value.const_value.numpy(), 2 * array)
