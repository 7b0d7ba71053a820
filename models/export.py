"""Export a model to an ONNX directory that optimum's ORTModel classes can load.

Output directory: ``model.onnx`` (+ ``model.onnx.data`` when the weights exceed
:data:`EXTERNAL_DATA_THRESHOLD`), ``config.json``, tokenizer files (text models) or
``preprocessor_config.json`` (image models, when the source has one) and ``lowbit_export.json``
(what was exported, how, with which versions). The ONNX ``metadata_props`` carry the task and
kind (``lowbit.export.task``, ``lowbit.export.kind``).

What is exported follows the model's task (:func:`lowbit.models.registry.hf_task`):

* causal LMs (``*ForCausalLM``, ``*LMHeadModel``): ``input_ids`` -> ``logits`` [B, T, vocab];
* text encoders: ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` where the model takes
  them) -> ``last_hidden_state`` (base model) or ``logits`` (the head the config names: fill-mask,
  sequence or token classification);
* encoder-decoder models (T5, BART): their **encoder** only, as a text encoder (the export record
  and the CLI line say so);
* image models: ``pixel_values`` [B, C, H, W] (static H, W from the config) -> ``logits`` or
  ``last_hidden_state``.

Exporters:

* default: ``torch.onnx.export(dynamo=True, opset 23)`` with dynamic batch (and sequence). Causal
  LMs are wrapped to return only ``logits`` with ``use_cache=False`` (the HF model itself fails on
  DynamicCache). Norms come out fused (``RMSNormalization`` / ``LayerNormalization``), attention
  as opset-23 ``Attention``. Should torch.onnx fail on an architecture that optimum supports for
  the task, optimum's ``main_export`` (opset 18) exports it instead, and the record says why.
* ``with_past=True`` (causal LMs only): optimum's ``main_export(task="text-generation-with-past")``,
  opset 18, ``past_key_values.N.key/value`` inputs; norms decomposed (Pow/ReduceMean/.../Mul).

Every written model gets ``ir_version <= ORT_MAX_IR_VERSION``: onnx 1.23 writes IR 14 by default
and ONNX Runtime 1.31 rejects anything above 13.

Exports are cached under ``$LOWBIT_CACHE/exports`` (default ``~/.cache/lowbit``), keyed by the
model's identity (name, file size and mtime), the options, and the torch/transformers/onnx/optimum
versions. Writing is atomic: an interrupted export leaves nothing in the cache or at ``out_dir``.
"""

from __future__ import annotations

import hashlib
import inspect
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
from lowbit.errors import LowbitError, printable
from lowbit.models.registry import (KIND_METADATA, ModelSource, ModelTask, check_hf_directory, load_image_processor,
                                    load_tokenizer, load_torch_model, resolve_model)  # fmt: skip

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
_EXPORT_FORMAT = 3  # bump when the layout of an export changes, to invalidate caches
_META = "lowbit_export.json"
TASK_METADATA = "lowbit.export.task"


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


def fix_ir_version(onnx_file: Path, metadata: dict[str, str] | None = None) -> int:
    """Rewrite ``onnx_file`` (and its external data) with IR <= ORT_MAX_IR_VERSION and the
    weights stored externally iff they exceed EXTERNAL_DATA_THRESHOLD; ``metadata`` is added to
    its ``metadata_props``. Returns the opset."""
    import onnx

    model = onnx.load(str(onnx_file))  # loads external data into memory
    model.ir_version = min(model.ir_version, ORT_MAX_IR_VERSION)
    if metadata:
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **metadata})
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


def _forward_params(module: Any) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


def _wrapper(model: Any, task: ModelTask) -> tuple[Any, list[str], Any]:
    """(module returning the one output tensor, its input names, a sample input tuple) for ``task``."""
    import torch

    inner = model.get_encoder() if task.encoder_only else model
    params = _forward_params(inner)

    class OneOutput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(names, args))
            if task.kind == "causal-lm":
                if "position_ids" in params:
                    # Explicit [batch, seq] positions: with HF's default [1, seq] the exported
                    # RotaryEmbedding gets batch-1 cos/sin caches, which ORT rejects for batch > 1.
                    batch, seq = kwargs["input_ids"].shape
                    kwargs["position_ids"] = torch.arange(seq, device=args[0].device).unsqueeze(0).expand(batch, seq)
                kwargs["use_cache"] = False
            return getattr(self.inner(**kwargs), task.output)

    if task.kind == "vision":
        config = model.config
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        names = ["pixel_values"]
        sample: tuple = (torch.rand(2, getattr(config, "num_channels", 3), *size),)
    else:
        names = ["input_ids"] if task.kind == "causal-lm" else \
            ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in params else [])  # fmt: skip
        # ids 1 (not 0: a pad id) for a batch 2 x seq 16 sample: a size-1 dimension would be
        # specialised to a constant
        sample = tuple(torch.ones(2, 16, dtype=torch.int64) for _ in names)
        if "token_type_ids" in names:
            sample = (*sample[:2], torch.zeros(2, 16, dtype=torch.int64))
    return OneOutput().eval(), names, sample


def _export_dynamo(model: Any, task: ModelTask, onnx_file: Path) -> None:
    import torch

    wrapper, names, sample = _wrapper(model, task)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=8192)
    dynamic = {n: ({0: batch} if n == "pixel_values" else {0: batch, 1: seq}) for n in names}
    with torch.no_grad():
        torch.onnx.export(
            wrapper, sample, str(onnx_file), dynamo=True, opset_version=EXPORT_OPSET,
            input_names=names, output_names=[task.output], dynamic_shapes={"args": tuple(dynamic[n] for n in names)},
            external_data=True, verbose=False,
        )


