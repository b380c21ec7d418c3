"""Output files written beside the predict/evaluate loop instead of inside it.

An overlay is a full-resolution blend and a PNG encode: ≈ 0.6 s of one core for a 2048-px
photo (2.8 s with Pillow's default PNG options; benchmarks/RESULTS.md), against a few
milliseconds of GPU time per image. Done in the loop, it would set the pace of
``crane predict``. Pillow's encoders,
zlib, its resampling and NumPy's array arithmetic release the GIL, so a few threads run them in
parallel without copying maps to other processes.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


def default_write_threads() -> int:
    """Threads that write outputs unless told otherwise: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


class OutputWriter:
    """Runs write jobs on ``threads`` threads (0: at once, in the caller's thread).

    At most ``max_pending`` jobs (default 2 × threads) are queued or running: ``submit`` waits
    for the oldest beyond that, so the maps a job holds cannot pile up when writing is slower
    than predicting. A job's exception is raised in the caller by a later ``submit`` or by
    :meth:`close`, and :meth:`close` (or leaving the ``with`` block, also on an error) waits
    for every job already submitted: no finished prediction loses its files because another
    one failed to write.

    >>> with OutputWriter(4) as writer:                        # doctest: +SKIP
    ...     writer.submit(save_png, image, "out/a.png")
    """

    def __init__(self, threads: int | None = None, max_pending: int | None = None):
        self.threads = default_write_threads() if threads is None else threads
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        self.max_pending = max_pending or 2 * max(self.threads, 1)
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="crane-write")
            if self.threads
            else None
        )
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; the returned future tells when it has run (with 0
        threads it has, and its exception was raised here)."""
        if self._pool is None:
            done: Future = Future()
            done.set_result(fn(*args, **kwargs))
            return done
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.max_pending):
            self._pending.popleft().result()  # re-raises the job's exception here
        future = self._pool.submit(fn, *args, **kwargs)
        self._pending.append(future)
        return future

    def close(self) -> None:
        """Wait for every job; raise the first failure (after all of them have run)."""
        if self._pool is None:
            return
        first: BaseException | None = None
        try:
            while self._pending:
                try:
                    self._pending.popleft().result()
                except Exception as exc:  # keep waiting for the others, report them all
                    if first is None:
                        first = exc
                    else:
                        log.error("another output failed to write: %s", exc)
        finally:
            self._pool.shutdown(wait=True)
        if first is not None:
            raise first

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the loop failed: let the files already queued finish, keep its exception
            self.close()
        except Exception as write_exc:
            log.error("an output failed to write: %s", write_exc)
