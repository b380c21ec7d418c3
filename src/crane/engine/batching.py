"""Model batches assembled from small chunks that DataLoader workers decode.

With one whole batch per worker, the first batch waits for one worker to decode all of it
alone, and a dataset of a few hundred images decodes in one wave before the device sees
anything: with 16 workers and batch 32, the first 512 images arrive together. Workers that
decode chunks of ⌈batch / workers⌉ samples, joined into batches by the main process, hand
over the first batch after one chunk's time and keep the device fed in a steady stream.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Collection, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


def take_rows(
    chunks: list[torch.Tensor], n: int, pin: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first ``n`` rows of the chunks' tensors, in order, as one tensor, and the rows left
    over (views of their chunks). A first chunk that holds them all is returned as a view (no
    copy) without ``pin``, or with it when the chunk is pinned already. With ``pin`` the
    rows are copied straight into a pinned buffer from torch's caching host allocator
    (reused, its pages already mapped): one copy, where joining the chunks and then pinning
    made two, the first into fresh memory whose
    every page faulted. Copies go through numpy, on this thread with the GIL released, not
    through torch's intra-op pool: beside a full set of decode workers, that pool's threads
    faulting in the workers' fresh shared-memory pages in parallel took the workers' cores
    (2-core measurements in ``benchmarks/RESULTS.md``)."""
    first = chunks[0]
    if len(first) >= n and (not pin or first.is_pinned()):  # (the loader may have pinned it)
        return first[:n], ([first[n:]] if len(first) > n else []) + chunks[1:]
    out = torch.empty((n, *first.shape[1:]), dtype=first.dtype, pin_memory=pin)
    dst = out.numpy()
    at, rest = 0, []
    for t in chunks:
        k = min(len(t), n - at)
        if k:
            np.copyto(dst[at : at + k], t[:k].numpy())
            at += k
        if k < len(t):
            rest.append(t[k:])
    if at != n:
        raise ValueError(f"{at} rows in the chunks, {n} asked for")
    return out, rest


