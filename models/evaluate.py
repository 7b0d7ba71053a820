"""Measure an ONNX model with ONNX Runtime (CPU): perplexity, embedding cosine, latency.
Each also runs in OpenVINO (``runtime="openvino"``, CPU plugin).

Assumes the input conventions of lowbit/optimum exports: ``input_ids`` (always), optionally
``attention_mask``, ``token_type_ids``, ``position_ids`` and ``past_key_values.N.key/value``
(optimum's KV cache, fed empty for a full-window pass); outputs ``logits`` (causal LM) or
``last_hidden_state`` (encoder) plus ``present.N.key/value`` for KV-cache models.

Guarantees:

* perplexity = exp(mean NLL) over non-overlapping windows; each window of T tokens scores
  T-1 next-token predictions (positions 1..T-1 given the prefix), so ``tokens = windows*(T-1)``;
  log-softmax in float64 accumulation.
* agreement with a reference model (the FP32 export) on the same T-1 predictions: mean KL
  divergence KL(P_reference || P_model) of the next-token distributions (nats per token) and
  top-1 agreement (fraction of positions where both models' most likely next token is the same),
  the quality measures llama.cpp reports. Both models run window by window in lockstep, or the
  logits come from anywhere (:class:`NextTokenScores` takes logits, whoever made them).
* embedding cosine: mean over texts of cos(pool(model), pool(reference)), pooling = mean of
  ``last_hidden_state`` over the attention mask (MiniLM's pooling config).
* latency: median wall time of ``repeats`` runs after one warm-up; prefill of ``prefill_tokens``
  tokens (batch 1) and, for KV-cache models, one decode step on top of that prefill.

A model the runtime cannot load raises LowbitError with the runtime's first message line.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lowbit.ort.feeds import build_feeds
from lowbit.errors import LowbitError
from lowbit.models.registry import onnx_model_file

__all__ = [
    "PerplexityResult",
    "AgreementResult",
    "NextTokenScores",
    "LatencyResult",
    "open_session",
    "perplexity",
    "compare_to_reference",
    "window_logits",
    "pooled_embeddings",
    "embedding_cosine",
    "latency",
]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens: windows * (seq_len - 1)
    windows: int


@dataclass(frozen=True)
class AgreementResult:
    kl: float  # mean KL(P_reference || P_model) per predicted token, nats
    top1: float  # fraction of predictions whose argmax equals the reference's
    tokens: int  # predictions compared: windows * (seq_len - 1)


class NextTokenScores:
    """Accumulates perplexity, and agreement with a reference, window by window.

    ``add(logits, ids, reference)`` takes one window's ``[T, V]`` logits, its ``[T]`` token ids
    and optionally the reference model's ``[T, V]`` logits for the same window. Rows are
    converted to float64 a block at a time, so memory stays at a few blocks of the vocabulary.
    """

    ROWS = 64  # predictions converted to float64 at a time

    def __init__(self) -> None:
        self.nll = self.kl = 0.0
        self.top1 = self.tokens = self.windows = self.compared = 0

    def add(self, logits: np.ndarray, ids: np.ndarray, reference: np.ndarray | None = None) -> None:
        ids = np.asarray(ids)
        t = len(ids)
        if logits.ndim != 2 or logits.shape[0] != t or (reference is not None and reference.shape != logits.shape):
            raise LowbitError(f"logits {logits.shape} (reference "
                              f"{None if reference is None else reference.shape}) do not match {t} tokens")
        for s in range(0, t - 1, self.ROWS):
            e = min(s + self.ROWS, t - 1)
            lp = _log_softmax(logits[s:e])
            self.nll -= float(lp[np.arange(e - s), ids[s + 1 : e + 1]].sum())
            if reference is not None:
                lq = _log_softmax(reference[s:e])
                self.kl += float((np.exp(lq) * (lq - lp)).sum())
                self.top1 += int((lp.argmax(-1) == lq.argmax(-1)).sum())
                self.compared += e - s
        self.tokens += t - 1
        self.windows += 1

    def perplexity(self) -> PerplexityResult:
        if not self.tokens:
            raise LowbitError("no window was scored")
        nll = self.nll / self.tokens
        return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=self.tokens, windows=self.windows)

    def agreement(self) -> AgreementResult | None:
        if not self.compared:
            return None
        return AgreementResult(kl=self.kl / self.compared, top1=self.top1 / self.compared, tokens=self.compared)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass(frozen=True)
class LatencyResult:
    prefill_ms: float  # median, batch 1
    prefill_tokens: int
    decode_ms: float | None  # median one-token step with a KV cache; None without a cache
    repeats: int


RUNTIMES = ("onnxruntime", "openvino")


def open_session(model_path: str | os.PathLike, session_options: Any = None, runtime: str = "onnxruntime") -> Any:
    """A CPU session for a .onnx file or a directory holding model.onnx: an ORT InferenceSession,
    or (``runtime="openvino"``) an OpenVINO compiled model behind the same interface."""
    import onnxruntime as ort

    f = onnx_model_file(model_path)
    if runtime not in RUNTIMES:
        raise LowbitError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    if runtime == "openvino":
        if session_options is not None:
            raise LowbitError("session options are ONNX Runtime's; OpenVINO takes none")
        from lowbit.models.openvino_session import OpenVinoSession

        return OpenVinoSession(f)
    session_options = session_options or ort.SessionOptions()
    # ORT's own log would print its error as a second stderr line: the exception below says it
    session_options.log_severity_level = 4
    try:
        return ort.InferenceSession(str(f), sess_options=session_options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LowbitError(f"{f}: ONNX Runtime cannot load it: {first[:300]}") from e


def _output_name(session: Any, name: str) -> str:
    names = [o.name for o in session.get_outputs()]
    if name not in names:
        raise LowbitError(f"the model has no {name!r} output (outputs: {names[:4]})")
    return name


def _label(model_path: str | os.PathLike) -> str:
    from lowbit.errors import printable

    p = Path(model_path)
    return printable(p.parent.name if p.name == "model.onnx" else p.name)  # shown in a progress bar


def _check_windows(windows: np.ndarray) -> np.ndarray:
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise LowbitError(f"windows must be [N >= 1, T >= 2] token ids, got shape {windows.shape}")
    return windows


def window_logits(session: Any, row: np.ndarray, model_path: str | os.PathLike) -> np.ndarray:
    """One window's ``[T, V]`` logits from an open session (empty KV cache); LowbitError if the
    model produced non-finite values."""
    logits = session.run([_output_name(session, "logits")], build_feeds(session, row[None, :]))[0][0]
    if not np.all(np.isfinite(logits)):
        raise LowbitError(f"{model_path}: the model produced non-finite logits")
    return logits


def perplexity(model_path: str | os.PathLike, windows: np.ndarray, *, session_options: Any = None,
               progress: bool = True, runtime: str = "onnxruntime", session: Any = None) -> PerplexityResult:
    """Perplexity of a causal LM over ``windows`` (int64 [N, T]), one window per run, in ONNX
    Runtime or OpenVINO (``runtime``), or in an already open ``session`` of ``model_path``."""
    from tqdm import tqdm

    windows = _check_windows(windows)
    session = session or open_session(model_path, session_options, runtime)
    scores = NextTokenScores()
    for row in tqdm(windows, desc=f"perplexity {_label(model_path)}", unit="win",
                    disable=None if progress else True, leave=False):
        scores.add(window_logits(session, row, model_path), row)
    return scores.perplexity()


def compare_to_reference(model_path: str | os.PathLike, reference_path: str | os.PathLike, windows: np.ndarray, *,
                         session_options: Any = None, runtime: str = "onnxruntime", progress: bool = True,
                         session: Any = None, reference_session: Any = None,
                         ) -> tuple[PerplexityResult, PerplexityResult, AgreementResult]:
    """(model perplexity, reference perplexity, agreement of the model with the reference) over
    ``windows``; the model runs in ``runtime``, the reference in ONNX Runtime at default options
    (the one reference for every runtime), or both in already open sessions of those paths. The
    two step through the windows together."""
    from tqdm import tqdm

    windows = _check_windows(windows)
    session = session or open_session(model_path, session_options, runtime)
    reference = reference_session or open_session(reference_path)
    mine, theirs = NextTokenScores(), NextTokenScores()
    for row in tqdm(windows, desc=f"compare {_label(model_path)}", unit="win",
                    disable=None if progress else True, leave=False):
        ref = window_logits(reference, row, reference_path)
        mine.add(window_logits(session, row, model_path), row, ref)
        theirs.add(ref, row)
    agreement = mine.agreement()
    assert agreement is not None
    return mine.perplexity(), theirs.perplexity(), agreement


def pooled_embeddings(model_path: str | os.PathLike, texts: Sequence[str], tokenizer: Any, *,
                      batch_size: int = 16, max_length: int = 128, session_options: Any = None,
                      progress: bool = True, runtime: str = "onnxruntime") -> np.ndarray:
    """Mean-pooled ``last_hidden_state`` per text: float64 [len(texts), hidden]."""
    from tqdm import tqdm

    session = open_session(model_path, session_options, runtime)
    name = _output_name(session, "last_hidden_state")
    out = []
    starts = range(0, len(texts), batch_size)
    for s in tqdm(starts, desc=f"embed {_label(model_path)}", unit="batch",
                  disable=None if progress else True, leave=False):
        enc = tokenizer(list(texts[s : s + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="np")
        mask = enc["attention_mask"].astype(np.float64)
        feeds = build_feeds(session, enc["input_ids"], attention_mask=enc["attention_mask"])
        if "token_type_ids" in feeds and "token_type_ids" in enc:
            feeds["token_type_ids"] = enc["token_type_ids"].astype(np.int64)
        hidden = session.run([name], feeds)[0].astype(np.float64)
        out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
    return np.concatenate(out)


def embedding_cosine(model_path: str | os.PathLike, reference_path: str | os.PathLike,
                     texts: Sequence[str], *, tokenizer: Any = None, session_options: Any = None,
                     progress: bool = True, runtime: str = "onnxruntime") -> float:
    """Mean cosine similarity of pooled embeddings of ``model_path`` (run in ``runtime``) vs
    ``reference_path`` (always FP32 in ONNX Runtime, the one reference for every runtime).

    The tokenizer defaults to the one stored next to the reference model (an export dir).
    """
    from lowbit.models.registry import load_tokenizer

    if not texts:
        raise LowbitError("embedding_cosine needs at least one text")
    tok = tokenizer if tokenizer is not None else load_tokenizer(onnx_model_file(reference_path))
    a = pooled_embeddings(model_path, texts, tok, session_options=session_options, progress=progress, runtime=runtime)
    b = pooled_embeddings(reference_path, texts, tok, progress=progress)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean())


def _median_ms(fn: Any, repeats: int) -> float:
    fn()  # warm-up: first run pays for allocations and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def latency(model_path: str | os.PathLike, *, prefill_tokens: int = 128, repeats: int = 10,
            session_options: Any = None, runtime: str = "onnxruntime") -> LatencyResult:
    """Median prefill latency (batch 1) and, if the model has a KV cache, one decode step."""
    if prefill_tokens < 2 or repeats < 1:
        raise LowbitError("latency needs prefill_tokens >= 2 and repeats >= 1")
    session = open_session(model_path, session_options, runtime)
    # Token values do not change the work done; ids 0/1 exist in every vocabulary.
    ids = (np.arange(prefill_tokens, dtype=np.int64) % 2)[None, :]
    feeds = build_feeds(session, ids)
    prefill = _median_ms(lambda: session.run(None, feeds), repeats)
    out_names = [o.name for o in session.get_outputs()]
    present = [n for n in out_names if n.startswith("present.")]
    decode = None
    if present:
        outs = dict(zip(out_names, session.run(None, feeds)))
        past = {n.replace("present.", "past_key_values.", 1): outs[n] for n in present}
        step = build_feeds(session, ids[:, -1:], past=past)
        decode = _median_ms(lambda: session.run(None, step), repeats)
    return LatencyResult(prefill_ms=prefill, prefill_tokens=prefill_tokens, decode_ms=decode,
                         repeats=repeats)
