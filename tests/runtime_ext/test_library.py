"""Library location, SessionOptions registration and the incremental build."""

from __future__ import annotations

import pytest

from lowbit.errors import LowbitError


def test_session_options_registers_the_library(native_lib):
    import onnxruntime as ort

    from lowbit import runtime_ext as rx

    assert rx.library_path() == native_lib
    base = ort.SessionOptions()
    base.intra_op_num_threads = 1
    opts = rx.session_options(base)
    assert opts is base and opts.intra_op_num_threads == 1


def test_missing_library_says_run_make_native(monkeypatch):
    from lowbit.runtime_ext import library

    monkeypatch.setattr(library, "LIBRARY_NAME", "liblowbit_missing.so")
    with pytest.raises(LowbitError, match="run `make native`"):
        library.library_path()


def test_build_is_incremental_and_reports_missing_compiler(native_lib, monkeypatch):
    from lowbit.runtime_ext import build

    mtime = native_lib.stat().st_mtime_ns
    assert build._up_to_date()
    assert build.build() == native_lib and native_lib.stat().st_mtime_ns == mtime  # no rebuild
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.BuildError, match="g\\+\\+ not found"):
        build.build(force=True)
    assert native_lib.is_file()  # a failed build never removes the working library
