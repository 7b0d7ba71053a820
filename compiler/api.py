"""``lowbit.compile``: load a model, run the recipe's pipeline, return a savable result.

Inputs: an ``.onnx`` file, a directory holding ``model.onnx`` (an export, e.g. optimum's), a
shipped model name (exported on first use, cached), or an ``onnx_ir.Model``. Outputs: a
``CompiledModel`` whose ``save(path)`` writes ``.onnx`` (external data beside it when large) or a
directory, atomically, with ``report.json`` / ``report.md`` / ``report.html`` next to it.

Directory outputs stay loadable by optimum (``ORTModelForCausalLM`` / ``ORTModelForFeatureExtraction``):

- to a new directory: the input directory's companion files (config, tokenizer, generation
  config, ...) are copied; its other ``.onnx`` files are not (they would be uncompiled siblings);
- in place (``save`` to the directory the model was compiled from): the directory is rebuilt
  beside the original -- new ``model.onnx`` + external data, every other entry hard-linked -- and
  swapped in by rename, so a failure leaves the original untouched. The replaced FP32 model files
  stay in a hidden temporary sibling until the ``CompiledModel`` goes away: ``evaluate()``
  compares against them, and weights the compiled model still shares with its input (e.g. an
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
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

import lowbit
from lowbit.compiler import report as report_mod
from lowbit.compiler.context import CalibrationData, CompileContext
from lowbit.compiler.fsutil import atomic_path
from lowbit.compiler.ort_format import CONFIG_SUFFIX, write_ort_format
from lowbit.compiler.pipeline import PipelineOptions, run_pipeline
from lowbit.compiler.recipe import Recipe, load_recipe
from lowbit.errors import LowbitError

__all__ = ["CompiledModel", "check_in_place", "compile", "load_onnx"]

logger = logging.getLogger(__name__)

_EXTERNAL_THRESHOLD = 64 * 1024 * 1024  # write weights as external data above this model size


def load_onnx(path: Path) -> ir.Model:
    """Load an ONNX file (with its external data) into onnx_ir, or raise a one-line LowbitError."""
    if not path.is_file():
        raise LowbitError(f"{path}: no such file")
    try:
        onnx.checker.check_model(str(path))  # path form: handles > 2 GB and external data
        return ir.load(path)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise LowbitError(f"{path}: not an ONNX model ({str(e).splitlines()[0].strip()})") from e
    except Exception as e:  # protobuf DecodeError and friends: corrupt or not ONNX at all
        raise LowbitError(f"{path}: not an ONNX model ({type(e).__name__})") from e


@dataclass
class _Source:
    model: ir.Model
    directory: Path | None  # directory whose companion files (config, tokenizer) we keep
    label: str


def _resolve(model: str | Path | ir.Model) -> _Source:
    if isinstance(model, ir.Model):
        return _Source(model, None, "in-memory model")
    path = Path(model)
    if path.suffix == ".onnx" or path.is_file():
        return _Source(load_onnx(path), None, str(path))
    if path.is_dir():
        return _Source(load_onnx(path / "model.onnx"), path, str(path))
    from lowbit.models.registry import SHIPPED

    if str(model) in SHIPPED:
        from lowbit.models.export import export_model

        directory = export_model(str(model))
        return _Source(load_onnx(directory / "model.onnx"), directory, str(model))
    raise LowbitError(f"{model}: not an .onnx file, a model directory, or a shipped model ({', '.join(SHIPPED)})")


def _calibration(arg: Any, source: _Source, recipe: Recipe) -> CalibrationData | None:
    """Token windows from: a CalibrationData, a sequence of id arrays, a text file, or the
    default calibration split tokenized with the source directory's tokenizer."""
    if isinstance(arg, CalibrationData):
        return arg
    if arg is not None and not isinstance(arg, (str, Path)):
        windows = [np.asarray(w, np.int64) for w in arg]  # 1-D windows or [batch, seq]
        cal, length = recipe.calibration, windows[0].shape[-1] if windows else 0
        # SLAC probes: prefixes of the same windows, i.e. the same text with a shorter context
        probes = {n: [w[..., :n] for w in windows[: cal.slac_windows]] for n in cal.slac_lengths if n < length}
        return CalibrationData(windows, {n: p for n, p in probes.items() if p}, source="given token windows")
    # FGMP (Fisher, activation choice), smoothing and OPTQ (X^T X) need data even for float activations
    needs_data = recipe.precision.enabled or recipe.smooth.method != "none" or recipe.rounding.method == "optq"
    if recipe.activations.format == "none" and not needs_data:
        return None
    if source.directory is None:
        if arg is None:
            return None  # the calibrate pass reports what is missing
        raise LowbitError("--calib-text needs a model directory with a tokenizer next to model.onnx")
    from lowbit.models import data
    from lowbit.models.registry import load_tokenizer

    cal = recipe.calibration
    tokenizer = load_tokenizer(source.directory)
    windows = list(data.calibration_windows(tokenizer, cal.seq_len, cal.windows, text_file=arg))
    probes = {n: list(data.calibration_windows(tokenizer, n, cal.slac_windows, text_file=arg))
              for n in cal.slac_lengths if cal.slac_windows and n != cal.seq_len}  # fmt: skip
    return CalibrationData(windows, probes, source=str(arg) if arg else "pydoc_data calibration split")


