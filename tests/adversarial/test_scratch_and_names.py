"""Scratch space of killed runs is swept by the next run; names from a model cannot forge output.

- Every run keeps its temporary files (ONNX Runtime session copies included) in one locked
  ``lowbit-run-*`` directory; a later run removes those nobody holds (a killed run's), never one
  a live run holds.
- Tensor and file names reach stderr escaped: a newline cannot add a line, an ANSI escape cannot
  reach the terminal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.models.synthetic import tiny_decoder

from .conftest import assert_user_error, run_lowbit

HOLD = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); " \
       "print('held', flush=True); time.sleep(120)"


def test_stale_scratch_directories_are_swept_live_ones_kept(tmp_path):
    tmpdir = tmp_path / "tmp"
    dead, alive = tmpdir / "lowbit-run-dead0000", tmpdir / "lowbit-run-live0000"
    users = tmpdir / "lowbit-run-not-lowbits"  # the name alone proves nothing: no marker, kept
    for d in (dead, alive, users):
        d.mkdir(parents=True)
        (d / "model.onnx.data").write_bytes(b"\0" * 4096)  # what a killed ORT session copy leaves
    for d in (dead, alive):
        (d / ".lowbit-run").write_text("1\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(alive)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_lowbit("recipes", env={"TMPDIR": str(tmpdir)})
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in tmpdir.iterdir()) == [alive.name, users.name]  # its own run dir is gone
    finally:
        holder.kill()
        holder.wait()
    assert run_lowbit("recipes", env={"TMPDIR": str(tmpdir)}).returncode == 0
    assert [p.name for p in tmpdir.iterdir()] == [users.name]


def test_model_controlled_names_are_escaped(tmp_path):
    model = tiny_decoder()
    weight = model.graph.initializers["layers.0.mlp.gate_proj.weight"]
    values = weight.const_value.numpy().copy()
    values.flat[0] = np.nan
    weight.const_value = ir.tensor(values, name=weight.name)
    weight.name = "w\nlowbit compile: fake second line\x1b[31m\u202e"
    ir.save(model, tmp_path / "nan.onnx")
    line = assert_user_error(run_lowbit("compile", "nan.onnx", "-o", "out.onnx", "-r", "w8", cwd=tmp_path),
                             "has 1 NaN/Inf values")
    assert "w\\nlowbit compile: fake second line\\x1b[31m\\u202e" in line
    assert "\x1b" not in line and "\u202e" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.onnx"]


def test_file_names_are_escaped(tmp_path):
    name = "evil\x1b]0;title\x07\n.onnx"
    (tmp_path / name).write_bytes(b"not protobuf")
    line = assert_user_error(run_lowbit("compile", name, "-o", "out.onnx", "-r", "w8", cwd=tmp_path),
                             "not an ONNX model")
    assert "\\x1b]0;title\\x07\\n.onnx" in line
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [name]


def test_recovery_touches_only_staging_directories_it_laid_out(tmp_path):
    """A user's directory whose name looks like a staging directory is never removed."""
    from lowbit.files.swap import recover

    mine = tmp_path / ".notes.lowbit-swap-abc"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert recover(tmp_path) == []
    assert (mine / "thesis.tex").read_text() == "years of work"
    stale = tmp_path / ".out.lowbit-swap-def"
    (stale / "new").mkdir(parents=True)
    assert len(recover(tmp_path)) == 1 and not stale.exists()
