"""The peer tools of ``bench/peers`` (run in their own venvs, :mod:`lowbit.bench.peer_envs`) as
bench contenders: one contender ``PEER-CONFIG`` per configuration a set-up peer offers, or one
``PEER`` row that says how to set it up. Every peer builds from the run's inputs: the FP32 ONNX
export lowbit compiles, the same model as a Hugging Face directory (for builders that read one),
the GGUF it came from (llama.cpp) and the run's calibration windows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import lowbit.bench.peers  # noqa: F401 -- registers ONNX Runtime's quantizers first: table order is registration order
from lowbit.bench.contender import CONTENDERS, BuildContext, Contender, register
from lowbit.bench.peer_envs import PeerTool, PeerUnavailable, is_set_up, peer_names

__all__ = ["encoder_peer_contender", "hf_directory", "peer_contender"]


def hf_directory(fp32_dir: Path) -> Path:
    """SmolLM2 as a Hugging Face directory (FP32 safetensors + tokenizer), written once into the
    cache next to the export: what builders that read HF weights (ORT GenAI) start from."""
    from lowbit.files.fsutil import atomic_path
    from lowbit.files.paths import cache_root
    from lowbit.models.registry import load_tokenizer, load_torch_model, resolve_model

    out = cache_root() / "bench" / f"{fp32_dir.name}-hf"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        model = load_torch_model(resolve_model("smollm2-135m"))
        with atomic_path(out, is_dir=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(fp32_dir).save_pretrained(tmp)
    return out


def _inputs(fp32_dir: Path, ctx: BuildContext) -> dict[str, Path]:
    from lowbit.models.registry import resolve_model

    if ctx.windows is None:
        raise PeerUnavailable("peers are run on causal LMs only")
    calib = ctx.work_dir.parent / "calibration-windows.npy"
    if not calib.exists():
        np.save(calib, np.asarray(ctx.windows, dtype=np.int64))
    return {"onnx": fp32_dir / "model.onnx", "hf": hf_directory(fp32_dir),
            "gguf": resolve_model("smollm2-135m").path, "calib": calib}


def _result_dir(path: Path) -> Path:
    """The build directory (the one holding result.json) of a peer's model file or directory."""
    return next(p for p in [path, *path.parents] if (p / "result.json").is_file())


def _result(path: Path) -> dict:
    return json.loads((_result_dir(path) / "result.json").read_text())


def peer_contender(tool: PeerTool, config: str) -> Contender:
    def build(fp32_dir: Path, ctx: BuildContext) -> tuple[Path, float]:
        out = ctx.work_dir / "out"
        out.mkdir()
        start = time.perf_counter()
        result = tool.build(config, _inputs(fp32_dir, ctx), out)
        seconds = float(result.get("compile_seconds") or time.perf_counter() - start)
        return out / result["model"], seconds

    return Contender(f"{tool.name}-{config}", f"{tool.name} ({config}), run in its own venv", "(from the peer)", build,
                     frozenset({"causal-lm"}), runtime="(its result.json)",
                     logits=lambda path, windows, scratch: tool.logits(_result_dir(path), windows, scratch),
                     speed=lambda path, prompt, scratch: tool.speed(_result_dir(path), prompt, 32, 2, scratch),
                     info=_result)


def _feeds_file(ctx: BuildContext) -> Path:
    """The run's encoder calibration batches as ``<input>.<batch>`` arrays (PROTOCOL.md)."""
    f = ctx.work_dir.parent / "calibration-feeds.npz"
    if not f.exists():
        np.savez(f, **{f"{k}.{i}": np.asarray(v, dtype=np.int64) for i, feed in enumerate(ctx.feeds) for k, v in feed.items()})
    return f


def encoder_peer_contender(tool: PeerTool, config: str, name: str | None = None) -> Contender:
    """An encoder configuration: built in the peer's venv, embedded by the bench itself (ORT or OpenVINO)."""

    def build(fp32_dir: Path, ctx: BuildContext) -> tuple[Path, float]:
        out = ctx.work_dir / "out"
        out.mkdir()
        result = tool.build(config, {"onnx": fp32_dir / "model.onnx", "calib-feeds": _feeds_file(ctx)}, out)
        return out / result["model"], float(result["compile_seconds"])

    return Contender(name or f"{tool.name}-{config}", f"{tool.name} ({config}), built in its own venv", "(from the peer)",
                     build, frozenset({"encoder"}), runtime="(its result.json)", info=_result)


def _not_set_up(name: str) -> Contender:
    def build(fp32_dir: Path, ctx: BuildContext) -> tuple[Path, float]:
        raise PeerUnavailable(f"not set up: run `lowbit-bench peers-setup {name}` (or `make bench`)")

    return Contender(name, f"{name}, run in its own venv", "-", build, frozenset({"causal-lm", "encoder"}))


for _name in peer_names():
    if is_set_up(_name):
        _tool = PeerTool(_name)
        for _config in _tool.configs():
            register(peer_contender(_tool, _config))
        for _config in _tool.configs("encoder"):  # a name a causal-LM configuration took gets "-encoder"
            _shown = f"{_tool.name}-{_config}" + ("-encoder" if f"{_tool.name}-{_config}" in CONTENDERS else "")
            register(encoder_peer_contender(_tool, _config, _shown))
    else:
        register(_not_set_up(_name))
