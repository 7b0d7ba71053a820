"""lowbit-bench scale: one real (tiny) run writes the table, the plot and the raw rows; bad cases
are one-line errors."""

from __future__ import annotations

import json

import pytest

from lowbit.bench.cli import main
from lowbit.bench.scale_bench import parse_case


def test_tiny_run_writes_table_plot_and_rows(tmp_path, capsys):
    out = tmp_path / "SCALE.md"
    common = ["--recipes", "w8a8", "--windows", "1", "--work", str(tmp_path / "work"), "-o", str(out)]
    assert main(["scale", "--cases", "tiny", *common]) == 0
    assert main(["scale", "--cases", "tiny:3", "--append", *common]) == 0  # a second run adds its rows
    text = out.read_text()
    assert "| tiny (2 layers, float32) | w8a8 |" in text and "| tiny (3 layers, float32) | w8a8 |" in text
    assert (tmp_path / "scale.png").stat().st_size > 1000
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["error"] for r in rows] == [None, None]
    assert text.count("- `lowbit-bench scale") == 2
    assert all(0 < r["peak_mb"] < r["bound_mb"] and r["seconds"] > 0 for r in rows)
    assert not (tmp_path / "work" / "tiny-2l-float32-w8a8").exists()  # outputs removed, models kept
    assert (tmp_path / "work" / "tiny-2l-float32" / "model.onnx").is_file()


@pytest.mark.parametrize("case, message", [("nope", "unknown shape 'nope'"), ("tiny:0", "positive integer"),
                                           ("tiny@float8", "float32 or float16")])  # fmt: skip
def test_bad_cases_are_one_line_errors(case, message, tmp_path, capsys):
    assert main(["scale", "--cases", case, "-o", str(tmp_path / "S.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_case_parsing():
    case = parse_case("llama-3.2-1b:4@float16")
    assert (case.shape.layers, case.dtype, case.shape.hidden) == (4, "float16", 2048)
    assert case.largest_block_bytes() == 4 * 128256 * 2048  # the tied table outweighs a layer
