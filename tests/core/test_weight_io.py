"""lowbit.core.weight_io: streamed reads and rewrites of a weight equal the whole-array formulas
bit for bit -- both stored layouts; float32 external data, a lazily widened float16 source and an
in-memory array; many slices (a small chunk) -- and a read leaves no memory map open."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.core import float_types, weight_io
from lowbit.core.linear_sites import LinearSite
from lowbit.core.weight_io import column_sample_kn, row_absmax_kn, transformed_stored

K, N = 24, 37


def _tensor(kind: str, stored: np.ndarray, directory) -> ir.TensorProtocol:
    if kind == "memory":
        return ir.tensor(stored.astype(np.float32), name="w")
    data = stored.astype(np.float16 if kind == "float16-lazy" else np.float32)
    path = directory / "w.data"
    path.write_bytes(b"\0" * 100 + data.tobytes())  # an offset, as in a shared data file
    external = ir.ExternalTensor("w.data", 100, data.nbytes, ir.DataType.from_numpy(data.dtype),
                                 shape=ir.Shape(data.shape), name="w", base_dir=directory)  # fmt: skip
    if kind == "float32-external":
        return external
    return float_types._widened(external, "w")  # large enough to be lazy with LAZY_BYTES = 0


@pytest.mark.parametrize("kind", ["memory", "float32-external", "float16-lazy"])
@pytest.mark.parametrize("axis", [0, 1])
def test_streamed_reads_and_rewrites_equal_the_whole_array(kind, axis, tmp_path, monkeypatch):
    monkeypatch.setattr(float_types, "LAZY_BYTES", 0)
    monkeypatch.setattr(weight_io, "_CHUNK_BYTES", 4 * 40 * 3)  # a few stored rows per slice
    rng = np.random.default_rng(axis)
    w_kn = rng.standard_normal((K, N)).astype(np.float32)
    if kind == "float16-lazy":
        w_kn = w_kn.astype(np.float16).astype(np.float32)  # what the widened source holds
    stored = w_kn if axis == 0 else w_kn.T
    tensor = _tensor(kind, stored, tmp_path)
    assert kind != "float16-lazy" or float_types.widened_source(tensor) is not None
    site = LinearSite(node=None, weight=ir.Value(name="w", const_value=tensor), weight_path=(), reduction_axis=axis, name="w")

    np.testing.assert_array_equal(row_absmax_kn(site), np.abs(w_kn).max(axis=1))
    cols = np.array([0, 5, 6, 36, 17])
    np.testing.assert_array_equal(column_sample_kn(site, cols), w_kn[:, cols])
    perm = rng.permutation(K)
    scale = rng.uniform(0.5, 2.0, K)
    expected = w_kn[perm] * scale[:, None].astype(np.float32)
    got = transformed_stored(site, perm=perm, scale=scale)
    np.testing.assert_array_equal(got, expected if axis == 0 else expected.T)
    np.testing.assert_array_equal(transformed_stored(site), stored)
    # every read mapped its own slice and closed it: no page of the file stays mapped
    assert "w.data" not in Path("/proc/self/maps").read_text()
