"""Where lowbit may write: it replaces only what it created (README, "Safety").

Each case was a way to lose a user's files: `-o` at an unrelated directory (its files deleted,
exit 0), at a file (replaced by a directory), at the directory holding the input `.onnx` (config
and tokenizer wiped), inside the export cache, at `.`; companion files that are links (their
targets copied out) or code (copied along). Each is now refused with one line, before any work,
and leaves every file as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

from .conftest import assert_user_error, make_model_dir, run_lowbit, snapshot

RECIPE = ["-r", "w8"]


@pytest.fixture
def place(tmp_path: Path) -> Path:
    make_model_dir(tmp_path / "m")
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "keep.txt").write_text("important\n")
    (tmp_path / "user.onnx").write_bytes((tmp_path / "m" / "model.onnx").read_bytes())
    return tmp_path


REFUSED = [
    (["m", "-o", "project"], "is an existing directory that lowbit did not write"),
    (["m", "-o", "notes.txt"], "never replaces a file by a directory"),
    (["m/model.onnx", "-o", "m"], "contains the input"),
    (["m", "-o", "."], "contains the input"),
    (["m", "-o", ".."], "contains the input"),
    (["m", "-o", "/"], "not a path lowbit can write"),
    (["m", "-o", "project", "--force", "-o", "notes.txt"], "never replaces a file by a directory"),
    (["m/model.onnx", "-o", "user.onnx"], "is an existing file that lowbit did not write"),
]


@pytest.mark.parametrize("args, fragment", REFUSED)
def test_refused_outputs_touch_nothing(place, args, fragment):
    before = snapshot(place)
    assert_user_error(run_lowbit("compile", *args, *RECIPE, cwd=place), fragment)
    assert snapshot(place) == before


def test_directory_output_refused_when_file_named_onnx_is_a_directory(place):
    (place / "dir.onnx").mkdir()
    (place / "dir.onnx" / "x").write_text("x")
    before = snapshot(place)
    assert_user_error(run_lowbit("compile", "m", "-o", "dir.onnx", *RECIPE, cwd=place),
                      "never replaces a directory by a file")
    assert snapshot(place) == before


def test_force_replaces_an_unrelated_directory_but_never_its_input(place):
    proc = run_lowbit("compile", "m", "-o", "project", "--force", *RECIPE, cwd=place)
    assert proc.returncode == 0, proc.stderr
    assert not (place / "project" / "keep.txt").exists() and (place / "project" / "model.onnx").is_file()
    assert_user_error(run_lowbit("compile", "m/model.onnx", "-o", "m", "--force", *RECIPE, cwd=place),
                      "contains the input")


def test_previous_lowbit_output_is_replaced_and_empty_directory_is_used(place):
    (place / "empty").mkdir()
    assert run_lowbit("compile", "m", "-o", "empty", *RECIPE, cwd=place).returncode == 0
    first = json.loads((place / "empty" / "report.json").read_text())["compile_seconds"]
    again = run_lowbit("compile", "m", "-o", "empty", "-r", "w8a8", "--calib-text", "m/calib.txt",
                       "--set", "calibration.seq_len=64", "--set", "calibration.windows=2", cwd=place)
    assert again.returncode == 0, again.stderr
    report = json.loads((place / "empty" / "report.json").read_text())
    assert report["recipe"]["name"] == "w8a8" and report["compile_seconds"] != first
    # a .onnx output is recognised by its metadata, its data and reports go with it
    assert run_lowbit("compile", "m", "-o", "one.onnx", *RECIPE, cwd=place).returncode == 0
    assert run_lowbit("compile", "m", "-o", "one.onnx", *RECIPE, cwd=place).returncode == 0
    assert "lowbit.version" in {p.key for p in onnx.load(str(place / "one.onnx")).metadata_props}


def test_symlink_output_needs_force_and_its_target_is_kept(place):
    os.symlink("project", place / "link")
    before = snapshot(place / "project")
    assert_user_error(run_lowbit("compile", "m", "-o", "link", *RECIPE, cwd=place), "is a symbolic link")
    assert run_lowbit("compile", "m", "-o", "link", "--force", *RECIPE, cwd=place).returncode == 0
    assert not (place / "link").is_symlink() and (place / "link" / "model.onnx").is_file()
    assert snapshot(place / "project") == before


def test_export_cache_is_never_an_output(place):
    cache = place / "cache"
    (cache / "exports").mkdir(parents=True)
    env = {"LOWBIT_CACHE": str(cache)}
    assert_user_error(run_lowbit("compile", "m", "-o", "cache/exports/x", *RECIPE, cwd=place, env=env),
                      "inside lowbit's export cache")
    assert_user_error(run_lowbit("export", "smollm2-135m", "-o", "cache/y", cwd=place, env=env),
                      "inside lowbit's export cache")
    assert not list((cache / "exports").iterdir())


def test_export_refuses_an_unrelated_directory(place):
    before = snapshot(place)
    assert_user_error(run_lowbit("export", "smollm2-135m", "-o", "project", cwd=place),
                      "is an existing directory that lowbit did not write")
    assert_user_error(run_lowbit("export", "smollm2-135m", "-o", "notes.txt", cwd=place),
                      "never replaces a file by a directory")
    assert snapshot(place) == before


def test_companions_copied_are_regular_data_files_only(place):
    m = place / "m"
    secret = place / "id_rsa"
    secret.write_text("PRIVATE KEY\n")
    os.symlink(secret, m / "special_tokens_map.json")  # a link dressed as a companion
    os.symlink(place / "project", m / "linked_dir")
    (m / "tokenization_evil.py").write_text("open('/tmp/pwned', 'w')\n")
    (m / "helper.so").write_bytes(b"\x7fELF")
    (m / "subdir").mkdir()
    proc = run_lowbit("compile", "m", "-o", "out", *RECIPE, cwd=place)
    assert proc.returncode == 0, proc.stderr
    out = place / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["calib.txt", "config.json", "model.onnx", "report.html", "report.json", "report.md",
                     "tokenizer.json", "tokenizer_config.json"]
    assert not any(p.is_symlink() for p in out.iterdir())
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["not_copied"] == ["helper.so", "linked_dir", "special_tokens_map.json", "subdir",
                                              "tokenization_evil.py"]


def test_in_place_keeps_links_as_links_and_every_other_file(place):
    m = place / "m"
    os.symlink("../project", m / "linked_dir")
    os.symlink("config.json", m / "alias.json")
    (m / "sub").mkdir()
    (m / "sub" / "x.txt").write_text("x")
    before = {k: v for k, v in snapshot(m).items() if not k.startswith("model.onnx")}
    proc = run_lowbit("compile", "m", "-o", "m", *RECIPE, cwd=place)
    assert proc.returncode == 0, proc.stderr
    after = snapshot(m)
    assert {k: v for k, v in after.items() if k in before} == before  # links not followed or copied
    assert not [p for p in place.iterdir() if ".lowbit-" in p.name]


def test_special_files_as_inputs_are_refused_without_blocking(place):
    """A FIFO would block a reader forever, /dev/zero never ends, a link loop never resolves."""
    os.mkfifo(place / "pipe.txt")
    os.mkfifo(place / "pipe.onnx")
    os.symlink("loop", place / "loop")
    calib = ["-r", "w8a8", "--set", "calibration.seq_len=64", "--set", "calibration.windows=2"]
    before = snapshot(place)
    for args, fragment in [
        (["m", "-o", "o1", *calib, "--calib-text", "pipe.txt"], "--calib-text pipe.txt: not a regular file"),
        (["m", "-o", "o2", *calib, "--calib-text", "/dev/zero"], "--calib-text /dev/zero: not a regular file"),
        (["m", "-o", "o3", *calib, "--calib-text", "project"], "--calib-text project: not a regular file"),
        (["pipe.onnx", "-o", "o4.onnx", *RECIPE], "pipe.onnx: not a regular file"),
        (["loop", "-o", "o5", *RECIPE], "loop: not an .onnx file, a model directory"),
    ]:
        assert_user_error(run_lowbit("compile", *args, cwd=place, timeout=60), fragment)
    assert snapshot(place) == before


def test_api_refuses_a_fifo_as_calibration_text(place):
    import lowbit

    os.mkfifo(place / "pipe.txt")
    with pytest.raises(lowbit.LowbitError, match="pipe.txt: not a regular file"):
        lowbit.compile(place / "m", "w8a8", calibration=str(place / "pipe.txt"),
                       overrides=["calibration.seq_len=64", "calibration.windows=2"])


def test_new_onnx_output_never_replaces_files_it_would_own(place):
    """out.onnx does not exist, but out.report.md (the user's notes) and out.onnx.data do."""
    (place / "out.report.md").write_text("my notes\n")
    (place / "out.onnx.data").write_bytes(b"data")
    before = snapshot(place)
    assert_user_error(run_lowbit("compile", "m", "-o", "out.onnx", *RECIPE, cwd=place),
                      "out.onnx.data already exists and lowbit did not write it")
    assert snapshot(place) == before
    assert run_lowbit("compile", "m", "-o", "out.onnx", "--force", *RECIPE, cwd=place).returncode == 0
    assert not (place / "out.onnx.data").exists() and "lowbit" in (place / "out.report.md").read_text()
