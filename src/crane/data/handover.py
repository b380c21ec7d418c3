"""Reusable shared-memory buffers for the full-size pixels decode workers hand over.

With ``device_resize`` a DataLoader worker ships every large photo decoded but not resized
(12.6 MB for a 2048-px RGB photo) to the main process, which resizes it on the GPU. Handing a
tensor over costs a shared-memory segment: torch creates one per tensor (``shm_open``, then
``posix_fallocate``, which allocates and zeroes every page), the worker faults its pages in as
it writes, and the segment is freed once the main process drops the tensor. On the 2-core dev
box that took 6.9 ms of a worker's ≈ 24 ms per 2048-px photo — more than half of what the
resize it saves would cost.

A :class:`HandoverPool` lets each worker keep its segments and refill them. The only state the
processes share is one int64 per (worker, slot): the worker writes a fresh token there when it
fills its buffer, and the main process writes the token's negative when the tensor it received
has been garbage-collected (``weakref.finalize``). torch keeps a tensor's Python object alive
while any *view* of it lives (``view``, slicing, ``permute``, ``as_strided``), but not while
``.numpy()``, ``.detach()``, ``.data`` or its storage do: a consumer copies the pixels (or
resizes them) while it holds the tensor, as every consumer in crane does, and keeps none of
those past it — else the worker may refill the buffer under them. A worker refills a buffer
only when it reads back the negative of *its own* last token for that slot; anything else — a
slot another process wrote, a release that never came because the main process still holds
the tensor or dropped the record without receiving it — only makes it allocate another
segment (or, past ``slots`` buffers, fall back to a fresh segment per photo, as without a
pool). Buffers are never shared between processes, so no interleaving of
processes can make a worker overwrite pixels the main process may still read.

Why by hand: torch's DataLoader has no way to return a worker's buffers to it (each hand-over
is a new segment); the buffer-recycling loaders that exist (DALI, FFCV) replace the whole
input pipeline and decoders, which would lose the reference decoder's exact pixels.
"""

from __future__ import annotations

import os
import uuid
import weakref
from typing import Any

import numpy as np
import torch

from crane.errors import CraneError

_REGISTRY: weakref.WeakValueDictionary[str, HandoverPool] = weakref.WeakValueDictionary()


class SharedMemoryFull(CraneError):
    """No room in shared memory (``/dev/shm``) for a worker's image buffer."""


def _shared_storage(nbytes: int) -> torch.UntypedStorage | None:
    """A new shared-memory storage of ``nbytes``, or None where this torch cannot make one
    (then pickling copies the tensor into a segment instead).

    :class:`SharedMemoryFull` where there is no room: falling back to a plain tensor there
    moved the failure into the worker's queue thread, which only prints it and drops the
    batch, so the main process waited for it forever (a container's 64 MB ``/dev/shm``)."""
    try:
        return torch.UntypedStorage._new_shared(nbytes)
    except AttributeError:
        return None
    except RuntimeError as exc:
        raise SharedMemoryFull(
            f"no room in shared memory for a {nbytes >> 20} MB image buffer ({exc}): give the "
            "machine more shared memory (docker run --shm-size=2g), use fewer --workers, or "
            "drop --device-resize"
        ) from None


def _release(state: np.ndarray, worker: int, slot: int, token: int) -> None:
    if state[worker, slot] == token:  # else another process wrote it: the worker reallocates
        state[worker, slot] = -token


def _received(tensor: torch.Tensor, key: str, worker: int, slot: int, token: int) -> torch.Tensor:
    """Unpickling in the main process: the plain tensor, released to its worker when it dies.

    The pool also keeps the buffer's storage (not the tensor) until the slot brings another:
    torch's receiving side then finds the segment already mapped (``storage_from_cache``)
    instead of mapping and faulting in its 12.6 MB again (1.45 → 0.39 ms to copy a 2048-px
    photo out of it on the dev box)."""
    pool = _REGISTRY.get(key)
    if pool is not None:
        weakref.finalize(tensor, _release, pool._state, worker, slot, token).atexit = False
        pool._mapped[worker, slot] = tensor.untyped_storage()
    return tensor


