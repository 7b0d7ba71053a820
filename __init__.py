"""lowbit: an ONNX graph-rewriting compiler that turns exported models into low-bit ONNX.

The repository root is this package; its folders are the subpackages:
``lowbit.formats`` (exact number formats), ``lowbit.passes`` (graph passes),
``lowbit.compiler`` (pipeline, recipes, CLI), ``lowbit.models`` (adapters, export, eval),
``lowbit.runtime_ext`` (native ONNX Runtime ops), ``lowbit.bench`` (side-by-side benchmarks).

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
