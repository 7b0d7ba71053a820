"""Shared tools of the adversarial corpus: run the real CLI in a subprocess (timeout, optional
memory cap), assert the one-line error contract, build a tiny model directory with a tokenizer,
and snapshot a directory tree to prove a user's files were left exactly as they were."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import onnx_ir as ir
import pytest

from lowbit.models.synthetic import TinyConfig, tiny_decoder

# 63 characters + [UNK]: a char-level tokenizer whose ids fit the tiny decoder's 64-token vocab.
ALPHABET = " \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;()=-_"
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
        "def f(x): return x_1 - x_2, (a, b) = (b, a);\n") * 40


def run_lowbit(*args: str, cwd: Path | None = None, timeout: float = 300, mem_mb: int | None = None,
               env: dict[str, str] | None = None, module: str = "lowbit", **kwargs) -> subprocess.CompletedProcess:
    """`python -m lowbit ARGS` as a user runs it (``module="lowbit.bench"``: `lowbit-bench ARGS`);
    ``mem_mb`` caps the address space."""

    def cap() -> None:
        if mem_mb is not None:
            limit = mem_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap, env=full_env, stdin=subprocess.DEVNULL, **kwargs)


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> str:
    """Exit 2, exactly one line on stderr starting with ``lowbit``, containing ``fragment``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(("lowbit ", "lowbit-bench ")), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` (links not followed): kind, mode and content hash or link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            elif not p.is_file():  # a FIFO or a device: reading it would block
                out[rel] = ("special", st.st_mode)
            else:
                out[rel] = ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def write_tokenizer(directory: Path) -> None:
    """A char-level fast tokenizer (tokenizer.json + tokenizer_config.json) over ALPHABET."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(ALPHABET)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "model_max_length": 4096}))


def make_model_dir(directory: Path, *, cfg: TinyConfig | None = None) -> Path:
    """model.onnx (tiny decoder, decomposed RMSNorm), a tokenizer, config.json and a text file."""
    directory.mkdir(parents=True, exist_ok=True)
    ir.save(tiny_decoder(cfg or TinyConfig(norm_form="decomposed")), directory / "model.onnx")
    write_tokenizer(directory)
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 64}))
    (directory / "calib.txt").write_text(TEXT)
    return directory


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")
