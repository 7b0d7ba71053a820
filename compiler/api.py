"""``lowbit.compile``: load a model, run the recipe's pipeline, return a savable result.

Inputs: an ``.onnx`` file, a directory holding ``model.onnx`` (an export, e.g. optimum's), a
shipped model name (exported on first use, cached), or an ``onnx_ir.Model``. Outputs: a
``CompiledModel`` whose ``save(path)`` writes ``.onnx`` (external data beside it when large) or a
directory (keeping the input directory's config/tokenizer files so optimum still loads it),
atomically, with ``report.json`` / ``report.md`` next to it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

import lowbit
from lowbit.compiler import report as report_mod
from lowbit.compiler.context import CalibrationData, CompileContext
from lowbit.compiler.fsutil import atomic_path
from lowbit.compiler.ort_format import write_ort_format
from lowbit.compiler.pipeline import PipelineOptions, run_pipeline
from lowbit.compiler.recipe import Recipe, load_recipe
from lowbit.errors import LowbitError

__all__ = ["CompiledModel", "compile", "load_onnx"]

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
    if recipe.activations.format == "none" and not recipe.precision.enabled:  # FGMP: Fisher, act. choice
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


@dataclass
class CompiledModel:
    model: ir.Model
    recipe: Recipe
    report: dict[str, Any]
    source_dir: Path | None = None
    saved_to: Path | None = field(default=None, init=False)

    def save(self, path: str | Path, *, ort_format: bool = False) -> Path:
        """Write the model (``.onnx`` file or directory) atomically, with its reports (``ort_format``:
        also the ONNX Runtime mobile ``.ort`` and its operator config beside the ``.onnx``)."""
        path = Path(path)
        is_dir = path.suffix != ".onnx"
        with atomic_path(path, is_dir=is_dir) as tmp:
            if is_dir:
                if self.source_dir is not None:
                    for f in self.source_dir.iterdir():
                        if f.is_file() and not f.name.startswith("model.onnx") and f.suffix != ".onnx":
                            shutil.copy2(f, tmp / f.name)
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
        self.saved_to = path
        return path

    def evaluate(self, **options: Any) -> dict[str, Any]:
        """Measure the saved model as ``lowbit eval`` does (options: ``EvalOptions`` fields);
        the baseline defaults to the FP32 model it was compiled from."""
        if self.saved_to is None:
            raise LowbitError("save the compiled model before evaluating it")
        from lowbit.models.cli_eval import evaluate_saved

        if self.source_dir is not None:
            options.setdefault("baseline", str(self.source_dir / "model.onnx"))
        return evaluate_saved(self.saved_to, **options)


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
