"""In-place compiles stopped at every step of the output swap, by SIGINT, SIGTERM and SIGKILL.

The swap's test hooks (see :mod:`lowbit.files.swap`) list the steps a compile goes through and
pause it at one of them. Whatever the signal and the step, the model directory ends up exactly as
it was or as the finished compile, never in between: SIGINT/SIGTERM are handled by the process
itself (exit 130/143), SIGKILL is put right by the next lowbit run, which says so in one line. No
staging directory, scratch directory or model copy is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from .conftest import make_model_dir, run_lowbit, snapshot

from lowbit.models.synthetic import TinyConfig, tiny_decoder

RECIPE = ["-r", "w8"]  # weight-only: no calibration, the swap is what is under test


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    scratch = tmp / "tmpdir"
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(scratch), **extra}


def _steps(template: Path, work: Path, args: list[str], target: str) -> list[str]:
    """Every pause point a compile of ``args`` passes, traced on a throw-away copy."""
    shutil.copytree(template, work / "trace" / template.name, symlinks=True)
    trace = work / "trace.txt"
    argv = [a.replace(str(template), str(work / "trace" / template.name)) for a in args]
    proc = run_lowbit(*argv, env={"TMPDIR": str(work), "LOWBIT_TEST_SWAP_TRACE": str(trace)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the model's own swap, not the ones rewriting single report files later
    steps, seen_commit = [], False
    for step in trace.read_text().split():
        if seen_commit and step == "staged":
            break
        steps.append(step)
        seen_commit = seen_commit or step == "committed"
    assert steps[0] == "staged" and steps[-1] == "committed" and f"installed:{target}" in steps, steps
    return steps


def _pause_at(args: list[str], step: str, env: dict[str, str], seconds: float) -> subprocess.Popen:
    # SIGINT at its default in the child even where this test runs as a background job (a shell
    # starts those with SIGINT ignored, and lowbit rightly keeps an inherited SIG_IGN)
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**env, "LOWBIT_TEST_SWAP_PAUSE": step,
                                 "LOWBIT_TEST_SWAP_PAUSE_SECONDS": str(seconds)})  # fmt: skip
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # tqdm lines come first
        if f"swap paused at {step}" in line:
            return proc
        assert time.monotonic() < deadline, "never reached the pause"
    raise AssertionError(f"exited before {step}: {proc.wait()}")


def _no_leftovers(parent: Path, env: dict[str, str]) -> None:
    assert not [p.name for p in parent.iterdir() if ".lowbit-" in p.name]
    assert not list(Path(env["TMPDIR"]).iterdir())


def _is_compiled(directory: Path, before: dict) -> bool:
    meta = {p.key for p in onnx.load(str(directory / "model.onnx"), load_external_data=False).metadata_props}
    report = json.loads((directory / "report.json").read_text())
    kept = {k: v for k, v in snapshot(directory).items() if not k.startswith(("model.onnx", "report."))}
    return "lowbit.version" in meta and "lowbit_version" in report and kept == {
        k: v for k, v in before.items() if not k.startswith("model.onnx")}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    d = make_model_dir(tmp_path_factory.mktemp("tpl") / "m")
    (d / "sub").mkdir()
    (d / "sub" / "notes.txt").write_text("kept")
    os.symlink("config.json", d / "link.json")
    return d


def _directory_case(template: Path, root: Path, sig: signal.Signals, step: str) -> None:
    work = root / f"{sig.name}-{step.replace(':', '_')}"
    work.mkdir()
    m = work / "m"
    shutil.copytree(template, m, symlinks=True)
    before = snapshot(m)
    env = _env(work)
    proc = _pause_at(["compile", str(m), "-o", str(m), *RECIPE], step, env, 60 if sig == signal.SIGKILL else 1)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    rest = proc.stderr.read()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        recovered = run_lowbit("compile", str(m), "-o", str(work / "again"), *RECIPE, env=env)
        assert recovered.returncode == 0, recovered.stderr
        notice = [ln for ln in recovered.stderr.splitlines() if "interrupted lowbit" in ln]
        assert len(notice) == 1, recovered.stderr
        if step == "committed":
            assert "completed" in notice[0] and _is_compiled(m, before), (step, notice)
        else:
            assert snapshot(m) == before, (step, notice)
            assert ("restored" if step != "staged" else "removed the unfinished") in notice[0]
        shutil.rmtree(work / "again")
    else:
        # signals are held while the renames run: past "staged" the swap completes first
        assert code == 128 + sig, rest
        assert f"interrupted ({sig.name})" in rest.strip().splitlines()[-1]
        assert (snapshot(m) == before) if step == "staged" else _is_compiled(m, before), (sig, step)
    _no_leftovers(work, env)


def test_directory_in_place_every_step_every_signal(template, tmp_path):
    steps = _steps(template, tmp_path, ["compile", str(template), "-o", str(template), *RECIPE], "m")
    assert steps == ["staged", "prepared", "aside:m", "installed:m", "committed"]
    cases = [(sig, step) for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM) for step in steps]
    with ThreadPoolExecutor(max_workers=5) as pool:  # the processes mostly wait: run them side by side
        futures = {pool.submit(_directory_case, template, tmp_path, *case): case for case in cases}
    failed = {futures[f]: f.exception() for f in futures if f.exception() is not None}
    assert not failed, failed


def test_onnx_file_with_external_data_in_place_under_sigkill(tmp_path):
    """A .onnx whose weights are external data: killed at every step, it stays loadable."""
    src = tmp_path / "src"
    src.mkdir()
    ir.save(tiny_decoder(TinyConfig()), src / "net.onnx", external_data="net.onnx.data")
    args = ["compile", str(src / "net.onnx"), "-o", str(src / "net.onnx"), *RECIPE]
    steps = _steps(src, tmp_path, args, "net.onnx")
    assert "aside:net.onnx.data" in steps  # the compiled model is small: the old data goes away
    for step in steps:
        work = tmp_path / step.replace(":", "_")
        model = work / "src"
        shutil.copytree(src, model)
        before = snapshot(model)
        env = _env(work)
        proc = _pause_at([a.replace(str(src), str(model)) for a in args], step, env, 30)
        proc.kill()
        proc.wait(timeout=60)
        check = run_lowbit("compile", str(model / "net.onnx"), "-o", str(work / "x.onnx"), *RECIPE, env=env)
        assert check.returncode == 0, check.stderr  # this run recovers the interrupted swap first
        onnx.checker.check_model(str(model / "net.onnx"), full_check=True)  # loadable, data and all
        if step == "committed":
            assert not (model / "net.onnx.data").exists() and (model / "net.report.json").exists()
        else:
            assert snapshot(model) == before, step
        assert not [p.name for p in model.iterdir() if ".lowbit-" in p.name]
        assert not list(Path(env["TMPDIR"]).iterdir())
