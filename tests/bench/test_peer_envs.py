"""The peer protocol (bench/peers/PROTOCOL.md) end to end with a fake peer: set-up detection,
configs, build, an unavailable configuration, logits scored by the bench, speed."""

from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest

from lowbit.bench import peer_envs, runner
from lowbit.bench.contender import BuildContext
from lowbit.bench.peer_contenders import peer_contender
from lowbit.errors import LowbitError
from lowbit.models.evaluate import NextTokenScores

VOCAB = 7

FAKE_RUN = textwrap.dedent(f'''
    """A fake peer: logits[t] = one-hot(ids[t]) * 3 (it predicts the current token again)."""
    import argparse, json, sys
    from pathlib import Path
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    for k in ("--config", "--onnx", "--hf", "--gguf", "--calib", "--out", "--windows", "--logits", "--prompt",
              "--new-tokens", "--threads"):
        ap.add_argument(k)
    a = ap.parse_args()
    if a.cmd == "configs":
        print(json.dumps(["echo", "gone"]))
    elif a.cmd == "build":
        out = Path(a.out)
        if a.config == "gone":
            (out / "result.json").write_text(json.dumps({{"config": "gone", "unavailable": "needs a GPU (CUDA not found)"}}))
        else:
            calib = np.load(a.calib)
            (out / "model.bin").write_bytes(b"x" * 1000)
            (out / "result.json").write_text(json.dumps({{"config": "echo", "model": "model.bin", "runtime": "fake-rt",
                "compile_seconds": 1.5, "weight_grid": "echo grid", "bits_per_weight": 4.25,
                "calibration_windows": len(calib), "versions": {{}}, "note": ""}}))
    elif a.cmd == "logits":
        w = np.load(a.windows)
        out = np.lib.format.open_memmap(a.logits, mode="w+", dtype=np.float32, shape=(*w.shape, {VOCAB}))
        for i, row in enumerate(w):
            out[i] = np.eye({VOCAB}, dtype=np.float32)[row] * 3
        out.flush()
    elif a.cmd == "speed":
        print("progress on stdout before the result line")
        print(json.dumps({{"prefill_ms": 12.5, "decode_ms_per_token": 3.25, "threads": int(a.threads)}}))
    else:
        sys.exit(3)
''')


@pytest.fixture
def fake_peer(tmp_path, monkeypatch) -> peer_envs.PeerTool:
    peers = tmp_path / "peers"
    (peers / "fake").mkdir(parents=True)
    (peers / "fake" / "run.py").write_text(FAKE_RUN)
    (peers / "fake" / "requirements.txt").write_text("numpy\n")
    (peers / "half").mkdir()  # no requirements.txt: not a peer
    (peers / "half" / "run.py").write_text("")
    venvs = tmp_path / "venvs"
    monkeypatch.setattr(peer_envs, "PEERS_DIR", peers)
    monkeypatch.setattr(peer_envs, "venv_dir", lambda name: venvs / name)
    return peer_envs.PeerTool("fake")


def _pretend_installed(name: str) -> None:
    venv = peer_envs.venv_dir(name)
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")  # the test's own Python has numpy
    peer_envs._stamp(name).write_text(peer_envs._pins_digest(name) + "\n")


def test_peers_are_found_and_unset_up_peers_say_how_to_set_up(fake_peer):
    assert peer_envs.peer_names() == ["fake"]
    assert not peer_envs.is_set_up("fake")
    with pytest.raises(peer_envs.PeerUnavailable, match="lowbit-bench peers-setup fake"):
        fake_peer.configs()
    _pretend_installed("fake")
    assert peer_envs.is_set_up("fake")
    (peer_envs.PEERS_DIR / "fake" / "requirements.txt").write_text("numpy==2.0\n")  # pins changed
    assert not peer_envs.is_set_up("fake")


def test_build_logits_and_speed_through_the_protocol(fake_peer, tmp_path):
    _pretend_installed("fake")
    assert fake_peer.configs() == ["echo", "gone"]
    windows = np.random.default_rng(0).integers(0, VOCAB, size=(3, 9))
    work = tmp_path / "work" / "fake-echo"
    work.mkdir(parents=True)
    ctx = BuildContext(feeds=tuple({"input_ids": w[None]} for w in windows), windows=windows, work_dir=work,
                       description="3 windows")
    c = peer_contender(fake_peer, "echo")
    with pytest.MonkeyPatch.context() as mp:  # no real model: the inputs are only passed through
        mp.setattr("lowbit.bench.peer_contenders.hf_directory", lambda d: tmp_path)
        mp.setattr("lowbit.models.registry.resolve_model", lambda name: type("S", (), {"path": tmp_path / "x.gguf"}))
        path, seconds = c.build(tmp_path, ctx)
    assert path.name == "model.bin" and seconds == 1.5
    info = c.info(path)
    assert (info["runtime"], info["bits_per_weight"], info["calibration_windows"]) == ("fake-rt", 4.25, 3)
    assert runner._tree_size(path) == 1000
    # the bench scores the peer's logits against a reference like any contender's
    ref = np.stack([np.eye(VOCAB, dtype=np.float32)[np.roll(w, -1)] * 3 for w in windows])
    scores = runner._scores(c, path, windows, ref, None, tmp_path)
    expected = NextTokenScores()
    for w, r in zip(windows, ref):
        expected.add(np.eye(VOCAB, dtype=np.float32)[w] * 3, w, r)
    assert scores.perplexity() == expected.perplexity() and scores.agreement() == expected.agreement()
    assert not list(tmp_path.glob("fake-*.npy"))  # scratch files removed
    assert runner._speed(c, path, windows[0], None, tmp_path) == (12.5, 3.25)


