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
    assert (tmp_path / "SCALE.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["error"] for r in rows] == [None, None]
    assert text.count("- `lowbit-bench scale") == 2
    assert all(0 < r["peak_mb"] < r["bound_mb"] and r["seconds"] > 0 for r in rows)
    assert not (tmp_path / "work" / "tiny-2l-float32-w8a8").exists()  # outputs removed, models kept
    assert (tmp_path / "work" / "tiny-2l-float32" / "model.onnx").is_file()


@pytest.mark.parametrize("args, message", [
    (["--cases", "nope"], "unknown shape 'nope'"), (["--cases", "tiny:0"], "positive integer"),
    (["--cases", "tiny@float8"], "float32 or float16"), (["--cases", "tiny", "--recipes", "w9a9"], "w9a9"),
    (["--cases", "tiny", "--windows", "0"], "--windows must be at least 1"),
])  # fmt: skip
def test_bad_input_is_one_line_errors_before_any_work(args, message, tmp_path, capsys):
    assert main(["scale", *args, "--work", str(tmp_path / "work"), "-o", str(tmp_path / "S.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "work").exists() and not (tmp_path / "S.md").exists()


def test_append_refuses_a_json_it_did_not_write(tmp_path, capsys):
    (tmp_path / "S.json").write_text('{"something": "else"}')
    assert main(["scale", "--cases", "tiny", "--append", "-o", str(tmp_path / "S.md")]) == 2
    assert "not a lowbit-bench scale result" in capsys.readouterr().err


def test_a_failed_compile_leaves_a_users_directory_alone(tmp_path, capsys):
    """The work directory may hold a user's directory where an output would go: the compile
    refuses to replace it, and the bench never removes it."""
    work = tmp_path / "work"
    mine = work / "tiny-2l-float32-w8a8"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    assert main(["scale", "--cases", "tiny", "--recipes", "w8a8", "--windows", "1", "--work", str(work),
                 "-o", str(tmp_path / "S.md")]) == 0  # fmt: skip
    assert (mine / "notes.txt").read_text() == "mine"
    rows = json.loads((tmp_path / "S.json").read_text())["rows"]
    assert "existing directory that lowbit did not write" in rows[0]["error"]


def test_case_parsing():
    case = parse_case("llama-3.2-1b:4@float16")
    assert (case.shape.layers, case.dtype, case.shape.hidden) == (4, "float16", 2048)
    assert case.largest_block_bytes() == 4 * 128256 * 2048  # the tied table outweighs a layer