def _optimum_task(model: Any, task: ModelTask, with_past: bool) -> str | None:
    """optimum's name of what we export, if optimum exports this model type for it (else None)."""
    if task.encoder_only:
        return None  # optimum splits encoder-decoder models into encoder_model.onnx + decoders
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers optimum's ONNX configs
    from optimum.exporters.tasks import TasksManager

    name = "feature-extraction" if task.task == "image-feature-extraction" else task.task
    name += "-with-past" if with_past else ""
    model_type = str(getattr(model.config, "model_type", "")).replace("_", "-")
    try:
        supported = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:  # optimum knows nothing of this model type
        return None
    return name if name in supported else None


def _export_optimum(model: Any, companion: Any, task: str, out: Path) -> None:
    from optimum.exporters.onnx import main_export

    from lowbit.files.scratch import scratch_dir

    with scratch_dir("hf-") as hf_dir:
        # optimum exports from a directory; GGUF-loaded models must be saved as HF first, and a
        # user's directory is only read through lowbit's own loaders (safetensors, no code).
        model.save_pretrained(hf_dir)
        if companion is not None:
            companion.save_pretrained(hf_dir)
        main_export(
            str(hf_dir), output=str(out), task=task, opset=WITH_PAST_OPSET,
            device="cpu", do_validation=False, local_files_only=True, trust_remote_code=False,
        )


def _companion(src: ModelSource, task: ModelTask) -> Any:
    """The tokenizer (text models) or the image processor (image models; None when the source has
    no preprocessor_config.json: calibration then needs one beside the export)."""
    if task.kind != "vision":
        return load_tokenizer(src)
    if not (src.path / "preprocessor_config.json").is_file():
        return None  # the export record says so
    return load_image_processor(src.path)


def _drop_gguf_copies(out: Path) -> None:
    # A GGUF-loaded tokenizer saves its vocab_file, i.e. a 98 MB copy of the whole GGUF, as
    # tokenizer.model; tokenizer.json already holds the full fast tokenizer.
    for f in out.glob("tokenizer.model"):
        with f.open("rb") as fh:
            if fh.read(4) == b"GGUF":
                f.unlink()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return printable(text.splitlines()[0][:200]) if text else type(e).__name__


def _export(src: ModelSource, model: Any, companion: Any, with_past: bool, out: Path) -> tuple[str, str | None]:
    """Write ``out/model.onnx`` (+ config and companion files); (exporter used, why it was not
    the default one or None)."""
    task = src.torch_task
    if with_past:
        optimum_task = _optimum_task(model, task, with_past=True)
        if optimum_task is None:
            raise LowbitError(f"{src.name}: optimum cannot export {task.architecture} with a KV cache "
                              "(text-generation-with-past): export without --with-past")  # fmt: skip
        _export_optimum(model, companion, optimum_task, out)
        return f"optimum {optimum_task}", None
    try:
        _export_dynamo(model, task, out / "model.onnx")
    except Exception as e:  # torch.export / onnx conversion failures of this architecture
        optimum_task = _optimum_task(model, task, with_past=False)
        if optimum_task is None:
            raise LowbitError(f"{src.name}: torch.onnx cannot export {task.describe()} and optimum does not "
                              f"support it: {type(e).__name__}: {_first_line(e)}") from e  # fmt: skip
        note = f"torch.onnx dynamo failed ({type(e).__name__}: {_first_line(e)})"
        log.warning("%s: %s; exporting with optimum %s instead", src.name, note, optimum_task)
        for f in out.iterdir():
            f.unlink()
        _export_optimum(model, companion, optimum_task, out)
        return f"optimum {optimum_task}", note
    model.config.save_pretrained(out)
    if companion is not None:
        companion.save_pretrained(out)
    return "torch.onnx dynamo", None


def _build(src: ModelSource, with_past: bool, out: Path) -> dict[str, Any]:
    from tqdm import tqdm

    task = src.torch_task
    if with_past and task.kind != "causal-lm":
        raise LowbitError(f"{src.name}: --with-past applies to causal LMs only ({task.describe()})")
    steps = tqdm(total=3, desc=f"export {Path(src.name).name}", unit="step", leave=False, disable=None)
    t0 = time.perf_counter()
    steps.set_postfix_str("load torch model")
    model, companion = load_torch_model(src), _companion(src, task)
    steps.update()
    steps.set_postfix_str("optimum export (with past)" if with_past else "torch.onnx dynamo export")
    exporter, note = _export(src, model, companion, with_past, out)
    _drop_gguf_copies(out)
    steps.update()
    steps.set_postfix_str("save (IR version, external data)")
    opset = fix_ir_version(out / "model.onnx", {TASK_METADATA: task.task, KIND_METADATA: task.kind})
    steps.update()
    steps.close()
    meta = {
        "model": src.name, "kind": task.kind, "task": task.task, "architecture": task.architecture,
        "exported": task.describe(), "encoder_only": task.encoder_only, "weight_grid": src.weight_grid,
        "exporter": exporter, "with_past": with_past, "opset": opset, "versions": _versions(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    notes = [note] if note else []
    if task.kind == "vision" and companion is None:
        notes.append("the source has no preprocessor_config.json: calibrating the export needs one beside it")
    if notes:
        meta["notes"] = notes
    (out / _META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


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
