"""Locate the native op library and register it with ONNX Runtime.

Assumes: ``runtime_ext/build.py`` (``make native``) built ``liblowbit_ort.so`` next to this file;
nothing here builds or downloads anything.
Guarantees: :func:`library_path` either returns an existing file or raises :class:`LowbitError`
telling the user to run ``make native``.
"""

from __future__ import annotations

__all__ = ["library_path", "session_options", "LIBRARY_NAME"]

from pathlib import Path

from lowbit.errors import LowbitError

LIBRARY_NAME = "liblowbit_ort.so"


def library_path() -> Path:
    """Path of the built custom-op library (domain ``lowbit``)."""
    path = Path(__file__).resolve().parent / LIBRARY_NAME
    if not path.is_file():
        raise LowbitError(
            f"native lowbit ORT ops not built ({path} is missing): run `make native` "
            "(or `python runtime_ext/build.py`)")
    return path


def session_options(base=None):
    """``onnxruntime.SessionOptions`` with the lowbit op library registered.

    ``base``: options to register the library on (modified in place and returned); a fresh
    ``SessionOptions`` when None. Register once per options object.
    """
    import onnxruntime as ort  # deferred: importing lowbit must not require onnxruntime

    opts = ort.SessionOptions() if base is None else base
    opts.register_custom_ops_library(str(library_path()))
    return opts
