"""Bad recipes, ``--set`` values, Fisher side files, ``--dump-dir`` paths and bench arguments: one
line on stderr, exit 2, nothing left behind -- and OPTQ's numba kernels run without a writable
``$HOME`` or package directory.

Before (each reproduced here first):

- a non-UTF-8 recipe file: ``UnicodeDecodeError``; 100000 nested arrays or inline tables:
  ``RecursionError`` in tomllib; an integer of 5000 digits: ``ValueError`` (int() digit limit);
  a directory or FIFO named ``x.toml`` "did not exist" / hung; no size limit;
- ``--set sites.exclude=[1]`` was accepted (tuple elements were never checked) and ``fnmatch``
  failed later; ``calibration.slac_lengths=["a"]``: ``TypeError`` in the dataclass;
  ``precision.seed=-1``: ``ValueError`` from numpy in the pass; ``act_fp8_fraction=-inf`` and
  other non-finite floats passed where only an upper bound was checked; values were quoted whole
  (a megabyte string made a megabyte line); ``weights.block_size=10**12`` allocated rows padded to
  10^12 elements;
- ``precision.fisher_file`` was opened only inside the FGMP pass, after calibration: a text file
  or garbage raised numpy's ``ValueError``/``BadZipFile``, a string array ``TypeError`` (isfinite),
  an npz header claiming 10^12 elements a ``MemoryError``;
- ``--dump-dir`` naming a file: ``FileExistsError``; a missing parent was created silently;
- any compile (not only OPTQ) raised numba's "cannot cache function ... no locator available"
  at import when neither ``$HOME`` nor the package's ``__pycache__`` was writable;
- ``lowbit-bench run -o DIR`` (or a device or FIFO) measured for minutes, then replaced it (as root,
  ``-o /dev/full`` replaced the device node); ``--sections ,`` wrote an empty report and
  ``--contenders ,`` ran every contender.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shlex
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import lowbit
from lowbit.core.recipe import (MAX_RECIPE_BYTES, ActivationSpec, CalibrationSpec, Recipe, WeightSpec, describe_keys,
                                    load_recipe)
from lowbit.errors import LowbitError

from .conftest import assert_user_error, make_model_dir, run_lowbit

PACKAGE_DIR = Path(lowbit.__file__).resolve().parent
SMALL = ["--set", "calibration.seq_len=64", "--set", "calibration.windows=2", "--set", "calibration.slac_windows=0"]


def _error(fn, *args) -> str:
    with pytest.raises(LowbitError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def _toml(tmp_path: Path, content: str | bytes, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# -- 1. recipe files ---------------------------------------------------------------------------


@pytest.mark.parametrize("content, fragment", [
    (b'description = "caf\xe9"\n', "is not UTF-8 text (byte 0xe9 at offset 18)"),
    (b"\xff\xfe[\x00w\x00]\x00", "is not UTF-8 text (byte 0xff at offset 0)"),
    ("a = " + "[" * 100000 + "]" * 100000, "nested too deeply"),
    ("a = " + "{x = " * 100000 + "1" + "}" * 100000, "nested too deeply"),
    ("[weights]\nblock_size = " + "9" * 5000, "is not valid TOML: Exceeds the limit (4300 digits)"),
    ("[weights\nformat = 1", "is not valid TOML"),
    ("weights = 5", "recipe key 'weights' must be a table, got 5"),
    ("[[weights]]\nformat = 'int8'", "recipe key 'weights' must be a table, got [{'format': 'int8'}]"),
    ("[weights]\nblock_size = '32'", "recipe key 'weights.block_size' must be int (an integer), got '32'"),
    ("[weights]\nblock_size = 1979-05-27", "recipe key 'weights.block_size' must be int (an integer), got datetime.date"),
    ("[weights]\nformat.x = 1", "recipe key 'weights.format' must be str (a string), got {'x': 1}"),
    ("name = 1", "recipe key 'name' must be str"),
    ("[sites]\nexclude = [1]", "recipe key 'sites.exclude' must be a list of str (a string each), got 1 in it"),
    ("[calibration]\nslac_lengths = ['a']", "recipe key 'calibration.slac_lengths' must be a list of int"),
    ("[smooth]\nalpha_grid = [0.5, nan]", "recipe key 'smooth.alpha_grid' must be a list of float (a finite number each), got nan"),
    ('"a\\nb\\u001b[31m" = 1', r"unknown recipe key 'a\nb\x1b[31m'"),  # escaped: one line, no terminal codes
    ("[weights]\nformat = '" + "x" * 500_000 + "'", "recipe key 'weights.format': 'xxxxxxxxxx"),  # quoted short
])  # fmt: skip
def test_bad_recipe_file_is_one_line_error(tmp_path, content, fragment):
    path = _toml(tmp_path, content)
    assert fragment in _error(load_recipe, path)


def test_recipe_file_that_is_not_a_small_regular_file(tmp_path):
    huge = _toml(tmp_path, "description = '" + "x" * MAX_RECIPE_BYTES + "'\n", "huge.toml")
    assert f"recipe file {huge} is larger than 1 MiB" in _error(load_recipe, huge)
    sparse = tmp_path / "sparse.toml"
    with sparse.open("wb") as f:
        f.truncate(64 << 30)  # 64 GiB of holes: refused after reading 1 MiB, not 64 GiB
    assert "is larger than 1 MiB" in _error(load_recipe, sparse)
    (tmp_path / "dir.toml").mkdir()
    assert f"recipe file {tmp_path / 'dir.toml'} is a directory" in _error(load_recipe, tmp_path / "dir.toml")
    os.mkfifo(tmp_path / "fifo.toml")  # nobody writes it: opening must not wait for a writer
    assert "is not a regular file" in _error(load_recipe, tmp_path / "fifo.toml")
    assert "does not exist" in _error(load_recipe, tmp_path / "missing.toml")
    assert "cannot be opened" in _error(load_recipe, "a\0b.toml")
    # an editor's byte-order mark is not an error
    assert load_recipe(_toml(tmp_path, "\ufeff[weights]\nformat = 'int4'\n", "bom.toml")).weights.format == "int4"


# -- 2. every key, every wrong type -------------------------------------------------------------


def _keys() -> list[tuple[str, str, object]]:
    """(dotted key, annotation, default) of every recipe key and section, from the dataclasses."""
    rows = []
    for f in dataclasses.fields(Recipe):
        section = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        if section is None:
            rows.append((f.name, f.type, f.default))
            continue
        rows.append((f.name, "section", None))
        rows += [(f"{f.name}.{sf.name}", sf.type, sf.default) for sf in dataclasses.fields(section)]
    return rows


def _non_negative(default) -> bool:
    values = default if isinstance(default, tuple) else (default,)
    return all(v >= 0 for v in values)


def _bad_values(ftype: str, default) -> list[str]:
    """TOML text of values a key of this type must refuse (a negative one when the default is >= 0:
    no key with a non-negative default takes negative values)."""
    table, out = "{a = 1}", []
    if ftype == "int":
        out = ['"abc"', "1.5", "nan", "inf", "[1]", table, "true"] + (["-1"] if _non_negative(default) else [])
    elif ftype == "float":
        out = ['"abc"', "nan", "inf", "-inf", "1" + "0" * 400, "[0.5]", table, "true"] + (["-1.0"] if _non_negative(default) else [])
    elif ftype == "bool":
        out = ['"yes"', "1", "0.0", "[true]", table]
    elif ftype == "str":
        out = ["1", "1.5", "true", '["a"]', table]
    elif ftype == "section":
        out = ["1", '"x"', "[1]", "true"]
    elif ftype.startswith("tuple["):
        out = ['"abc"', "5", table, "[{a = 1}]", "[[1]]", "[true]"]
        elem = ftype[len("tuple["):-len(", ...]")]
        out += {"int": ['["a"]', "[1.5]", "[nan]"], "float": ['["a"]', "[nan]", "[inf]"], "str": ["[1]", "[0.5]"]}[elem]
        if elem != "str" and _non_negative(default):
            out.append("[-1]")
    assert out, f"no bad values for annotation {ftype!r}: teach this test the new type"
    return out


SWEEP = [(key, value) for key, ftype, default in _keys() for value in _bad_values(ftype, default)]


def test_sweep_covers_every_documented_key():
    documented = {key for key, _, _ in describe_keys()}
    assert documented <= {key for key, _ in SWEEP}
    assert len(documented) >= 40


@pytest.mark.parametrize("key, value", SWEEP, ids=[f"{k}={v}" for k, v in SWEEP])
def test_every_key_refuses_wrong_types_naming_the_key(key, value):
    assert f"recipe key '{key}'" in _error(load_recipe, "w8a8", [f"{key}={value}"])


@pytest.mark.parametrize("key, value", SWEEP[::3], ids=[f"{k}={v}" for k, v in SWEEP[::3]])
def test_python_construction_checks_types_too(key, value):
    """The dataclasses validate themselves: ``lowbit.compile(model, recipe=Recipe(...))`` users get
    the same error as ``--set`` users."""
    import tomllib

    parsed = tomllib.loads(f"v = {value}")["v"]
    section, _, name = key.rpartition(".")
    if section:
        cls = next(f.default_factory for f in dataclasses.fields(Recipe) if f.name == section)
        assert f"recipe key '{key}'" in _error(lambda: cls(**{name: parsed}))
    else:
        assert f"recipe key '{key}'" in _error(lambda: Recipe(**{key: parsed}))


def test_python_construction_with_unprintable_values():
    assert "recipe key 'weights.format' must be str (a string), got <a int too long to print>" in _error(
        lambda: Recipe(weights=WeightSpec(format=10**5000)))


def test_python_construction_normalises_types():
    r = Recipe(calibration=CalibrationSpec(slac_lengths=[32, np.int64(64)]))
    assert r.calibration.slac_lengths == (32, 64) and type(r.calibration.slac_lengths[1]) is int
    assert ActivationSpec(percentile=99).percentile == 99.0


@pytest.mark.parametrize("override, fragment", [
    ("sites.exclude=[1]", "recipe key 'sites.exclude' must be a list of str"),
    ("precision.seed=-1", "recipe key 'precision.seed': must be >= 0"),
    ("precision.act_fp8_fraction=-inf", "recipe key 'precision.act_fp8_fraction' must be float (a finite number)"),
    ("sites.exclude=" + "[" * 100000, "recipe key 'sites.exclude' must be a list of str, got '[[[["),
    ("weights.block_size=" + "9" * 5000, "recipe key 'weights.block_size' must be int (an integer), got '999"),
    ("activations.percentile=" + "9" * 400, "recipe key 'activations.percentile' must be float (a finite number), got 9999"),
    ("weights.format.x=1", "override 'weights.format.x=1': 'format' is not a section"),
    ("weights", "override 'weights' must look like section.key=value"),
])  # fmt: skip
def test_bad_overrides(override, fragment):
    assert fragment in _error(load_recipe, "w8a8", [override])


def test_block_larger_than_the_axis_is_the_whole_axis(model_dir, tmp_path):
    """weights.block_size far beyond every reduction dimension: before, numpy tried to allocate
    rows padded to 10^12 elements (MemoryError in OPTQ, smoothing and emission); a block longer
    than the axis is one block, as for block_size = D."""
    from lowbit import formats

    w = np.random.default_rng(0).standard_normal((48, 8)).astype(np.float32)
    huge, whole = (formats.encode(w, "int4", axis=0, block_size=b) for b in (10**12, 48))
    assert np.array_equal(huge.codes, whole.codes) and np.array_equal(huge.scale, whole.scale)
    proc = run_lowbit("compile", str(model_dir), "-o", str(tmp_path / "out"), "-r", "w4a8-int4",  # OPTQ + AQAS
                      "--calib-text", str(model_dir / "calib.txt"), *SMALL, "--set", "weights.block_size=1000000000000")
    assert proc.returncode == 0, proc.stderr[-3000:]


# -- 2b. precision.fisher_file ------------------------------------------------------------------


def _npz(path: Path, **arrays) -> Path:
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def _claims_huge_array(path: Path) -> Path:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 4)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("weight/a.npy", header.getvalue() + bytes(16))
    return path


def test_fisher_file_is_checked_when_the_recipe_loads(tmp_path):
    ok = _npz(tmp_path / "ok.npz", **{"weight/a": np.ones((2, 2), np.float32), "act/a": np.ones(2, np.float32),
                                      "meta/source": np.array("test")})  # fmt: skip
    (tmp_path / "garbage.npz").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "text.npz").write_text("weight/a = 1\n")
    (tmp_path / "truncated.npz").write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    np.save(tmp_path / "plain.npy", np.ones((2, 2), np.float32))
    (tmp_path / "dir.npz").mkdir()
    os.mkfifo(tmp_path / "fifo.npz")
    cases = {
        "missing.npz": "missing.npz does not exist",
        "dir.npz": "dir.npz is a directory, not a numpy .npz file",
        "fifo.npz": "fifo.npz is not a regular file",
        "garbage.npz": "garbage.npz is not a readable numpy .npz file (File is not a zip file)",
        "text.npz": "text.npz is not a readable numpy .npz file",
        "truncated.npz": "truncated.npz is not a readable numpy .npz file",
        "plain.npy": "plain.npy is not a readable numpy .npz file",
        _npz(tmp_path / "strings.npz", **{"weight/a": np.array([["x"]])}).name: "array 'weight/a' is <U1 of shape (1, 1)",
        _npz(tmp_path / "objects.npz", **{"weight/a": np.array([1, "x"], object)}).name: "array 'weight/a' is object",
        _npz(tmp_path / "flat.npz", **{"weight/a": np.ones(3, np.float32)}).name: "expected a 2-D [out, in] float array",
        _npz(tmp_path / "act2d.npz", **{"weight/a": np.ones((2, 2)), "act/a": np.ones((2, 2))}).name: "array 'act/a' is float64 of shape (2, 2)",
        _npz(tmp_path / "other.npz", **{"weight/a": np.ones((2, 2)), "bias": np.ones(2)}).name: "holds array 'bias'",
        _npz(tmp_path / "no_weights.npz", **{"act/a": np.ones(2)}).name: "holds no weight/<site> arrays",
        _npz(tmp_path / "empty.npz").name: "holds no weight/<site> arrays",
        _claims_huge_array(tmp_path / "huge.npz").name: "holds 16 data bytes, not the 16000000000000 its header",
    }  # fmt: skip
    for name, fragment in cases.items():
        message = _error(load_recipe, "fgmp-nvfp4-fp8", [f"precision.fisher_file='{tmp_path / name}'"])
        assert message.startswith("recipe key 'precision.fisher_file': ") and fragment in message, (name, message)
    assert load_recipe("fgmp-nvfp4-fp8", [f"precision.fisher_file='{ok}'"]).precision.fisher_file == str(ok)


def _site_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """torch-orientation [out, in] shape of each linear site of the tiny model."""
    import onnx_ir as ir

    from lowbit.core.linear_sites import find_linear_sites

    sites = find_linear_sites(ir.load(model_dir / "model.onnx").graph)
    return {s.name: (s.out_features, s.in_features) for s in sites}


@pytest.mark.parametrize("kind, fragment", [
    ("nan", "Fisher side file"),
    ("shape", "has shape"),
])  # fmt: skip
def test_fisher_file_values_and_shapes_checked_against_the_model(model_dir, tmp_path, kind, fragment):
    shapes = _site_shapes(model_dir)
    arrays = {f"weight/{n}": np.ones((o + 1, i) if kind == "shape" else (o, i), np.float32) for n, (o, i) in shapes.items()}
    if kind == "nan":
        arrays[f"weight/{next(iter(shapes))}"][0, 0] = np.nan
    fisher = _npz(tmp_path / "f.npz", **arrays)
    proc = run_lowbit("compile", str(model_dir), "-o", str(tmp_path / "out"), "-r", "fgmp-nvfp4-fp8",
                      "--calib-text", str(model_dir / "calib.txt"), *SMALL, "--set", f"precision.fisher_file={fisher}")
    line = assert_user_error(proc, fragment)
    assert ("non-finite or negative values" in line) if kind == "nan" else ("(torch [out, in])" in line)
    assert not (tmp_path / "out").exists()


# -- CLI: the one line, nothing left behind ----------------------------------------------------


@pytest.mark.parametrize("recipe_text, overrides, fragment", [
    (b'[weights]\nformat = "caf\xe9"\n', [], "is not UTF-8 text"),
    ("a = " + "[" * 100000 + "]" * 100000, [], "nested too deeply"),
    ("[weights]\nformat = 'int8'\n", ["sites.exclude=[1]"], "recipe key 'sites.exclude' must be a list of str"),
    ("[weights]\nformat = 'int8'\n", ["precision.seed=-1"], "recipe key 'precision.seed': must be >= 0"),
    ("[weights]\nformat = 'int8'\n", ["precision.fisher_file=model/calib.txt"], "recipe key 'precision.fisher_file': model/calib.txt is not a readable numpy .npz file"),
])  # fmt: skip
def test_compile_recipe_errors_cli(model_dir, recipe_text, overrides, fragment):
    _toml(model_dir.parent, recipe_text, "bad.toml")
    before = sorted(p.name for p in model_dir.parent.iterdir())
    args = [a for o in overrides for a in ("--set", o)]
    proc = run_lowbit("compile", "model", "-o", "out", "-r", "bad.toml", *args, cwd=model_dir.parent, timeout=120)
    line = assert_user_error(proc, fragment)
    assert line.startswith("lowbit compile: error: ")
    assert sorted(p.name for p in model_dir.parent.iterdir()) == before


def test_recipes_command_errors(tmp_path):
    _toml(tmp_path, b"\xff\xfe", "bad.toml")
    assert_user_error(run_lowbit("recipes", "bad.toml", cwd=tmp_path), "lowbit recipes: error: recipe file bad.toml is not UTF-8")
    assert_user_error(run_lowbit("recipes", "w9a9", cwd=tmp_path), "lowbit recipes: error: unknown recipe 'w9a9' (known:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


# -- 3. --dump-dir -------------------------------------------------------------------------------


@pytest.mark.parametrize("dump, fragment", [
    ("afile", "is an existing file, not a directory"),
    ("nowhere/dumps", "its parent directory"),
])  # fmt: skip
def test_dump_dir_must_be_a_directory_in_an_existing_one(model_dir, dump, fragment):
    work = model_dir.parent
    (work / "afile").write_text("keep me\n")
    proc = run_lowbit("compile", "model", "-o", "out", "-r", "w8a8", "--calib-text", "model/calib.txt", *SMALL,
                      "--dump-dir", dump, cwd=work)  # fmt: skip
    line = assert_user_error(proc, fragment)
    assert f"--dump-dir {work / dump}" in line
    assert (work / "afile").read_text() == "keep me\n"
    assert sorted(p.name for p in work.iterdir()) == ["afile", "model"]  # no out, no nowhere/


# -- 4. numba's cache ---------------------------------------------------------------------------


def _readonly_run(args: list[str], read_only: list[Path], env: dict[str, str], cwd: Path,
                  module: str = "lowbit") -> subprocess.CompletedProcess:  # fmt: skip
    """``python -m lowbit ARGS`` in a private mount namespace where ``read_only`` are read-only
    bind mounts (a user namespace: works unprivileged, and root cannot write through it either)."""
    mounts = "".join(f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))} && "
                     f"mount -o remount,bind,ro {shlex.quote(str(p))} && " for p in read_only)  # fmt: skip
    script = f'{mounts}exec "$@"'
    return subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                           sys.executable, "-m", module, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip


def test_optq_compiles_without_writable_home_or_package(model_dir, tmp_path):
    """HOME and the installed package read-only, NUMBA_CACHE_DIR and LOWBIT_CACHE unset: numba has
    no locator of its own; lowbit gives it a private temporary directory, removed at exit."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "LOWBIT_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    proc = _readonly_run(["-v", "compile", str(model_dir), "-o", str(tmp_path / "out"), "-r", "w4a8-dint4",
                          "--calib-text", str(model_dir / "calib.txt"), *SMALL],
                         [home, PACKAGE_DIR], env, tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no private writable numba cache" in proc.stderr
    assert "OptqPass" in proc.stderr and (tmp_path / "out" / "model.onnx").is_file()
    assert list(home.iterdir()) == [] and list(tmp.iterdir()) == []  # the temporary cache went with the process


@pytest.fixture
def numba_env(monkeypatch, tmp_path):
    from lowbit.encode import jit

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)
    (tmp_path / "tmp").mkdir()
    return jit