class _Handover:
    """A pooled tensor on its way out of a worker; unpickles as the plain tensor."""

    def __init__(
        self, tensor: torch.Tensor, key: str, state: np.ndarray, where: tuple[int, int, int]
    ):
        self.tensor, self._key, self._state, self._where = tensor, key, state, where
        self._sent = False

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        self._sent = True
        return _received, (self.tensor, self._key, *self._where)

    def __del__(self) -> None:  # dropped in the worker (a failed sample): free the buffer
        if not self._sent:
            _release(self._state, *self._where)


class HandoverPool:
    """Per-worker shared-memory buffers for tensors that workers return to the main process.

    Create it in the main process before the DataLoader starts its workers (it travels to them
    with the dataset, by fork or by pickling); in a worker, :meth:`empty` gives a uint8 tensor
    to fill and :meth:`wrap` turns it into what ``__getitem__`` returns. ``workers`` × ``slots``
    buffers at most (8 bytes of shared state each); workers past ``workers``, and photos beyond
    ``slots`` in flight per worker, get a fresh segment each, as torch would give them.
    """

    def __init__(self, workers: int = 64, slots: int = 16):
        self._key = uuid.uuid4().hex
        self._shared = torch.zeros((workers, slots), dtype=torch.int64).share_memory_()
        self._state = self._shared.numpy()
        _REGISTRY[self._key] = self
        self._local: dict[int, tuple[torch.UntypedStorage, int]] = {}  # slot → (buffer, token)
        # main process: the last storage received per (worker, slot), see _received
        self._mapped: dict[tuple[int, int], torch.UntypedStorage] = {}
        self._pid = os.getpid()
        self._count = 0

    def __getstate__(self) -> dict[str, Any]:  # to spawned workers: the shared state only
        return {"key": self._key, "shared": self._shared}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._key, self._shared = state["key"], state["shared"]
        self._state = self._shared.numpy()
        self._local, self._mapped, self._pid, self._count = {}, {}, os.getpid(), 0
        _REGISTRY.setdefault(self._key, self)  # a copy in the main process, if the original went

    def empty(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
        """An uninitialised uint8 tensor of ``shape`` in shared memory, and where it sits (None
        for a fresh segment: not in a worker, or no buffer free)."""
        from torch.utils.data import get_worker_info

        nbytes = int(np.prod(shape))
        info = get_worker_info()
        if info is None or info.id >= self._state.shape[0]:
            return shared_uint8(nbytes).view(shape), None
        if os.getpid() != self._pid:  # a forked worker: what the pool holds is the parent's
            self._local, self._mapped, self._pid, self._count = {}, {}, os.getpid(), 0
        row = self._state[info.id]
        slot = self._free_slot(row)
        if slot is None:
            return shared_uint8(nbytes).view(shape), None
        storage = self._local[slot][0] if slot in self._local else None
        if storage is None or storage.nbytes() < nbytes:
            storage = _shared_storage(nbytes)
            if storage is None:
                return shared_uint8(nbytes).view(shape), None
        self._count += 1
        token = (self._pid << 32) | self._count
        row[slot] = token
        self._local[slot] = (storage, token)
        out = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))
        return out.view(shape), (info.id, slot, token)

    def _free_slot(self, row: np.ndarray) -> int | None:
        """A slot whose buffer the main process gave back, else a slot this process has no
        buffer for and no other process's tensor is out of (never used, or given back: a
        worker of an earlier epoch's), else None."""
        for slot, (_, token) in self._local.items():
            if row[slot] == -token:
                return slot
        for slot in range(row.shape[0]):
            if slot not in self._local and row[slot] <= 0:
                return slot
        return None

    def wrap(self, tensor: torch.Tensor, where: tuple[int, int, int] | None) -> Any:
        """What a worker returns for ``tensor`` from :meth:`empty`: arrives in the main process
        as the tensor itself, its buffer given back to the worker when the main process drops it."""
        return tensor if where is None else _Handover(tensor, self._key, self._state, where)


def shared_uint8(n: int) -> torch.Tensor:
    """An uninitialised 1-D uint8 tensor of ``n`` bytes, in shared memory when called in a
    DataLoader worker (as torch's ``default_collate`` allocates there): a tensor filled in
    place is then handed to the main process without the copy pickling would make."""
    from torch.utils.data import get_worker_info

    storage = _shared_storage(n) if get_worker_info() else None
    out = torch.empty(0, dtype=torch.uint8)
    return out.set_(storage) if storage is not None else out.resize_(n)


__all__ = ["HandoverPool", "SharedMemoryFull", "shared_uint8"]
