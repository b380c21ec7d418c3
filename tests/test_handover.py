"""Workers' reusable hand-over buffers (crane.data.handover): a buffer is refilled only after
the main process has dropped every tensor of it; anything unexpected costs a new segment,
never a buffer the main process may still read."""

from __future__ import annotations

import pickle
import types
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from crane.data import handover
from crane.data.handover import HandoverPool


@pytest.fixture
def as_worker(monkeypatch):
    """Run pool calls as if in DataLoader worker ``id`` (set ``.id`` to switch)."""
    info = types.SimpleNamespace(id=0)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
    return info


def _send(obj):
    """What the main process receives for a worker's return value (same process here)."""
    return pickle.loads(pickle.dumps(obj))


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_buffer_comes_back_only_after_the_main_process_drops_the_tensor(as_worker):
    pool = HandoverPool(workers=2, slots=4)
    a, where_a = pool.empty((4, 5, 3))
    assert where_a is not None and a.is_shared()
    a.fill_(7)
    received = _send(pool.wrap(a, where_a))
    assert isinstance(received, torch.Tensor) and received.shape == (4, 5, 3)
    assert torch.equal(received, torch.full((4, 5, 3), 7, dtype=torch.uint8))
    # Still held by the main process: the next photo gets another buffer.
    b, where_b = pool.empty((4, 5, 3))
    assert where_b[1] != where_a[1] and _ptr(b) != _ptr(a)
    held = _send(pool.wrap(b, where_b))
    view = received.permute(2, 0, 1)  # a view keeps the buffer out as well
    del received
    c, where_c = pool.empty((4, 5, 3))
    assert where_c[1] not in (where_a[1], where_b[1])
    del view
    # Now slot a is back: refilled in place, under a new token.
    d, where_d = pool.empty((4, 5, 3))
    assert where_d[1] == where_a[1] and where_d[2] != where_a[2] and _ptr(d) == _ptr(a)
    del held, c, d


def test_a_return_dropped_in_the_worker_gives_its_buffer_back(as_worker):
    pool = HandoverPool(workers=1, slots=2)
    a, where = pool.empty((8,))
    wrapped = pool.wrap(a, where)
    del wrapped  # the sample failed after its pixels were decoded: never sent
    b, where_b = pool.empty((8,))
    assert where_b[1] == where[1] and _ptr(b) == _ptr(a)


def test_a_slot_another_process_wrote_is_never_refilled(as_worker):
    pool = HandoverPool(workers=1, slots=3)
    a, where = pool.empty((8,))
    _ = _send(pool.wrap(a, where))
    pool._state[0, where[1]] = (12345 << 32) | 1  # another worker's token in our slot
    del _  # our release no longer matches: the slot stays out of use for us
    assert pool._state[0, where[1]] == (12345 << 32) | 1
    b, where_b = pool.empty((8,))
    assert where_b[1] != where[1] and _ptr(b) != _ptr(a)


def test_growing_photos_take_a_bigger_buffer(as_worker):
    pool = HandoverPool(workers=1, slots=1)
    a, where = pool.empty((2, 2, 3))
    pool.wrap(a, where)  # dropped unsent: released
    b, where_b = pool.empty((20, 20, 3))
    assert where_b[1] == where[1] and b.untyped_storage().nbytes() >= 1200
    b.fill_(1)  # the whole tensor is writable
    assert int(b.sum()) == 1200


def test_fresh_segments_past_the_pool(as_worker, monkeypatch):
    pool = HandoverPool(workers=1, slots=2)
    out = [pool.empty((8,)) for _ in range(3)]
    assert [w is not None for _, w in out] == [True, True, False]
    assert out[2][0].is_shared() and pool.wrap(out[2][0], None) is out[2][0]
    as_worker.id = 5  # a worker beyond the pool's rows
    t, where = pool.empty((8,))
    assert where is None and t.is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
    t, where = pool.empty((8,))  # the main process (workers=0): plain memory
    assert where is None and not t.is_shared()


def test_a_new_worker_process_starts_with_no_buffers_but_the_free_slots(as_worker, monkeypatch):
    pool = HandoverPool(workers=1, slots=2)
    a, where = pool.empty((8,))
    _send(pool.wrap(a, where))
    assert pool._state[0, where[1]] == -where[2]  # released by an earlier worker
    monkeypatch.setattr(handover.os, "getpid", lambda: pool._pid + 1)  # a later epoch's worker
    b, where_b = pool.empty((8,))
    assert where_b is not None and where_b[1] == where[1] and _ptr(b) != _ptr(a)


def test_pickled_pool_shares_the_state():
    pool = HandoverPool(workers=2, slots=2)
    clone = pickle.loads(ForkingPickler.dumps(pool))  # as a spawned worker receives it
    clone._state[1, 1] = 42
    assert pool._state[1, 1] == 42 and clone._key == pool._key and clone._local == {}