# Files of an input directory that describe the input, not the compiled model.
_SOURCE_ONLY = frozenset({"lowbit_export.json", "report.json", "report.md", "report.html"})


def _is_model_file(name: str) -> bool:
    """model.onnx, its external data (.data, _data) and what --ort-format derives from it."""
    return name.startswith("model.onnx") or name in ("model.ort", f"model{CONFIG_SUFFIX}")


def _source_info(directory: Path) -> dict[str, Any]:
    """What the input directory held: its export record and model size on disk."""
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and _is_model_file(f.name))
    info: dict[str, Any] = {"directory": str(directory), "model_bytes": size}
    meta = directory / "lowbit_export.json"
    if meta.is_file():
        info["export"] = json.loads(meta.read_text())
    return info


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy)
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(src, dst)


def check_in_place(directory: Path) -> None:
    """Refuse to compile lowbit's own export cache in place (every later compile reads it)."""
    from lowbit.models.export import cache_root

    if directory.resolve().is_relative_to(cache_root().resolve()):
        raise LowbitError(f"{directory} is in lowbit's export cache: compile it to a new directory, or "
                          "`lowbit export MODEL -o DIR` first and compile DIR in place")  # fmt: skip


def _carry_companions(source: Path, dest: Path, *, everything: bool) -> None:
    """Config/tokenizer files into a new directory; every other entry when in place."""
    for f in source.iterdir():
        if _is_model_file(f.name) or f.name in _SOURCE_ONLY:
            continue
        if everything:
            _link_or_copy(f, dest / f.name)
        elif f.is_file() and f.suffix != ".onnx":
            shutil.copy2(f, dest / f.name)


