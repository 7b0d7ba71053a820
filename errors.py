"""The one exception type for bad user input.

The CLI turns a :class:`LowbitError` into a one-line message on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

__all__ = ["LowbitError"]


class LowbitError(ValueError):
    """Bad input: missing/corrupt file, unsupported op, shape mismatch, NaN, unknown name."""