def select_rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``t[idx]`` without copying the index to the device: indexing a CUDA tensor with a list
    copies the list there synchronously, so the host would wait for every kernel queued
    before (in the predict pipeline, the next batch's forward). A run of consecutive rows is
    a view; other rows are joined on the device."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return t[idx[0] : idx[0] + len(idx)]
    return torch.cat([t[j : j + 1] for j in idx])


def chunk_plan(batch_size: int, workers: int, chunk: int | None = None) -> tuple[int, int | None]:
    """``(chunk, prefetch)``: samples per worker job (⌈batch / workers⌉ unless given) and jobs
    queued per worker, so that the workers decode about two model batches ahead."""
    if not workers:
        return chunk or batch_size, None
    chunk = chunk or -(-batch_size // workers)
    return chunk, max(2, -(-2 * batch_size // (chunk * workers)))


class ChunkedBatches:
    """Batches of ``batch_size`` samples (the last may be smaller) joined, in dataset order,
    from the chunks of a DataLoader whose workers each decode ⌈batch / workers⌉ samples.

    ``collate`` turns a chunk's list of samples into a dict (``None`` entries are unreadable samples
    it drops; ``None`` when nothing is left) as :func:`~crane.data.collate_skip_none` does: tensors
    with one row per sample, lists with one entry per sample. An optional ``"jpeg"`` list marks
    samples handed over undecoded; then ``"image"`` holds the rows of the others only, in order
    (``None`` if there are none). Batches stay full when samples are skipped. The tensors named in
    ``pin`` land in pinned buffers (one copy) for asynchronous copies to a GPU; the others are
    joined in ordinary memory, or stay views of their chunk. ``pin_memory``: the DataLoader's
    own thread pins whole chunks (lists' tensors too) beside the main thread. ``len()``
    counts the batches of a dataset without skipped samples.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        workers: int,
        collate: Callable[[list[Any]], dict[str, Any] | None],
        pin: Collection[str] = (),
        *,
        worker_init_fn: Callable[[int], None] | None = None,
        pin_memory: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        chunk, prefetch = chunk_plan(batch_size, workers)
        self.loader = DataLoader(
            dataset,
            batch_size=chunk,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            prefetch_factor=prefetch,
            worker_init_fn=worker_init_fn,
            pin_memory=pin_memory,
            # (its own generator: each iterator draws its workers' base seed from it, which
            # otherwise advanced torch's global RNG under a seeded caller)
            generator=torch.Generator(),
        )
        self.batch_size = batch_size
        self.pin = frozenset(pin)
        self.n_samples = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def close(self) -> None:
        """Stop the decode workers of the iteration under way now, not when it is garbage-
        collected: a stopped run's traceback keeps it alive, and forked workers hold the
        files the run had open (its progress file's lock among them)."""
        chunks, self._chunks = getattr(self, "_chunks", None), None
        shutdown = getattr(chunks, "_shutdown_workers", None)  # (torch's own __del__ calls it)
        if shutdown is not None:
            shutdown()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lists: dict[str, list[Any]] = {}
        tensors: dict[str, list[torch.Tensor]] = {}
        pending = 0

        def emit(n: int) -> dict[str, Any]:
            jpeg = lists.get("jpeg")
            out: dict[str, Any] = {}
            for key, values in lists.items():
                out[key], lists[key] = values[:n], values[n:]
            for key, chunks in tensors.items():
                rows = n if jpeg is None or key != "image" else sum(j is None for j in jpeg[:n])
                if rows:
                    out[key], tensors[key] = take_rows(chunks, rows, key in self.pin)
                else:
                    out[key] = None
            if jpeg is not None and "image" not in out:
                out["image"] = None
            return out

        self._chunks = chunks = iter(self.loader)
        for chunk in chunks:
            if chunk is None:  # every sample of the chunk was unreadable and skipped
                continue
            if "jpeg" in chunk and "jpeg" not in lists:  # the samples so far were decoded
                lists["jpeg"] = [None] * pending
            elif "jpeg" in lists and "jpeg" not in chunk:
                chunk = {**chunk, "jpeg": [None] * len(chunk["image"])}
            k = None
            for key, value in chunk.items():
                if isinstance(value, torch.Tensor):
                    tensors.setdefault(key, []).append(value)
                    if key != "image" or "jpeg" not in chunk:
                        k = len(value)
                elif isinstance(value, list):
                    lists.setdefault(key, []).extend(value)
                    k = len(value)
                elif value is not None:
                    raise TypeError(
                        f"chunk entry {key!r} is a {type(value).__name__}: "
                        "collate must give tensors or lists with one entry per sample"
                    )
            pending += k or 0
            while pending >= self.batch_size:
                pending -= self.batch_size
                yield emit(self.batch_size)
        if pending:
            yield emit(pending)


_PHOTO_BYTES = 2048 * 2048 * 3  # a 2048-px RGB photo, decoded


def check_shared_memory(in_flight: int, path: str = "/dev/shm") -> None:
    """Warn when ``path`` (where the workers' chunks live until the main process takes them)
    has less room than ``in_flight`` decoded 2048-px photos: with ``device_resize``
    (predict, evaluate, the training feature cache) chunks hold full-size pixels, and a
    container's default 64 MB ``/dev/shm`` then kills the workers with a bus error."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # no such folder (macOS, Windows): nothing to check
        return
    free, need = st.f_bavail * st.f_frsize, in_flight * _PHOTO_BYTES
    if free < need:
        log.warning(
            "device_resize hands decoded full-size images to the main process through shared "
            "memory: about %d MB for %d 2048-px photos in flight, but %s has %d MB free. If "
            "the workers die with a bus error, give the machine more shared memory (docker "
            "run --shm-size=2g), use fewer --workers, or drop --device-resize.",
            need >> 20,
            in_flight,
            path,
            free >> 20,
        )


def reuse_freed_memory(worker_id: int) -> None:
    """``worker_init_fn`` of a decode worker: let glibc's malloc keep freed buffers of up to
    64 MB in the heap (``mallopt``: mmap threshold 64 MB, trim threshold 128 MB) instead of
    giving each back to the system and faulting in fresh pages for the next image. With
    ``device_resize`` a worker makes a full-size copy of every photo; on the 2-core dev box
    that cut its time for a 2048-px JPEG, shared-memory hand-over included, from 43 to 24 ms
    (20th session, a new segment per photo; the reference path, decode + resize: 34 ms either
    way). With reused buffers (21st) it doubled the workers' rate in one run and changed
    nothing in two: glibc's own threshold adjustment gives the reuse some of the time. The
    same glibc mechanism as the README's ``MALLOC_*`` advice for CPU inference. A no-op where
    the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