def test_an_unavailable_configuration_carries_the_peers_reason(fake_peer, tmp_path):
    _pretend_installed("fake")
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(peer_envs.PeerUnavailable, match="needs a GPU"):
        fake_peer.build("gone", {k: tmp_path for k in ("onnx", "hf", "gguf", "calib")}, out)


def test_a_failing_peer_is_one_line_naming_it(fake_peer, tmp_path):
    _pretend_installed("fake")
    with pytest.raises(LowbitError, match=r"peer fake: run.py nonsense failed \(exit 3\)"):
        fake_peer._run("nonsense")


def test_setup_rejects_unknown_peers(fake_peer):
    from argparse import Namespace

    with pytest.raises(LowbitError, match="unknown peer.*known: fake"):
        peer_envs.run(Namespace(peers=["nope"]))


def _row(name, kind, bits, pydoc, news, **extra):
    def t(ppl, kl, top1):
        return {"ppl": ppl, "kl": kl, "top1": top1}

    return {"name": name, "kind": kind, "runtime": "onnxruntime", "calib": "-", "bits": bits, "size": 1e8,
            "seconds": 1.0, "texts": {"pydoc": t(*pydoc), "news": news if isinstance(news, str) else t(*news)},
            "basic": None, "ov": None, "prefill": 10.0, "decode": None, "grid": f"{name} grid", "note": "", **extra}


def test_table_writer_rows_ratios_unavailable_peers_and_peer_wins():
    rows = [_row("fp32", "fp32", 32.0, (10.0, 0.0, 1.0), (20.0, 0.0, 1.0)),
            _row("peer-a", "peer", 4.5, (10.5, 0.02, 0.9), (21.0, 0.05, 0.85), note="runs in OpenVINO"),
            _row("peer-b", "peer", 8.0, (10.1, 0.01, 0.95), "error"),
            _row("lowbit-x", "lowbit", 4.6, (10.4, 0.03, 0.91), (22.0, 0.04, 0.86))]
    lines = runner.peer_table(["pydoc", "news"], rows, [("peer-c", "needs CUDA (no GPU)")])
    text = "\n".join(lines)
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 1 + len(rows) and all(line.count("|") == table[0].count("|") for line in table)
    assert "| peer-a | onnxruntime | - | 4.50 | 100.0 | 1.0 | 10.50 | 1.050 | 0.0200 | 90.0 | 21.00 | 1.050 |" in text
    assert "| error | - | - | - |" in text  # a text the peer could not score
    assert "- **peer-c**: not measured: needs CUDA (no GPU)" in text
    assert "- **peer-a**: peer-a grid -- runs in OpenVINO" in text
    # peer-a (4.50 bits <= 4.60) beats lowbit-x on pydoc KL and news ppl; peer-b has more bits: not listed
    wins = text.split("(accuracy cells):")[1]
    assert "**peer-a** (4.50 bits/weight) beats **lowbit-x** (4.60): pydoc KL 0.0200 vs 0.0300; news ppl 21.00 vs 22.00" in wins
    assert "peer-b" not in wins and "pydoc ppl" not in wins


@pytest.mark.parametrize("peer", ["nncf", "quark", "modelopt"])
def test_shipped_peers_list_encoder_configurations_and_ask_for_feeds(peer, tmp_path):
    """`configs --kind encoder` and the argument check of `build --kind encoder` need only the
    standard library and numpy (the peer's own packages are imported by the build itself)."""
    import json
    import subprocess

    run_py = str(peer_envs.PEERS_DIR / peer / "run.py")
    out = subprocess.run([sys.executable, run_py, "configs", "--kind", "encoder"],
                         capture_output=True, text=True, check=True)
    configs = json.loads(out.stdout.strip().splitlines()[-1])
    assert configs and all(isinstance(c, str) for c in configs)
    done = subprocess.run([sys.executable, run_py, "build", "--kind", "encoder", "--config", configs[0],
                           "--onnx", "m.onnx", "--out", str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--calib-feeds" in done.stderr and not list(tmp_path.iterdir())
