"""Export a model to an ONNX directory that optimum's ORTModel classes can load.

Output directory: ``model.onnx`` (+ ``model.onnx.data`` when the weights exceed
:data:`EXTERNAL_DATA_THRESHOLD`), ``config.json``, tokenizer files and ``lowbit_export.json``
(what was exported, how, with which versions).

Two exporters:

* default: ``torch.onnx.export(dynamo=True, opset 23)`` with dynamic batch and sequence. Causal
  LMs are wrapped to return only ``logits`` with ``use_cache=False`` (the HF model itself fails on
  DynamicCache); encoders return ``last_hidden_state``. Norms come out fused
  (``RMSNormalization`` / ``LayerNormalization``), attention as opset-23 ``Attention``.
* ``with_past=True``: optimum's ``main_export(task="text-generation-with-past")``, opset 18,
  ``past_key_values.N.key/value`` inputs; norms decomposed (Pow/ReduceMean/.../Mul).

Every written model gets ``ir_version <= ORT_MAX_IR_VERSION``: onnx 1.23 writes IR 14 by default
and ONNX Runtime 1.31 rejects anything above 13.

Exports are cached under ``$LOWBIT_CACHE/exports`` (default ``~/.cache/lowbit``), keyed by the
model's identity (name, file size and mtime), the options, and the torch/transformers/onnx/optimum
versions. Writing is atomic: an interrupted export leaves nothing in the cache or at ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from lowbit.files.fsutil import atomic_path
from lowbit.files.paths import cache_root
from lowbit.errors import LowbitError
from lowbit.models.registry import ModelSource, check_hf_directory, load_tokenizer, load_torch_model, resolve_model

__all__ = [
    "export_model",
    "fix_ir_version",
    "EXPORT_OPSET",
    "WITH_PAST_OPSET",
    "ORT_MAX_IR_VERSION",
    "EXTERNAL_DATA_THRESHOLD",
]

log = logging.getLogger(__name__)

EXPORT_OPSET = 23
WITH_PAST_OPSET = 18
# IR 11 is the version that introduced opset 23; ORT 1.31 accepts up to IR 13.
ORT_MAX_IR_VERSION = 11
# Below this many weight bytes the model is one self-contained .onnx file.
EXTERNAL_DATA_THRESHOLD = 256 * 2**20
_EXPORT_FORMAT = 2  # bump when the layout of an export changes, to invalidate caches
_META = "lowbit_export.json"


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "transformers", "onnx", "optimum-onnx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def _cache_dir(src: ModelSource, with_past: bool) -> Path:
    stat = src.path.stat() if src.path.is_file() else (src.path / "config.json").stat()
    key = {
        "model": src.name,
        "size": stat.st_size,
        "mtime": int(stat.st_mtime),
        "with_past": with_past,
        "format": _EXPORT_FORMAT,
        "versions": _versions(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = Path(src.name).name.replace(".", "-")
    return cache_root() / "exports" / f"{slug}{'-past' if with_past else ''}-{digest}"


def fix_ir_version(onnx_file: Path) -> int:
    """Rewrite ``onnx_file`` (and its external data) with IR <= ORT_MAX_IR_VERSION and the
    weights stored externally iff they exceed EXTERNAL_DATA_THRESHOLD. Returns the opset."""
    import onnx

    model = onnx.load(str(onnx_file))  # loads external data into memory
    model.ir_version = min(model.ir_version, ORT_MAX_IR_VERSION)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    for f in onnx_file.parent.iterdir():  # drop the exporter's own external-data files
        if f != onnx_file and f.name.startswith(onnx_file.name):
            f.unlink()
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    onnx.save(
        model,
        str(onnx_file),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=onnx_file.name + ".data",
        size_threshold=1024,
    )
    for f in onnx_file.parent.glob(onnx_file.name + "*"):
        f.chmod(0o644)  # onnx writes external data 0600; an export dir is meant to be shared
    return opset


def _export_dynamo(model: Any, kind: str, onnx_file: Path) -> None:
    import torch

    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=8192)
    if kind == "causal-lm":

        class LogitsOnly(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
                # Explicit [batch, seq] positions: with HF's default [1, seq] the exported
                # RotaryEmbedding gets batch-1 cos/sin caches, which ORT rejects for batch > 1.
                batch, seq = input_ids.shape
                positions = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
                return self.inner(input_ids=input_ids, position_ids=positions, use_cache=False).logits

        wrapper, names, outputs = LogitsOnly(model), ["input_ids"], ["logits"]
    else:

        class HiddenOnly(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
                out = self.inner(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                )
                return out.last_hidden_state

        wrapper, outputs = HiddenOnly(model), ["last_hidden_state"]
        names = ["input_ids", "attention_mask", "token_type_ids"]
    # batch 2 x seq 16 sample: a size-1 dimension would be specialised to a constant.
    wrapper.eval()
    sample = tuple(torch.ones(2, 16, dtype=torch.int64) for _ in names)
    dynamic = {n: {0: batch, 1: seq} for n in names}
    with torch.no_grad():
        torch.onnx.export(
            wrapper, sample, str(onnx_file), dynamo=True, opset_version=EXPORT_OPSET,
            input_names=names, output_names=outputs, dynamic_shapes=dynamic,
            external_data=True, verbose=False,
        )


def _export_with_past(model: Any, tokenizer: Any, out: Path) -> None:
    from optimum.exporters.onnx import main_export

    from lowbit.files.scratch import scratch_dir

    with scratch_dir("hf-") as hf_dir:
        # optimum exports from a directory; GGUF-loaded models must be saved as HF first.
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        main_export(
            str(hf_dir), output=str(out), task="text-generation-with-past", opset=WITH_PAST_OPSET,
            device="cpu", do_validation=False, local_files_only=True, trust_remote_code=False,
        )


def _drop_gguf_copies(out: Path) -> None:
    # A GGUF-loaded tokenizer saves its vocab_file, i.e. a 98 MB copy of the whole GGUF, as
    # tokenizer.model; tokenizer.json already holds the full fast tokenizer.
    for f in out.glob("tokenizer.model"):
        with f.open("rb") as fh:
            if fh.read(4) == b"GGUF":
                f.unlink()


def _build(src: ModelSource, with_past: bool, out: Path) -> None:
    from tqdm import tqdm

    if with_past and src.kind != "causal-lm":
        raise LowbitError(f"{src.name}: --with-past applies to causal LMs only")
    steps = tqdm(total=3, desc=f"export {Path(src.name).name}", unit="step", leave=False, disable=None)
    t0 = time.perf_counter()
    steps.set_postfix_str("load torch model")
    model, tokenizer = load_torch_model(src), load_tokenizer(src)
    steps.update()
    steps.set_postfix_str("optimum export (with past)" if with_past else "torch.onnx dynamo export")
    if with_past:
        _export_with_past(model, tokenizer, out)
    else:
        _export_dynamo(model, src.kind, out / "model.onnx")
        model.config.save_pretrained(out)
        tokenizer.save_pretrained(out)
    _drop_gguf_copies(out)
    steps.update()
    steps.set_postfix_str("save (IR version, external data)")
    opset = fix_ir_version(out / "model.onnx")
    steps.update()
    steps.close()
    meta = {
        "model": src.name, "kind": src.kind, "weight_grid": src.weight_grid,
        "exporter": "optimum text-generation-with-past" if with_past else "torch.onnx dynamo",
        "with_past": with_past, "opset": opset, "versions": _versions(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / _META).write_text(json.dumps(meta, indent=2) + "\n")


def export_model(model: str, *, with_past: bool = False, out_dir: str | os.PathLike | None = None,
                 force: bool = False) -> Path:
    """Export ``model`` (shipped name or HF directory) and return the export directory.

    The export is built once into the cache; with ``out_dir`` the cached directory is copied
    there (atomically) and ``out_dir`` is returned, otherwise the cache directory is. An existing
    ``out_dir`` is replaced only under :func:`lowbit.files.fsutil.check_model_output`'s rules.
    """
    src = resolve_model(model)
    if src.format == "onnx":
        raise LowbitError(f"{model} is already an ONNX model: compile or eval it directly")
    if out_dir is not None:  # fail before a minute of export, not after
        from lowbit.files.fsutil import check_model_output

        sources = (src.path,) if src.format == "hf-dir" else ()
        out_dir = check_model_output(out_dir, is_dir=True, sources=sources, force=force, cache=cache_root())
        if out_dir == src.path:
            raise LowbitError(f"-o {out_dir} is the model directory itself: export into a new directory")
    cached = _cache_dir(src, with_past)
    if not (cached / _META).is_file():
        if src.format == "hf-dir":  # safetensors only, no custom code: refused before any progress output
            check_hf_directory(src.path)
        cached.parent.mkdir(parents=True, exist_ok=True)
        log.info("exporting %s into %s", src.name, cached)
        with atomic_path(cached, is_dir=True) as tmp:
            _build(src, with_past, tmp)
    else:
        log.info("using cached export %s", cached)
    if out_dir is None:
        return cached
    out = Path(out_dir)
    with atomic_path(out, is_dir=True) as tmp:
        tmp.rmdir()
        shutil.copytree(cached, tmp)
    return out
