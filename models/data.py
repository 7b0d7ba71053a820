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
``--eval-text``) replaces the split's text and is windowed the same way, read and tokenized a
chunk at a time and only as far as the windows need (:func:`text_chunks`): memory does not grow
with the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np

from lowbit.errors import LowbitError

__all__ = [
    "Split",
    "split_topics",
    "split_text",
    "read_text_file",
    "check_text_file",
    "text_chunks",
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


CHUNK_CHARS = 1 << 16  # characters decoded and tokenized at a time from a user's text file


def text_chunks(path: str | os.PathLike, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """A user's UTF-8 text file, read a chunk at a time (memory bounded by one chunk, whatever the
    file's size); LowbitError if it is missing, not UTF-8 or holds nothing but white space.

    Chunks end after a newline that is followed by a non-space character (else after the last
    white space, else at ``chunk_chars``), so no word or run of white space is cut in two: for
    byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2) tokenizing the chunks gives the ids of the
    whole text; SentencePiece tokenizers may add a word-start marker at a chunk's first word.
    """
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or a device would block or never end
        raise LowbitError(f"{path}: not a regular file")
    try:
        f = open(path, encoding="utf-8", newline="")  # noqa: SIM115 - closed below, generator-owned
    except FileNotFoundError as e:
        raise LowbitError(f"{path}: no such text file") from e
    except OSError as e:
        raise LowbitError(f"{path}: cannot read as UTF-8 text ({type(e).__name__})") from e
    carry, seen_text = "", False
    with f:
        while True:
            try:
                block = f.read(chunk_chars)
            except (OSError, UnicodeDecodeError) as e:
                raise LowbitError(f"{path}: cannot read as UTF-8 text ({type(e).__name__})") from e
            if not block:
                break
            text = carry + block
            seen_text = seen_text or not text.isspace()
            cut = _last_cut(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]
    if carry:
        yield carry
    if not seen_text:
        raise LowbitError(f"{path}: the text file is empty")


def _last_cut(text: str) -> int:
    """Where to end a chunk: after the last newline before a non-space, else after the last space."""
    i = text.rfind("\n", 0, len(text) - 1)
    while i >= 0 and text[i + 1].isspace():
        i = text.rfind("\n", 0, i)
    if i >= 0:
        return i + 1
    last_space = max(text.rfind(" "), text.rfind("\t"), text.rfind("\n"))
    return last_space + 1 if last_space > 0 else len(text)


def read_text_file(path: str | os.PathLike) -> str:
    """A user's whole text file (UTF-8); LowbitError if missing, unreadable or empty. For text of
    any size prefer :func:`text_chunks`, which never holds more than a chunk."""
    return "".join(text_chunks(path))


def check_text_file(path: str | os.PathLike) -> None:
    """Fail now, not after an export, if ``path`` is not readable UTF-8 text with some content."""
    for chunk in text_chunks(path):
        if not chunk.isspace():
            return


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Tokenizers warn when a text exceeds the model's max length; we window it ourselves.
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        transformers.logging.set_verbosity(verbosity)


def token_windows(tokenizer: Any, text: str | Iterable[str], seq_len: int, n: int | None = None) -> np.ndarray:
    """Non-overlapping ``seq_len``-token windows of ``text`` (a string or a stream of chunks, read
    only until ``n`` windows are full): int64 ``[n, seq_len]``.

    ``n=None`` returns every complete window. LowbitError if the text holds fewer than ``n``
    windows (or none at all).
    """
    if seq_len < 2:
        raise LowbitError(f"seq_len must be >= 2, got {seq_len}")
    if n is not None and n < 1:
        raise LowbitError(f"the number of windows must be >= 1, got {n}")
    needed = None if n is None else n * seq_len
    ids: list[int] = []
    for chunk in [text] if isinstance(text, str) else text:
        ids += _encode(tokenizer, chunk)
        if needed is not None and len(ids) >= needed:
            break
    available = len(ids) // seq_len
    wanted = available if n is None else n
    if available == 0 or wanted > available:
        raise LowbitError(
            f"the text has {len(ids)} tokens: {available} windows of {seq_len}, {wanted} needed"
        )
    return np.asarray(ids[: wanted * seq_len], dtype=np.int64).reshape(wanted, seq_len)


def _text(split: Split, text_file: str | os.PathLike | None) -> str | Iterator[str]:
    return text_chunks(text_file) if text_file is not None else split_text(split)


def calibration_windows(
    tokenizer: Any, seq_len: int, n: int | None, *, text_file: str | os.PathLike | None = None
) -> np.ndarray:
    """Windows of the calibration split (or of ``text_file`` if given, read only as far as needed)."""
    return token_windows(tokenizer, _text("calibration", text_file), seq_len, n)


def evaluation_windows(
    tokenizer: Any, seq_len: int, n: int | None, *, text_file: str | os.PathLike | None = None
) -> np.ndarray:
    """Windows of the evaluation split (or of ``text_file`` if given, read only as far as needed)."""
    return token_windows(tokenizer, _text("evaluation", text_file), seq_len, n)


def text_samples(
    split: Split, n: int, *, min_chars: int = 40, max_chars: int = 400,
    text_file: str | os.PathLike | None = None,
) -> list[str]:
    """``n`` paragraphs (for sentence encoders) of a split or a text file, in order.

    Paragraphs are blank-line separated blocks, whitespace-collapsed, kept if at least
    ``min_chars`` long and cut at ``max_chars``.
    """
    samples = []
    for block in _paragraphs(_text(split, text_file)):
        para = " ".join(block.split())
        if len(para) >= min_chars:
            samples.append(para[:max_chars])
        if len(samples) == n:
            return samples
    raise LowbitError(f"the text has only {len(samples)} paragraphs of >= {min_chars} chars, {n} needed")


def _paragraphs(text: str | Iterable[str]) -> Iterator[str]:
    """Blank-line separated blocks of a string or a stream of chunks."""
    carry = ""
    for chunk in [text] if isinstance(text, str) else text:
        blocks = (carry + chunk).split("\n\n")
        carry = blocks.pop()
        yield from blocks
    yield carry
