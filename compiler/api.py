"""``lowbit.compile``: load a model, run the recipe's pipeline, return a savable result.

Inputs: an ``.onnx`` file, a directory holding ``model.onnx`` (an export, e.g. optimum's), a
shipped model name (exported on first use, cached), or an ``onnx_ir.Model``. Outputs: a
``CompiledModel`` whose ``save(path)`` writes ``.onnx`` (external data beside it when large) or a
directory, atomically, with ``report.json`` / ``report.md`` / ``report.html`` next to it.

Outputs go through :func:`lowbit.files.fsutil.check_model_output` (lowbit replaces only what
it wrote) and one journaled :class:`~lowbit.files.swap.Swap` per save, so a failure, a signal
or a kill leaves the old output or the new one. Directory outputs stay loadable by optimum
(``ORTModelForCausalLM`` / ``ORTModelForFeatureExtraction``):

- to a new directory: the input directory's companion data files (config, tokenizer, generation
  config, chat template: regular files ending in .json/.txt/.model/.jinja/.tiktoken/.md) are
  copied; code, symbolic links, subdirectories and other ``.onnx`` files are not (the report's
  ``source.not_copied`` lists them);
- in place (``save`` to the path the model was compiled from, a directory or a ``.onnx``): the
  directory is rebuilt in the swap's staging area -- new ``model.onnx`` + external data, every
  other entry hard-linked, links kept as links -- and swapped in by rename. The replaced FP32
  model stays in the swap's backup until the ``CompiledModel`` goes away: ``evaluate()``
  compares against it, and weights the compiled model still shares with its input (e.g. an
  embedding table) stay readable for a second ``save``.

The input's ``lowbit_export.json`` (which describes the FP32 export) is never carried over: a
compiled directory describes itself in ``report.json`` (recipe, versions, sites, and under
``source`` the export it came from) and in the ONNX ``metadata_props``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

import lowbit
from lowbit.compiler import report as report_mod
from lowbit.core.context import CalibrationData, CompileContext
from lowbit.files.fsutil import CONFIG_SUFFIX, check_model_output, file_output_names, normalized, recover_around
from lowbit.core.model_checks import check_onnx_graph
from lowbit.ort.ort_format import write_ort_format
from lowbit.compiler.pipeline import PipelineOptions, run_pipeline
from lowbit.core.float_types import widened_source
from lowbit.core.recipe import Recipe, load_recipe
from lowbit.models.fisher import shipped_fisher_provider
from lowbit.files.swap import Swap, remove_entry
from lowbit.errors import LowbitError

__all__ = ["CompiledModel", "compile", "load_onnx"]

logger = logging.getLogger(__name__)

_EXTERNAL_THRESHOLD = 64 * 1024 * 1024  # write weights as external data above this model size


def load_onnx(path: Path) -> ir.Model:
    """Load an ONNX file (with its external data) into onnx_ir, or raise a one-line LowbitError."""
    if not path.is_file():
        raise LowbitError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    try:
        onnx.checker.check_model(str(path))  # path form: handles > 2 GB and external data
        proto = onnx.load(str(path), load_external_data=False)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise LowbitError(f"{path}: not an ONNX model ({str(e).splitlines()[0].strip()})") from e
    except Exception as e:  # protobuf DecodeError and friends: corrupt or not ONNX at all
        raise LowbitError(f"{path}: not an ONNX model ({type(e).__name__})") from e
    check_onnx_graph(path, proto)  # names the tensor: unknown data type, external data out of its file, cycle
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise LowbitError(f"{path}: not an ONNX model ({type(e).__name__})") from e
    ir.external_data.set_base_dir(model.graph, path.parent)  # what ir.load does, without a second parse
    return model


@dataclass
class _Source:
    model: ir.Model
    directory: Path | None  # directory whose companion files (config, tokenizer) we keep
    label: str
    file: Path | None = None  # the .onnx read


def _resolve(model: str | Path | ir.Model) -> _Source:
    if isinstance(model, ir.Model):
        return _Source(model, None, "in-memory model")
    path = Path(model)
    if path.suffix == ".onnx" or path.is_file():
        recover_around(path)  # an in-place compile killed mid-swap is put right before reading
        return _Source(load_onnx(path), None, str(path), normalized(path))
    if path.is_dir():
        recover_around(path)
        return _Source(load_onnx(path / "model.onnx"), normalized(path), str(path), normalized(path) / "model.onnx")
    from lowbit.models.registry import SHIPPED

    if str(model) in SHIPPED:
        from lowbit.models.export import export_model

        directory = export_model(str(model))
        return _Source(load_onnx(directory / "model.onnx"), directory, str(model), directory / "model.onnx")
    raise LowbitError(f"{model}: not an .onnx file, a model directory, or a shipped model ({', '.join(SHIPPED)})")


def _calibration(arg: Any, source: _Source, recipe: Recipe) -> CalibrationData | None:
    """Calibration windows from: a CalibrationData; a sequence of arrays (token ids, or batches of
    pixel values for a model that reads ``pixel_values``); a path -- a text file for a text model,
    a directory of PNG/JPEG images for an image model; or, with no argument, the default data:
    the pydoc_data calibration split tokenized with the tokenizer of the model's directory (or
    beside a bare ``.onnx``), or matplotlib's sample images preprocessed by the image processor
    there (``preprocessor_config.json``). Image windows have no SLAC probes."""
    if isinstance(arg, CalibrationData):
        return arg
    images = "pixel_values" in {v.name for v in source.model.graph.inputs}
    cal = recipe.calibration
    if arg is not None and not isinstance(arg, (str, Path)):
        if images:  # [B, C, H, W] batches (a single [C, H, W] image is a batch of one)
            windows = [np.asarray(w, np.float32) for w in arg]
            return CalibrationData([w[None] if w.ndim == 3 else w for w in windows], source="given pixel values")
        windows = [np.asarray(w, np.int64) for w in arg]  # 1-D windows or [batch, seq]
        length = windows[0].shape[-1] if windows else 0
        # SLAC probes: prefixes of the same windows, i.e. the same text with a shorter context
        probes = {n: [w[..., :n] for w in windows[: cal.slac_windows]] for n in cal.slac_lengths if n < length}
        return CalibrationData(windows, {n: p for n, p in probes.items() if p}, source="given token windows")
    if not recipe.needs_calibration:
        return None
    beside = source.directory or (source.file.parent if source.file is not None else None)
    where = source.file or source.directory or "the in-memory model"
    from lowbit.models import data

    if images:
        if arg is not None and not Path(arg).is_dir():
            raise LowbitError(f"{where} reads images (pixel_values): calibrate it on a directory of PNG/JPEG "
                              f"images (--calib-images), not on {arg}")  # fmt: skip
        if beside is None:
            raise LowbitError("an in-memory image model has no image processor beside it: pass pixel_values batches")
        from lowbit.models.registry import load_image_processor

        windows = data.image_windows(load_image_processor(beside), cal.windows, image_dir=arg)
        return CalibrationData(windows, source=str(arg) if arg else "matplotlib sample images")
    if arg is not None and Path(arg).is_dir():
        raise LowbitError(f"{where} reads token ids: calibrate it on a text file (--calib-text), not on the "
                          f"directory {arg}")  # fmt: skip
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    if beside is None or not any((beside / f).is_file() for f in tokenizer_files):
        if arg is None:
            return None  # the calibrate pass reports what is missing
        if beside is None:
            raise LowbitError("--calib-text needs the model's tokenizer (tokenizer.json): an in-memory model has none")
        raise LowbitError(f"--calib-text needs the model's tokenizer (tokenizer.json) next to {where}: {beside} "
                          "has neither tokenizer.json nor tokenizer_config.json; copy the model directory's there")
    from lowbit.models.registry import load_tokenizer, max_positions

    limit = max_positions(beside)
    longest = max((cal.seq_len, *(cal.slac_lengths if cal.slac_windows else ())))
    if limit is not None and longest > limit[0]:
        raise LowbitError(f"calibration windows of {longest} tokens exceed the model's {limit[0]} positions "
                          f"({limit[1]} in {beside / 'config.json'}): set calibration.seq_len and "
                          f"calibration.slac_lengths to at most {limit[0]} (--set)")  # fmt: skip
    tokenizer = load_tokenizer(beside)
    windows = list(data.calibration_windows(tokenizer, cal.seq_len, cal.windows, text_file=arg))
    probes = {n: list(data.calibration_windows(tokenizer, n, cal.slac_windows, text_file=arg))
              for n in cal.slac_lengths if cal.slac_windows and n != cal.seq_len}  # fmt: skip
    return CalibrationData(windows, probes, source=str(arg) if arg else "pydoc_data calibration split",
                           vocab_size=len(tokenizer))


# Files of an input directory that describe the input, not the compiled model.
_SOURCE_ONLY = frozenset({"lowbit_export.json", "report.json", "report.md", "report.html"})
# What a new output directory takes from its input directory: data files that deployment loaders
# read (config, tokenizer, generation config, chat template), never code, links or other models.
_COMPANION_SUFFIXES = frozenset({".json", ".txt", ".model", ".jinja", ".tiktoken", ".md"})


def _is_model_file(name: str) -> bool:
    """model.onnx, its external data (.data, _data) and what --ort-format derives from it."""
    return name.startswith("model.onnx") or name in ("model.ort", f"model{CONFIG_SUFFIX}")


def _source_info(directory: Path) -> dict[str, Any]:
    """What the input directory held: its export record and model size on disk."""
    size = sum(f.stat().st_size for f in directory.iterdir()
               if f.is_file() and not f.is_symlink() and _is_model_file(f.name))  # fmt: skip
    info: dict[str, Any] = {"directory": str(directory), "model_bytes": size}
    meta = directory / "lowbit_export.json"
    if meta.is_file() and not meta.is_symlink():
        try:
            info["export"] = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info["export"] = "unreadable"
    return info


def _link_or_copy(src: Path, dst: Path) -> None:
    """Rebuild ``src`` at ``dst`` for an in-place compile: links stay links (never followed),
    files are hard-linked (copied across filesystems), directories rebuilt entry by entry."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        shutil.copystat(src, dst)
        for entry in src.iterdir():
            _link_or_copy(entry, dst / entry.name)
    else:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:  # links not supported here
            shutil.copy2(src, dst, follow_symlinks=False)