def _private_tmp(path: str, tmp_path: Path) -> bool:
    p = Path(path)
    return p.parent == tmp_path / "tmp" and p.name.startswith("lowbit-numba-") and stat.S_IMODE(p.stat().st_mode) == 0o700


def test_numba_cache_dir_is_private(numba_env, tmp_path, monkeypatch):
    jit = numba_env
    chosen = jit.numba_cache_dir()
    assert chosen == str(tmp_path / "cache" / "numba") == os.environ["NUMBA_CACHE_DIR"]
    assert stat.S_IMODE(os.stat(chosen).st_mode) == 0o700
    # a directory others can write into (or a link, or one below a shared non-sticky directory)
    # could hold planted machine code: a private temporary directory instead
    os.chmod(chosen, 0o777)
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    assert _private_tmp(jit.numba_cache_dir(), tmp_path)
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    (tmp_path / "real").mkdir(mode=0o700)
    os.rmdir(chosen)
    os.symlink(tmp_path / "real", chosen)
    assert _private_tmp(jit.numba_cache_dir(), tmp_path)
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("LOWBIT_CACHE", str(shared))
    assert _private_tmp(jit.numba_cache_dir(), tmp_path)
    # the user's own choice is kept
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert jit.numba_cache_dir() == str(tmp_path / "mine")


