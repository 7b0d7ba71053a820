"""lowbit: an ONNX graph-rewriting compiler that turns exported models into low-bit ONNX.

The repository root is this package; its folders are the subpackages, in layers that import
only downward (pyproject ``[tool.importlinter]``, checked by the test suite):

- ``formats`` exact number formats (numpy only), under ``files`` (atomic outputs, scratch,
  caches) and ``runtime_ext`` (native ONNX Runtime ops and their ONNX fallbacks);
- ``core``: recipe schema and validation, compile context and analyses, linear/KV sites, folding;
- ``ort``: ONNX Runtime sessions, feeds, the observation run over calibration data;
- ``encode``: per-site exact encodings (RTN, OPTQ, refit, activation scales);
- ``passes``: function-preserving rewrites and analyses (canonicalize, smooth, reorder, FGMP);
- ``emit`` (one emitter per target) and, beside it, ``models`` (export, data, evaluation);
- ``compiler``: pipeline, API, report, the ``lowbit`` command line.

The benchmarks (bench/, the ``lowbit-bench`` command) sit on top; the product never imports them.

``lowbit.compile(model, recipe=..., target=..., calibration=...)`` is the Python entry point.
"""

__all__ = ["__version__", "LowbitError", "compile"]

__version__ = "0.1.0"

from lowbit.errors import LowbitError  # noqa: E402


def __getattr__(name: str):
    # Lazy: `import lowbit` stays cheap; the compiler pulls in onnx/onnx_ir/onnxscript.
    if name == "compile":
        from lowbit.compiler.api import compile

        return compile
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
