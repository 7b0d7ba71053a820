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


@pytest.mark.parametrize("axis", [0, 1])
def test_deferred_rewrites_compose_read_privately_and_are_computed_once_per_stream(axis, tmp_path, monkeypatch):
    """rewrite_weight_kn(defer=True) twice gives the eager composition's bytes at every read, reads
    an external source through a map of its own (none left open), and the streamed reads compute
    a deferred weight once per call, not once per slice."""
    from lowbit.core.folding import rewrite_weight_kn, weight_kn

    rng = np.random.default_rng(7)
    w_kn = rng.standard_normal((K, N)).astype(np.float32)
    stored = w_kn if axis == 0 else w_kn.T
    first, second = rng.standard_normal((K, K)), rng.uniform(0.5, 2.0, K)
    calls = []

    def rotate(w):
        calls.append(1)
        return first.T @ w

    def site_of(tensor):
        return LinearSite(node=None, weight=ir.Value(name="w", const_value=tensor), weight_path=(), reduction_axis=axis, name="w")

    eager = site_of(ir.tensor(stored.copy(), name="w"))
    rewrite_weight_kn(eager, rotate)
    rewrite_weight_kn(eager, lambda w: second[:, None] * w)
    deferred = site_of(_tensor("float32-external", stored, tmp_path))
    rewrite_weight_kn(deferred, rotate, defer=True)
    rewrite_weight_kn(deferred, lambda w: second[:, None] * w, defer=True)
    assert isinstance(deferred.weight.const_value, ir.LazyTensor)
    for _ in range(2):  # every read computes the same bytes
        assert deferred.weight.const_value.tobytes() == eager.weight.const_value.tobytes()
    assert "w.data" not in Path("/proc/self/maps").read_text()
    calls.clear()
    monkeypatch.setattr(weight_io, "_CHUNK_BYTES", 4 * N * 3)  # many slices
    np.testing.assert_array_equal(row_absmax_kn(deferred), np.abs(weight_kn(eager)).max(axis=1))
    assert len(calls) == 1


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1, 0)])
def test_kn_columns_reads_sites_side_by_side_and_digests_the_elements(axes, tmp_path, monkeypatch):
    """KnColumns of sites reading one input (each stored in either layout, external, lazily
    widened or in memory) gives w[:, cols] of their side-by-side (K, N) concatenation for slices
    across site boundaries and for index arrays, holds no map open, reads a deferred rewrite once,
    and its digest depends on the elements only: the same for every storage, another for a change."""
    from lowbit.core.folding import rewrite_weight_kn

    monkeypatch.setattr(float_types, "LAZY_BYTES", 0)
    monkeypatch.setattr(weight_io, "_CHUNK_BYTES", 4 * 40 * 3)
    rng = np.random.default_rng(len(axes))
    widths = [N, 5, 11][: len(axes)]
    parts = [rng.standard_normal((K, n)).astype(np.float16).astype(np.float32) for n in widths]
    whole = np.concatenate(parts, axis=1)

    def sites(kind: str) -> list[LinearSite]:
        out = []
        for i, (axis, w_kn) in enumerate(zip(axes, parts)):
            directory = tmp_path / f"{kind}{i}"
            directory.mkdir(exist_ok=True)
            tensor = _tensor(kind, w_kn if axis == 0 else w_kn.T, directory)
            out.append(LinearSite(node=None, weight=ir.Value(name=f"w{i}", const_value=tensor), weight_path=(),
                                  reduction_axis=axis, name=f"w{i}"))  # fmt: skip
        return out

    digests = set()
    for kind in ("memory", "float32-external", "float16-lazy"):
        w = weight_io.KnColumns(sites(kind))
        assert w.shape == whole.shape
        for cols in (slice(None), slice(3, N + 4), slice(N - 1, N), slice(7, 7), np.array([whole.shape[1] - 1, 0, N - 1, 1, N - 2])):
            got = w[:, cols]
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, whole[:, cols])
        digests.add(w.digest())
        assert "w.data" not in Path("/proc/self/maps").read_text()
    assert len(digests) == 1
    changed = sites("memory")
    changed[-1].weight.const_value.numpy()[0, 0] += 1.0
    assert weight_io.KnColumns(changed).digest() not in digests

    deferred, calls = sites("float32-external"), []

    def negate(w):
        calls.append(1)
        return -w

    rewrite_weight_kn(deferred[0], negate, defer=True)
    w = weight_io.KnColumns(deferred)
    for cols in (slice(0, 4), slice(None), np.array([2, 1])):
        expected = whole[:, cols].copy()
        expected[:, np.arange(whole.shape[1])[cols] < N] *= -1
        np.testing.assert_array_equal(w[:, cols], expected)
    assert len(calls) == 1