def _carry_companions(source: Path, dest: Path, *, everything: bool) -> list[str]:
    """Config/tokenizer files into a new directory (regular files of known data kinds only; the
    names passed over are returned); every other entry, unchanged, when in place."""
    skipped = []
    for f in sorted(source.iterdir()):
        if _is_model_file(f.name) or f.name in _SOURCE_ONLY:
            continue
        if everything:
            _link_or_copy(f, dest / f.name)
        elif f.is_file() and not f.is_symlink() and f.suffix in _COMPANION_SUFFIXES:
            shutil.copyfile(f, dest / f.name, follow_symlinks=False)
        else:
            skipped.append(f.name)
    return skipped


@dataclass
class CompiledModel:
    model: ir.Model
    recipe: Recipe
    report: dict[str, Any]
    source_dir: Path | None = None
    source_file: Path | None = None  # the input .onnx (the model file of source_dir for directories)
    saved_to: Path | None = field(default=None, init=False)
    _baseline: Path | None = field(default=None, init=False, repr=False)  # the input's model, once replaced
    _keepalive: list = field(default_factory=list, init=False, repr=False)

    def save(self, path: str | Path, *, ort_format: bool = False, force: bool = False) -> Path:
        """Write the model (``.onnx`` file or directory) with its reports, atomically and only over
        what lowbit wrote (:func:`lowbit.files.fsutil.check_model_output`; ``force`` lifts the
        marker check). ``ort_format``: also the ONNX Runtime mobile ``.ort`` and its operator config.
        The input's own path is replaced in place (see the module docstring)."""
        from lowbit.files.paths import cache_root

        path = normalized(path)
        is_dir = path.suffix != ".onnx"
        recover_around(path)
        sources = tuple(p for p in (self.source_dir, self.source_file) if p is not None)
        check_model_output(path, is_dir=is_dir, sources=sources, force=force, cache=cache_root())
        in_place = any(path.resolve() == normalized(s).resolve() for s in sources)
        names = [path.name] if is_dir else file_output_names(path, ort_format=ort_format)
        with Swap(path.parent, names, keep_backup=in_place) as swap:
            tmp = swap.new_path(path.name)
            if is_dir:
                tmp.mkdir()
                if self.source_dir is not None:
                    skipped = _carry_companions(self.source_dir, tmp, everything=in_place)
                    if skipped:
                        self.report.setdefault("source", {})["not_copied"] = skipped
                _write_onnx(self.model, tmp / "model.onnx")
                if ort_format:
                    write_ort_format(tmp / "model.onnx")
                report_mod.write(self.report, tmp, "report", atomic=False)
            else:
                _write_onnx(self.model, tmp)
                if ort_format:
                    write_ort_format(tmp)
                report_mod.write(self.report, tmp.parent, f"{path.stem}.report", atomic=False)
        if in_place:
            self._adopt_input(swap, path, is_dir)
        self.saved_to = path
        return path

    def _adopt_input(self, swap: Swap, path: Path, is_dir: bool) -> None:
        """After an in-place swap the replaced input sits in the swap's backup until this object
        goes away: the FP32 weights the compiled model may still read, and evaluate()'s baseline.
        Its entries that live on in the new directory (hard links) are dropped from the backup:
        onnx refuses external data files with two links."""
        old_dir = swap.backup_path(path.name) if is_dir else swap.backup_path("").parent
        if is_dir:
            for f in old_dir.iterdir():
                if not _is_model_file(f.name):
                    remove_entry(f)
        where = path.resolve() if is_dir else path.resolve().parent
        for value in self.model.graph.initializers.values():
            tensor = widened_source(value.const_value) or value.const_value  # a lazily widened float16 weight reads its source
            if isinstance(tensor, ir.ExternalTensor) and Path(tensor.base_dir or ".").resolve() == where:
                tensor.base_dir = str(old_dir)
        if self._baseline is None:  # a second in-place save replaced a compiled model, not the FP32 one
            self._baseline = old_dir / "model.onnx" if is_dir else old_dir / path.name
        self._keepalive.append(weakref.finalize(self, swap.finish))

    def evaluate(self, **options: Any) -> dict[str, Any]:
        """Measure the saved model as ``lowbit eval`` does (options: ``EvalOptions`` fields);
        the baseline defaults to the FP32 model it was compiled from. The result is also stored
        under ``report["evaluation"]`` and the saved report files are rewritten with it."""
        if self.saved_to is None:
            raise LowbitError("save the compiled model before evaluating it")
        from lowbit.models.cli_eval import EvalOptions, evaluate_saved

        baseline = self._baseline or self.source_file
        kept_baseline = "baseline" not in options and self._baseline is not None
        if baseline is not None:
            options.setdefault("baseline", str(baseline))
        result = evaluate_saved(self.saved_to, **options)
        if kept_baseline:  # name the input, not the backup kept for it
            result["baseline"]["path"] = f"{self.report.get('input', 'the input')} (FP32, before the in-place compile)"
        effective = asdict(EvalOptions(**options))
        effective.pop("baseline")
        if result["model"]["kind"] == "causal-lm":
            effective.pop("texts")
        else:
            effective = {k: v for k, v in effective.items() if k not in ("seq_len", "windows")}
        self.report["evaluation"] = {**result, "options": effective}
        if self.saved_to.suffix == ".onnx":
            report_mod.write(self.report, self.saved_to.parent, f"{self.saved_to.stem}.report")
        else:
            report_mod.write(self.report, self.saved_to, "report")
        return result