@dataclass
class CompiledModel:
    model: ir.Model
    recipe: Recipe
    report: dict[str, Any]
    source_dir: Path | None = None
    saved_to: Path | None = field(default=None, init=False)
    _kept_source: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)
    _fp32_dir: Path | None = field(default=None, init=False, repr=False)  # the input, once replaced in place

    def save(self, path: str | Path, *, ort_format: bool = False) -> Path:
        """Write the model (``.onnx`` file or directory) atomically, with its reports (``ort_format``:
        also the ONNX Runtime mobile ``.ort`` and its operator config beside the ``.onnx``); a directory
        equal to the input directory is replaced in place (see the module docstring)."""
        path = Path(path)
        is_dir = path.suffix != ".onnx"
        source = self.source_dir
        in_place = is_dir and source is not None and path.exists() and path.resolve() == source.resolve()
        kept = old_input = None
        if in_place:
            check_in_place(source)
            kept = tempfile.TemporaryDirectory(prefix=f".{path.name}.fp32-", dir=path.resolve().parent)
            old_input = Path(kept.name) / path.name  # where the swap moves the input directory
        with atomic_path(path, is_dir=is_dir, keep_old=old_input) as tmp:
            if is_dir:
                if source is not None:
                    _carry_companions(source, tmp, everything=in_place)
                _write_onnx(self.model, tmp / "model.onnx")
                if ort_format:
                    write_ort_format(tmp / "model.onnx")
                report_mod.write(self.report, tmp, "report")
            else:
                _write_onnx(self.model, tmp)
                if ort_format:  # renamed into place before the .onnx, the commit point
                    write_ort_format(tmp, dest=path)
                data = tmp.with_name(tmp.name + ".data")
                if data.exists():  # the .onnx rename below is the commit point
                    os.replace(data, path.with_name(data.name))
        if not is_dir:
            report_mod.write(self.report, path.parent, f"{path.stem}.report")
        if in_place:
            self._adopt_input(kept, old_input, path)
        self.saved_to = path
        return path

    def _adopt_input(self, kept: tempfile.TemporaryDirectory, old_input: Path, path: Path) -> None:
        """After an in-place swap: keep the replaced input's model files (the FP32 weights the
        compiled model may still read, and evaluate()'s baseline) until this object goes away, and
        drop the rest, which lives on (hard-linked) in the new directory: a file with two links is
        what onnx and onnx_ir refuse to read as external data."""
        for f in old_input.iterdir():
            if _is_model_file(f.name):
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                f.unlink()
        where = path.resolve()
        for value in self.model.graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and Path(tensor.base_dir or ".").resolve() == where:
                tensor.base_dir = str(old_input)
        if self._kept_source is None:  # a second in-place save replaced a compiled model, not the FP32 one
            self._kept_source, self._fp32_dir = kept, old_input
        else:
            kept.cleanup()

    def evaluate(self, **options: Any) -> dict[str, Any]:
        """Measure the saved model as ``lowbit eval`` does (options: ``EvalOptions`` fields);
        the baseline defaults to the FP32 model it was compiled from. The result is also stored
        under ``report["evaluation"]`` and the saved report files are rewritten with it."""
        if self.saved_to is None:
            raise LowbitError("save the compiled model before evaluating it")
        from lowbit.models.cli_eval import EvalOptions, evaluate_saved

        fp32_dir = self._fp32_dir or self.source_dir
        kept_baseline = "baseline" not in options and self._fp32_dir is not None
        if fp32_dir is not None:
            options.setdefault("baseline", str(fp32_dir / "model.onnx"))
        result = evaluate_saved(self.saved_to, **options)
        if kept_baseline and "source" in self.report:  # name the input, not the hidden directory kept for it
            result["baseline"]["path"] = f"{self.report['source']['directory']} (FP32, before the in-place compile)"
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
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if total > _EXTERNAL_THRESHOLD:
        ir.save(model, path, external_data=f"{path.name}.data")
    else:
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
    """Compile ``model`` with ``recipe`` (a name, a TOML path or a Recipe); see module docs."""
    overrides = list(overrides) + ([f"target={target}"] if target else [])
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise LowbitError("overrides apply to recipe names or files, not to a Recipe object")
    start = time.perf_counter()
    source = _resolve(model)
    ctx = CompileContext(source.model, recipe, _calibration(calibration, source, recipe))
    ctx.report.update({"input": source.label, "lowbit_version": lowbit.__version__, "versions": report_mod.versions()})
    if source.directory is not None:
        ctx.report["source"] = _source_info(source.directory)
    run_pipeline(ctx, PipelineOptions(verify=verify, dump_dir=Path(dump_dir) if dump_dir else None))
    ctx.report["compile_seconds"] = round(time.perf_counter() - start, 3)
    _stamp_metadata(ctx)
    return CompiledModel(ctx.model, recipe, ctx.report, source.directory)


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
