"""Build runtime_ext/liblowbit_ort.so, the native lowbit ONNX Runtime custom-op library.

Run as ``python runtime_ext/build.py`` (the Makefile's ``native`` target does). Never imported
by the package at run time.

Assumes: ``g++`` (C++17) on PATH and PyPI reachable through pip the first time. ORT's C/C++ API
headers ship neither in the onnxruntime wheel nor in Debian; the ``amd-quark`` wheel carries the
ORT 1.17 headers (API 17, which ORT 1.31 still serves). They are fetched with
``pip download --no-deps`` into ``runtime_ext/_build/`` (git-ignored) and only the four headers
of ``core/session/`` are extracted; nothing third-party is committed or installed.
Guarantees: incremental (no work when the .so is newer than every source and the build script);
a portable x86-64 baseline (no -march) whose AVX2/FMA kernels are compiled per function and
chosen at run time with ``__builtin_cpu_supports``; failures exit 1 with a one-line message.
"""

from __future__ import annotations

__all__ = ["build", "main", "LIBRARY", "HEADER_DIR"]

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
BUILD = HERE / "_build"
HEADER_DIR = BUILD / "include"
LIBRARY = HERE / "liblowbit_ort.so"

QUARK_SPEC = "amd-quark==0.13"
QUARK_HEADER_PREFIX = (
    "quark/onnx/operators/custom_ops/include/onnxruntime-1.17.0/onnxruntime/core/session/"
)
HEADERS = (
    "onnxruntime_c_api.h",
    "onnxruntime_cxx_api.h",
    "onnxruntime_cxx_inline.h",
    "onnxruntime_float16.h",
)
CXXFLAGS = (
    "-O3", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden",
    "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
)


class BuildError(RuntimeError):
    """A build step failed; the message is one line saying what to fix."""


def _fetch_headers() -> None:
    if all((HEADER_DIR / h).is_file() for h in HEADERS):
        return
    BUILD.mkdir(parents=True, exist_ok=True)
    wheels = sorted(BUILD.glob("amd_quark-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", str(BUILD), QUARK_SPEC]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(BUILD.glob("amd_quark-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"could not download {QUARK_SPEC} for the ORT headers "
                             f"(pip download failed: {last})")
    HEADER_DIR.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as zf:
        for name in HEADERS:
            try:
                data = zf.read(QUARK_HEADER_PREFIX + name)
            except KeyError as e:
                raise BuildError(f"{wheels[-1].name} lacks {QUARK_HEADER_PREFIX}{name}") from e
            (HEADER_DIR / name).write_bytes(data)


def _sources() -> list[Path]:
    return sorted(SRC.glob("*.cc"))


def _up_to_date() -> bool:
    if not LIBRARY.is_file():
        return False
    inputs = [*_sources(), *SRC.glob("*.h"), *SRC.glob("*.inc"), Path(__file__).resolve()]
    return LIBRARY.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


def build(force: bool = False) -> Path:
    """Build the library if needed and return its path; raises BuildError."""
    if not force and _up_to_date():
        return LIBRARY
    cxx = shutil.which("g++")
    if cxx is None:
        raise BuildError("g++ not found: install a C++17 compiler (Debian: apt-get install g++)")
    _fetch_headers()
    tmp = LIBRARY.with_name(LIBRARY.name + ".tmp")
    cmd = [cxx, *CXXFLAGS, f"-I{HEADER_DIR}", *map(str, _sources()), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr[:300])
        raise BuildError(f"g++ failed: {first.strip()}")
    tmp.replace(LIBRARY)  # atomic: a half-written .so is never picked up
    return LIBRARY


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path = build(force="--force" in args)
    except BuildError as e:
        print(f"runtime_ext build: {e}", file=sys.stderr)
        return 1
    print(f"runtime_ext build: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