def _write_onnx(model: ir.Model, path: Path) -> None:
    """Save ``model`` self-contained: every weight in ``path`` or in its own ``path.data``, never a
    reference to the input's data file (which an in-place compile removes, and which another
    directory does not have)."""
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if total > _EXTERNAL_THRESHOLD:
        ir.save(model, path, external_data=f"{path.name}.data")
        return
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):  # small model: read it in
            value.const_value = ir.tensor(value.const_value.numpy(), dtype=value.const_value.dtype, name=value.name)
    ir.save(model, path)


def compile(  # noqa: A001 - the public verb of the product
    model: str | Path | ir.Model,
    recipe: str | Path | Recipe = "w8a8",
    *,
    target: str | None = None,
    calibration: Any = None,
    overrides: Sequence[str] = (),
    verify: bool = False,
    dump_dir: str | Path | None = None,
) -> CompiledModel:
    """Compile ``model`` with ``recipe`` (a name, a TOML path or a Recipe); see module docs.
    Bad input of any kind raises :class:`LowbitError` (one line), before the model is loaded
    wherever it can be told from the arguments alone."""
    options = PipelineOptions(verify=verify, dump_dir=dump_dir)  # validates dump_dir
    overrides = list(overrides) + ([f"target={target}"] if target else [])
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise LowbitError("overrides apply to recipe names or files, not to a Recipe object")
    start = time.perf_counter()
    source = _resolve(model)
    data = _calibration(calibration, source, recipe)
    windows = list(data.windows) if data is not None else []
    ctx = CompileContext(source.model, recipe, data, fisher_provider=shipped_fisher_provider(source.label, windows))
    ctx.report.update({"input": source.label, "lowbit_version": lowbit.__version__, "versions": report_mod.versions()})
    if source.directory is not None:
        ctx.report["source"] = _source_info(source.directory)
    run_pipeline(ctx, options)
    ctx.report["compile_seconds"] = round(time.perf_counter() - start, 3)
    _stamp_metadata(ctx)
    return CompiledModel(ctx.model, recipe, ctx.report, source.directory, source.file)


def _stamp_metadata(ctx: CompileContext) -> None:
    """metadata_props let a deployment pipeline tell what a model holds."""
    formats_used = sorted({s.get("weights", "float") for s in ctx.report["sites"].values() if s.get("quantized")})
    ctx.model.metadata_props.update({
        "lowbit.version": lowbit.__version__,
        "lowbit.recipe": ctx.recipe.name,
        "lowbit.target": ctx.recipe.target,
        "lowbit.weight_formats": ",".join(formats_used),
        "lowbit.sites": json.dumps({k: v.get("weights", "float") for k, v in ctx.report["sites"].items()}),
    })  # fmt: skip