def test_materialize_deferred_computes_only_deferred_rewrites_with_their_bytes(tmp_path, monkeypatch):
    from lowbit.core.folding import materialize_deferred, rewrite_weight_kn

    monkeypatch.setattr(float_types, "LAZY_BYTES", 0)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((K, N)).astype(np.float16).astype(np.float32)
    sites = []
    for i, kind in enumerate(["float32-external", "float16-lazy", "memory"]):
        (tmp_path / kind).mkdir()
        tensor = _tensor(kind, w, tmp_path / kind)
        sites.append(LinearSite(node=None, weight=ir.Value(name=f"w{i}", const_value=tensor), weight_path=(),
                                reduction_axis=0, name=f"w{i}"))  # fmt: skip
    rewrite_weight_kn(sites[0], lambda x: 2 * x, defer=True)
    deferred_bytes = sites[0].weight.const_value.tobytes()
    untouched = [s.weight.const_value for s in sites[1:]]
    assert materialize_deferred(sites) == K * N * 4
    assert isinstance(sites[0].weight.const_value, ir.Tensor)
    assert sites[0].weight.const_value.tobytes() == deferred_bytes
    assert [s.weight.const_value for s in sites[1:]] == untouched  # a widened source stays lazy


@pytest.mark.parametrize("kind", ["memory", "float32-external", "float16-lazy"])
@pytest.mark.parametrize("axis", [0, 1])
def test_stored_slices_encode_as_the_whole_array(kind, axis, tmp_path, monkeypatch):
    """encode_sliced reading a StoredSlices (never the whole weight) gives the codes and scales of
    the stored array, in many slices; the output-channel slices cover the weight once."""
    from lowbit import formats

    monkeypatch.setattr(float_types, "LAZY_BYTES", 0)
    rng = np.random.default_rng(axis)
    w_kn = rng.standard_normal((K, N)).astype(np.float16).astype(np.float32)
    stored = w_kn if axis == 0 else w_kn.T
    site = LinearSite(node=None, weight=ir.Value(name="w", const_value=_tensor(kind, stored, tmp_path)), weight_path=(),
                      reduction_axis=axis, name="w")  # fmt: skip
    w = weight_io.StoredSlices(site)
    assert w.shape == stored.shape
    slices = w.output_slices(max_bytes=4 * K * 5)
    assert len(slices) == -(-N // 5)
    whole = np.concatenate([w.output_slice(c) for c in slices], axis=1 - axis)
    np.testing.assert_array_equal(whole, stored)
    for fmt, block in (("int8", None), ("int4", 8)):
        got = formats.encode_sliced(w, fmt, axis=axis, block_size=block, slice_bytes=4 * K * 3)
        want = formats.encode(stored, fmt, axis=axis, block_size=block)
        np.testing.assert_array_equal(got.codes, want.codes)
        np.testing.assert_array_equal(got.scale, want.scale)
    assert "w.data" not in Path("/proc/self/maps").read_text()


def test_external_data_shorter_than_its_tensor_is_one_error(tmp_path):
    from lowbit.errors import LowbitError

    stored = np.ones((K, N), np.float32)
    tensor = _tensor("float32-external", stored, tmp_path)
    with open(tmp_path / "w.data", "r+b") as f:
        f.truncate(100 + stored.nbytes - 8)
    site = LinearSite(node=None, weight=ir.Value(name="w", const_value=tensor), weight_path=(), reduction_axis=0, name="w")
    with pytest.raises(LowbitError, match="w.data: ends before byte"):
        weight_io.KnColumns([site])[:, np.array([0, N - 1])]
