"""The deploy bench's parts that need no compile: the memory-bandwidth bound's inputs, the tables,
and one-line refusals of bad arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx_ir as ir
import pytest

from lowbit.bench import deploy_bench
from lowbit.core.initializers import add_initializer
from lowbit.errors import LowbitError
from lowbit.models.synthetic import tiny_decoder


def test_copy_bandwidth_and_cpu_flags_are_measured():
    assert deploy_bench.copy_bandwidth_gbs(megabytes=8, repeats=2) > 0.1
    assert isinstance(deploy_bench.cpu_flags(), str)


def test_decode_weight_bytes_leave_out_a_table_only_lookups_read(tmp_path):
    model = tiny_decoder(hidden=32, ffn=48, vocab=64)
    (tmp_path / "tied").mkdir()
    ir.save(model, tmp_path / "tied" / "model.onnx")
    every = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert deploy_bench.decode_weight_bytes(tmp_path / "tied") == every  # the tied LM head reads it whole
    table = model.graph.initializers["embed_tokens.weight"]
    head = next(n for n, _ in table.uses() if n.op_type == "Transpose")
    head.replace_input_with(0, add_initializer(model.graph, table.const_value.numpy().copy(), "head.weight"))
    (tmp_path / "untied").mkdir()
    ir.save(model, tmp_path / "untied" / "model.onnx")
    assert deploy_bench.decode_weight_bytes(tmp_path / "untied") == every  # the head's copy, not the table


def test_speed_table_gives_ratios_to_fp32_and_matmulnbits(tmp_path):
    dirs = {}
    for name, size in (("fp32", 1000), ("ort-matmulnbits-int4", 250), ("lowbit-w4a8-dint4-ort-cpu", 160)):
        d = tmp_path / name
        d.mkdir()
        (d / "model.onnx").write_bytes(b"x" * size)
        dirs[name] = (name.upper(), d, None)
    best = {"fp32": (100.0, 20.0), "ort-matmulnbits-int4": (120.0, 10.0), "lowbit-w4a8-dint4-ort-cpu": (80.0, 5.0)}
    rows = deploy_bench.speed_table(dirs, best)
    assert rows[2] == "| FP32 | 100.0 | 1.00 | 20.00 | 50.0 | 0.50 | 0.0 | 1.000 |"
    assert rows[4] == "| LOWBIT-W4A8-DINT4-ORT-CPU | 80.0 | 0.80 | 5.00 | 200.0 | 2.00 | 0.0 | 0.160 |"


@pytest.mark.parametrize("bad, message", [({"windows": 0}, "must be >= 1"), ({"rounds": 0}, "must be >= 1"),
                                          ({"threads": [0]}, "must be >= 1"),
                                          ({"synthetic": "llama-9b"}, "--synthetic: unknown shape 'llama-9b'"),
                                          ({"synthetic": "tiny", "calib_windows": 0}, "--calib-windows must be >= 1"),
                                          ({"set": ["rounding.method=rtn"]}, "--set applies to the --synthetic")])
def test_bad_arguments_are_refused_before_any_work(bad, message, tmp_path):
    args = argparse.Namespace(windows=8, rounds=3, threads=[1], skip_faithfulness=False, synthetic=None, calib_windows=4,
                              set=[], output=str(tmp_path / "DEPLOY.md"))
    for key, value in bad.items():
        setattr(args, key, value)
    with pytest.raises(LowbitError, match=message):
        deploy_bench.run(args)
    assert not Path(args.output).exists()


def test_faithfulness_table_states_windows_and_differences():
    rows = [{"name": "qdq, as written", "ppl": {"pydoc": 16.0, "news": 40.0}, "windows": 32},
            {"name": "ort-cpu", "ppl": {"pydoc": 16.016, "news": 39.96}, "windows": 32}]
    text = deploy_bench.render(rows, {}, [], [], [], {}, "lowbit-bench deploy")
    assert "(32 x 512 tokens per text)" in text
    assert "| ort-cpu | 16.0160 | +0.100 % | 39.9600 | -0.100 % |" in text
