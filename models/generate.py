"""Text generation from a compiled causal LM, with optimum's generation loop.

:func:`generate` loads a model directory (a ``lowbit compile`` output or any ONNX export that has
``config.json`` and tokenizer files) with ``optimum.onnxruntime.ORTModelForCausalLM``, the loop
users deploy, and hands each new token to a callback as it is produced. The lowbit op library is
registered in the session, so ``ort-cpu`` outputs run on the native kernels (without it their
ONNX function fallbacks would run). The KV cache is used when the model has ``past_key_values``
inputs; a model without them re-reads the whole sequence every step (optimum's legacy path).

Timing: ``prefill_s`` is the time from the call to the first new token (prompt forward pass plus
sampling); ``decode_tokens_per_s`` counts the tokens after the first over the time after it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lowbit.errors import LowbitError

__all__ = ["Generation", "SamplingOptions", "generate", "load_causal_lm"]


@dataclass(frozen=True)
class SamplingOptions:
    """Greedy when ``sample`` is false; otherwise temperature, top-k and top-p sampling."""

    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LowbitError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if self.temperature <= 0:
            raise LowbitError(f"--temperature {self.temperature}: must be > 0")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise LowbitError(f"--top-k {self.top_k} / --top-p {self.top_p}: need top-k >= 0 and 0 < top-p <= 1")


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # call -> first new token
    decode_s: float  # first -> last new token
    threads: int  # 0: ONNX Runtime's default (one per physical core)
    kv_cache: bool

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def summary(self) -> str:
        cache = "KV cache" if self.kv_cache else "no KV cache: every step re-reads the sequence"
        decode = f"decode {self.decode_tokens_per_s:.1f} tokens/s" if self.new_tokens > 1 else "no decode step"
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else "ORT's default threads"
        return (f"{self.new_tokens} new tokens; prefill {self.prefill_s * 1e3:.0f} ms for {self.prompt_tokens} prompt tokens; "
                f"{decode}; {threads}, {cache}")  # fmt: skip


def _model_file(path: Path) -> tuple[Path, str]:
    if path.is_file():
        return path.parent, path.name
    if not path.is_dir():
        raise LowbitError(f"{path}: no such model file or directory")
    files = sorted(p.name for p in path.glob("*.onnx"))
    if "model.onnx" in files:
        return path, "model.onnx"
    if len(files) != 1:
        raise LowbitError(f"{path}: expected one .onnx file (or model.onnx), found {len(files)}")
    return path, files[0]


def load_causal_lm(path: str | os.PathLike, threads: int = 0) -> tuple[Any, Any, bool]:
    """(tokenizer, ORTModelForCausalLM, uses KV cache) for a causal-LM directory or its .onnx file."""
    import onnx

    from lowbit.models.registry import load_tokenizer
    from lowbit.runtime_ext.library import session_options

    directory, file_name = _model_file(Path(path))
    if not (directory / "config.json").is_file():
        raise LowbitError(f"{directory}: no config.json (generate needs a causal-LM export directory, as "
                          "`lowbit export` or optimum writes it)")  # fmt: skip
    try:
        graph = onnx.load(str(directory / file_name), load_external_data=False).graph
    except Exception as e:  # noqa: BLE001 - onnx raises several types for a corrupt file
        raise LowbitError(f"{directory / file_name}: not a readable ONNX model ({type(e).__name__})") from e
    inputs = {i.name for i in graph.input}
    if "input_ids" not in inputs or not any(o.name == "logits" for o in graph.output):
        raise LowbitError(f"{directory / file_name}: not a causal LM (needs input_ids in, logits out)")
    kv_cache = any(name.startswith("past_key_values") for name in inputs)
    tokenizer = load_tokenizer(directory)
    from optimum.onnxruntime import ORTModelForCausalLM

    options = session_options()
    if threads:
        options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(directory, file_name=file_name, use_cache=kv_cache, use_io_binding=False,
                                                session_options=options, local_files_only=True)  # never the Hub  # fmt: skip
    return tokenizer, model, kv_cache


def generate(path: str | os.PathLike, prompt: str, options: SamplingOptions = SamplingOptions(), *,
             threads: int = 0, on_text: Callable[[str], None] | None = None) -> Generation:  # fmt: skip
    """Continue ``prompt`` with the model at ``path``; ``on_text`` receives the text as it is
    decoded (whole words, as transformers' streamer releases them)."""
    import torch
    from transformers import TextStreamer

    tokenizer, model, kv_cache = load_causal_lm(path, threads)
    stamps: list[float] = []

    class _Streamer(TextStreamer):
        def put(self, value) -> None:
            if self.next_tokens_are_prompt:  # the prompt itself comes first
                super().put(value)
                return
            stamps.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if on_text is not None and text:
                on_text(text)

    encoded = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(options.seed)
    sampling = {"do_sample": True, "temperature": options.temperature, "top_k": options.top_k,
                "top_p": options.top_p} if options.sample else {"do_sample": False}  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    out = model.generate(**encoded, max_new_tokens=options.max_new_tokens, pad_token_id=pad,
                         streamer=_Streamer(tokenizer, skip_prompt=True), **sampling)  # fmt: skip
    new = out[0, encoded["input_ids"].shape[1]:]
    return Generation(text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=int(encoded["input_ids"].shape[1]),
                      new_tokens=len(new), prefill_s=(stamps[0] - start) if stamps else 0.0,
                      decode_s=(stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0,
                      threads=threads, kv_cache=kv_cache)  # fmt: skip