def test_every_numba_user_goes_through_jit():
    sources = [p for sub in PACKAGE_DIR.iterdir() if (sub / "__init__.py").is_file() and sub.name != "tests"
               for p in sub.rglob("*.py")]  # fmt: skip
    assert any(p.name == "optq_kernel.py" for p in sources)
    users = [p for p in sources if p.name != "jit.py"
             and any(line.startswith(("import numba", "from numba")) for line in p.read_text().splitlines())]  # fmt: skip
    assert users == []


# -- 5. lowbit-bench run ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["-o", "R.md", "--contenders", "fp32,nope"], "unknown bench contender(s) nope; known: fp32"),
    (["-o", "R.md", "--sections", "nope"], "unknown bench section(s) nope; known: smollm2"),
    (["-o", "R.md", "--sections", ","], "--sections names no section; known: smollm2"),
    (["-o", "R.md", "--contenders="], "--contenders names no contender; known: fp32"),
    (["-o", "adir"], "-o adir exists and is not a regular file"),
    (["-o", "fifo"], "-o fifo exists and is not a regular file"),
    (["-o", "afile/R.md"], "afile does not exist"),
])  # fmt: skip
def test_bench_argument_errors(tmp_path, args, fragment):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    before = sorted(p.name for p in tmp_path.iterdir())
    line = assert_user_error(run_lowbit("run", *args, cwd=tmp_path, timeout=60, module="lowbit.bench"), fragment)
    assert line.startswith("lowbit-bench run: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and list((tmp_path / "adir").iterdir()) == []


def test_bench_unwritable_output(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = _readonly_run(["run", "-o", str(ro / "R.md"), "--sections", "formats"], [ro], dict(os.environ), tmp_path,
                         module="lowbit.bench")  # fmt: skip
    assert_user_error(proc, f"lowbit-bench run: error: output directory {ro} is not writable")
    assert list(ro.iterdir()) == []
