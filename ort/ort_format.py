"""Write an ONNX Runtime mobile ``.ort`` file (and its reduced operator config) for a saved model.

Uses ONNX Runtime's own converter, ``onnxruntime.tools.convert_onnx_models_to_ort``, in its
*fixed* optimization style for ARM (``target_platform="arm"``, phones): the ``.ort`` holds the
graph after all of ORT's CPU optimizations, so the QDQ MatMuls are already fused into integer
kernels (MatMulIntegerToFloat) and the phone does no graph work at load. Measured on ORT 1.31.1:
such an ``.ort`` gives the same logits, bit for bit, as the ``.onnx`` at ORT's default options
(with ``session.qdqisint8allowed = 1``, the converter's ARM setting). The *runtime* style (QDQ kept
for NNAPI/QNN partitioning, fusions replayed at load) runs the QDQ in float unless replay is
enabled, and replay fails on these graphs ("Not enough produced nodes in the runtime optimization
record"); an NPU execution provider can take the ``.onnx`` itself. The operator config
(``*.required_operators_and_types.config``, with type reduction) is the input of ORT's reduced
"minimal" build (``--include_ops_by_config``) that ships on the phone.

Guarantees: the files appear next to the ``.onnx`` only when the conversion succeeded (written
into a temporary directory first, then renamed); a failure is a one-line :class:`LowbitError`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.files.fsutil import CONFIG_SUFFIX

__all__ = ["ORT_SESSION_CONFIG", "config_path_for", "ort_path_for", "write_ort_format"]

# The session config the converter optimizes with (target_platform="arm"); an .onnx session with
# it applies the same fusions as the .ort holds.
ORT_SESSION_CONFIG = {"session.qdqisint8allowed": "1"}



def ort_path_for(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".ort")


def config_path_for(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(CONFIG_SUFFIX)


def write_ort_format(onnx_file: Path, dest: Path | None = None) -> tuple[Path, Path]:
    """Convert ``onnx_file`` (external data beside it is fine) into ``dest.ort`` and
    ``dest.required_operators_and_types.config``; ``dest`` defaults to ``onnx_file``."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    dest = dest or onnx_file
    with tempfile.TemporaryDirectory(prefix=".lowbit-ort-", dir=dest.parent) as tmp:
        work = Path(tmp)
        # The converter walks a directory for *.onnx files: give it exactly one (plus its data).
        model_dir = work / "in"
        model_dir.mkdir()
        _link_or_copy(onnx_file, model_dir / "model.onnx")
        data = onnx_file.with_name(onnx_file.name + ".data")
        if data.exists():  # the .onnx names its data file: keep that name
            _link_or_copy(data, model_dir / data.name)
        out = work / "out"
        try:  # the converter prints a line per step and logs the config path: keep both quiet
            with contextlib.redirect_stdout(io.StringIO()), _quiet("ort_format_model.utils"):
                convert_onnx_models_to_ort(model_dir, output_dir=out, optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform="arm", enable_type_reduction=True)  # fmt: skip
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LowbitError(f"{onnx_file}: ONNX Runtime could not convert it to the .ort format: {first[:300]}") from e
        ort_files = list(out.glob("*.ort"))
        configs = list(out.glob("*.config"))
        if len(ort_files) != 1 or len(configs) != 1:
            raise LowbitError(f"{onnx_file}: the .ort conversion produced {len(ort_files)} models and {len(configs)} configs")
        targets = (ort_path_for(dest), config_path_for(dest))
        # the config's header names the model it came from: the final name, not the temporary one
        configs[0].write_text(configs[0].read_text().replace(str(ort_files[0]), targets[0].name))
        for src, target in zip((ort_files[0], configs[0]), targets):
            os.replace(src, target)
    return targets


@contextlib.contextmanager
def _quiet(logger_name: str):
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same directory tree: no copy of a few hundred MB
    except OSError:
        shutil.copyfile(src, dst)