class _Pattern(Dataset):
    """Worker-filled (H, W, 3) buffers whose every value encodes the sample's index."""

    def __init__(self, n: int, side: int, fail: tuple[int, ...] = (), vary: bool = True):
        self.n, self.side, self.fail, self.vary = n, side, fail, vary
        self.pool = HandoverPool(workers=4, slots=12)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        out, where = self.pool.empty((self.side + self.vary * (i % 3), self.side, 3))
        out.fill_(i % 251)
        wrapped = self.pool.wrap(out, where)
        if i in self.fail:
            return {"i": i, "where": where}  # decoded, then dropped (a failed sample)
        return {"i": i, "raw": wrapped, "where": where}


def _check(item) -> None:
    assert bool((item["raw"] == item["i"] % 251).all()), f"sample {item['i']} overwritten"


@pytest.mark.parametrize("hold_every", [1, 3, 0])
def test_workers_never_overwrite_what_the_main_process_holds(hold_every):
    """Real workers: the main process keeps every ``hold_every``-th tensor to the end (all of
    them; a third; none) and checks each at arrival and at the end; buffers are reused when
    tensors are dropped (few slots for many samples), and never while they are held."""
    data = _Pattern(120, 64, fail=(7, 8, 50))
    loader = DataLoader(data, batch_size=3, num_workers=2, collate_fn=lambda b: b)
    held, slots, pooled = [], set(), 0
    for batch in loader:
        for item in batch:
            if "raw" not in item:
                continue
            _check(item)
            if item["where"] is not None:
                slots.add(item["where"][:2])
                pooled += 1
            if hold_every and item["i"] % hold_every == 0:
                held.append(item)
        del batch, item  # (reference counting frees them: no collection needed)
    for item in held:
        _check(item)
    if hold_every == 0:  # everything given back: a few buffers served all 117 samples
        assert pooled == 117 and len(slots) <= 24
    assert len(held) == {1: 117, 3: 40, 0: 0}[hold_every]


def test_np_state_is_shared_with_the_workers():
    """The state array the main process releases into is the one forked workers read."""
    data = _Pattern(6, 8)
    loader = DataLoader(data, batch_size=2, num_workers=1, collate_fn=lambda b: b)
    got = [item for batch in loader for item in batch]
    assert all(item["where"] is not None for item in got)
    tokens = [item["where"][2] for item in got]
    assert len(set(tokens)) == 6
    del got
    assert (np.sort(data.pool._state[0][data.pool._state[0] != 0]) < 0).all()


def test_spawned_workers_share_the_state():
    """With spawn (macOS's default) the pool reaches the workers pickled: the same state."""
    data = _Pattern(8, 8)
    loader = DataLoader(
        data, batch_size=2, num_workers=1, collate_fn=_identity, multiprocessing_context="spawn"
    )
    got = [item for batch in loader for item in batch]
    for item in got:
        _check(item)
    slots = {item["where"][1] for item in got}
    del got, item
    assert slots and all(data.pool._state[0, s] < 0 for s in slots)


def _identity(batch):
    return batch


def test_the_main_process_maps_each_buffer_once(monkeypatch):
    """A buffer that comes back from the same slot is already mapped in the main process
    (the pool keeps its storage): new mappings follow the buffers, not the photos."""
    maps = []
    real = torch.UntypedStorage._new_shared_fd_cpu

    def counting(*args):
        maps.append(args[-1])
        return real(*args)

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared_fd_cpu", counting)
    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"
    data = _Pattern(60, 64, vary=False)
    loader = DataLoader(data, batch_size=3, num_workers=2, collate_fn=_identity)
    slots = set()
    for batch in loader:
        for item in batch:
            _check(item)
            slots.add(item["where"][:2])
    big = [m for m in maps if m >= 64 * 64 * 3]
    assert len(big) == len(slots) == len(data.pool._mapped) < 60 // 2


def test_no_room_in_shared_memory_resizes_on_the_host_instead_of_hanging(monkeypatch, caplog):
    """A worker that got no shared-memory segment fell back to a plain tensor, which the
    queue's sender thread then failed to share: it printed the error, dropped the batch, and
    the main process waited forever (Docker's 64 MB /dev/shm with --device-resize). Now the
    image is resized in the worker as without --device-resize, with one warning."""
    import logging

    import torch.utils.data as tud
    from PIL import Image

    import crane.data.handover as H
    import crane.data.transforms as T

    def full(nbytes):
        raise RuntimeError("unable to allocate shared memory(shm): No space left on device")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", full)
    monkeypatch.setattr(tud, "get_worker_info", lambda: object())  # (as in a worker)
    monkeypatch.setattr(T, "_SAID", {})
    with pytest.raises(H.SharedMemoryFull, match=r"--shm-size=2g"):
        H.shared_uint8(1 << 20)
    image = Image.new("RGB", (900, 700), (10, 20, 30))
    with caplog.at_level(logging.WARNING, logger="crane.data.transforms"):
        assert T.unresized_pixels(image, 518) is None
        assert T.unresized_pixels(image, 518) is None
    assert caplog.text.count("no room in shared memory") == 1
