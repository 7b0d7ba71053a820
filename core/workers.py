"""Thread pools that a signal stops promptly.

Compile passes run numpy, BLAS and LAPACK on a few threads (the calls release the GIL). Two
things made a Ctrl-C or SIGTERM in the middle of such a pass wait for minutes (an 8B model's
OPTQ did not stop within 45 s):

- a ``with ThreadPoolExecutor()`` block left by an exception still runs every task already
  queued before it joins (``shutdown(wait=True)``, futures not cancelled);
- Python runs a signal handler only between bytecodes of the main thread, so a minute-long LAPACK
  call made there delays the exception until the call returns.

:func:`worker_pool` cancels the queued tasks when its body raises and does not wait for the
running ones; :func:`call_on` runs one long native call on a pool thread while the main thread
waits where a signal reaches it. A task still running when the exception leaves is a native call
that cannot be stopped: the command line then exits without waiting for it
(:func:`lowbit.compiler.cli.main`). Results are unchanged: a task computes on its thread exactly
what it computed on the main one (BLAS thread limits are process-wide).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["call_on", "worker_pool"]

T = TypeVar("T")


@contextlib.contextmanager
def worker_pool(threads: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``threads`` threads; on an exception in the body (a signal), queued tasks are
    cancelled and running ones are left to finish on their own."""
    pool = ThreadPoolExecutor(threads)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def call_on(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on one of ``pool``'s threads; the caller waits interruptibly."""
    return pool.submit(fn, *args).result()
