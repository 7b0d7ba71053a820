"""The one exception type for bad user input.

The CLI turns a :class:`LowbitError` into a one-line message on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

__all__ = ["LowbitError", "printable"]


class LowbitError(ValueError):
    """Bad input: missing/corrupt file, unsupported op, shape mismatch, NaN, unknown name."""


def printable(text: str) -> str:
    """``text`` with control and format characters escaped (``\\n``, ``\\x1b``, ``\\u202e``): names
    taken from a model or a file system can neither add a line nor drive the terminal."""
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)  # fmt: skip
