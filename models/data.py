"""Calibration and evaluation text, tokenized into fixed-length windows.

Default text: Python's bundled documentation, ``pydoc_data.topics.topics`` (a dict of topic name
-> text, ~465k characters, present in every CPython install, no network).

Split rule (deterministic, disjoint): sort the topic keys; the topics at even positions
(0, 2, 4, ...) form the **calibration** split, those at odd positions the **evaluation** split.
Each split's text is its topics' texts in sorted-key order joined by a blank line. Because a
topic belongs to exactly one split, no text is shared between calibration and evaluation.

Windows: the split's text is tokenized once (no special tokens) and cut into consecutive,
non-overlapping windows of ``seq_len`` tokens; the incomplete tail is dropped. The first ``n``
windows are returned, as an int64 array ``[n, seq_len]``. A user's own text (``--calib-text`` /
``--eval-text``) replaces the split's text and is windowed the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lowbit.errors import LowbitError

__all__ = [
    "Split",
    "split_topics",
    "split_text",
    "read_text_file",
    "token_windows",
    "calibration_windows",
    "evaluation_windows",
    "text_samples",
]

Split = Literal["calibration", "evaluation"]


def split_topics() -> tuple[list[str], list[str]]:
    """(calibration keys, evaluation keys): sorted topic keys at even / odd positions."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return keys[0::2], keys[1::2]


def split_text(split: Split) -> str:
    """The text of one split of ``pydoc_data.topics`` (see the module docstring)."""
    from pydoc_data.topics import topics

    calib, evaluation = split_topics()
    if split == "calibration":
        keys = calib
    elif split == "evaluation":
        keys = evaluation
    else:
        raise LowbitError(f"unknown split {split!r} (calibration or evaluation)")
    return "\n\n".join(topics[k] for k in keys)


def read_text_file(path: str | os.PathLike) -> str:
    """A user's text file (UTF-8); LowbitError if missing, unreadable or empty."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise LowbitError(f"{path}: no such text file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: cannot read as UTF-8 text ({type(e).__name__})") from e
    if not text.strip():
        raise LowbitError(f"{path}: the text file is empty")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Tokenizers warn when a text exceeds the model's max length; we window it ourselves.
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        transformers.logging.set_verbosity(verbosity)


def token_windows(tokenizer: Any, text: str, seq_len: int, n: int | None = None) -> np.ndarray:
    """Non-overlapping ``seq_len``-token windows of ``text``: int64 ``[n, seq_len]``.

    ``n=None`` returns every complete window. LowbitError if the text holds fewer than ``n``
    windows (or none at all).
    """
    if seq_len < 2:
        raise LowbitError(f"seq_len must be >= 2, got {seq_len}")
    if n is not None and n < 1:
        raise LowbitError(f"the number of windows must be >= 1, got {n}")
    ids = np.asarray(_encode(tokenizer, text), dtype=np.int64)
    available = len(ids) // seq_len
    wanted = available if n is None else n
    if available == 0 or wanted > available:
        raise LowbitError(
            f"the text has {len(ids)} tokens: {available} windows of {seq_len}, {wanted} needed"
        )
    return ids[: wanted * seq_len].reshape(wanted, seq_len)


def calibration_windows(
    tokenizer: Any, seq_len: int, n: int | None, *, text_file: str | os.PathLike | None = None
) -> np.ndarray:
    """Windows of the calibration split (or of ``text_file`` if given)."""
    text = read_text_file(text_file) if text_file is not None else split_text("calibration")
    return token_windows(tokenizer, text, seq_len, n)


def evaluation_windows(
    tokenizer: Any, seq_len: int, n: int | None, *, text_file: str | os.PathLike | None = None
) -> np.ndarray:
    """Windows of the evaluation split (or of ``text_file`` if given)."""
    text = read_text_file(text_file) if text_file is not None else split_text("evaluation")
    return token_windows(tokenizer, text, seq_len, n)


def text_samples(
    split: Split, n: int, *, min_chars: int = 40, max_chars: int = 400,
    text_file: str | os.PathLike | None = None,
) -> list[str]:
    """``n`` paragraphs (for sentence encoders) of a split or a text file, in order.

    Paragraphs are blank-line separated blocks, whitespace-collapsed, kept if at least
    ``min_chars`` long and cut at ``max_chars``.
    """
    text = read_text_file(text_file) if text_file is not None else split_text(split)
    samples = []
    for block in text.split("\n\n"):
        para = " ".join(block.split())
        if len(para) >= min_chars:
            samples.append(para[:max_chars])
        if len(samples) == n:
            return samples
    raise LowbitError(f"the text has only {len(samples)} paragraphs of >= {min_chars} chars, {n} needed")
