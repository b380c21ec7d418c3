"""ChunkedBatches: the loader of evaluate and the feature cache, against torch's DataLoader."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from crane.data import collate_skip_none
from crane.engine.batching import ChunkedBatches, chunk_plan


class _Items(Dataset):
    """Dict samples like AnomalyDataset's; ``bad`` indices are unreadable (None); ``jpeg``
    indices hand over bytes instead of an image."""

    def __init__(self, n: int, bad=(), jpeg=()):
        self.n, self.bad, self.jpeg = n, set(bad), set(jpeg)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in self.bad:
            return None
        g = torch.Generator().manual_seed(i)
        item = {
            "mask": torch.rand(1, 4, 4, generator=g) > 0.5,
            "label": i % 2,
            "path": f"img{i}.png",
        }
        if i in self.jpeg:
            item["jpeg"] = torch.full((3 + i,), i, dtype=torch.uint8)
        else:
            item["image"] = torch.randint(0, 256, (3, 5, 5), generator=g, dtype=torch.uint8)
        return item


def _reference(ds: _Items) -> list[dict]:
    """The readable samples one by one, through torch's DataLoader and default collation."""
    return [b for b in DataLoader(ds, batch_size=1, collate_fn=collate_skip_none) if b is not None]


def _flatten(batches: list[dict]) -> dict[str, list]:
    out: dict[str, list] = {"image": [], "mask": [], "label": [], "path": [], "jpeg": []}
    for b in batches:
        n = len(b["path"])
        out["path"] += b["path"]
        out["mask"] += list(b["mask"])
        out["label"] += b["label"].tolist()
        jpeg = b.get("jpeg", [None] * n)
        out["jpeg"] += jpeg
        rows = iter(b["image"] if b["image"] is not None else [])
        out["image"] += [next(rows) if j is None else None for j in jpeg]
        assert next(rows, None) is None  # as many rows as samples without bytes
    return out


def _same(got: dict[str, list], want: dict[str, list]) -> None:
    assert got["path"] == want["path"]
    assert got["label"] == want["label"]
    for key in ("mask", "image", "jpeg"):
        assert len(got[key]) == len(want[key])
        for a, b in zip(got[key], want[key], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize(("batch", "workers"), [(4, 0), (4, 2), (5, 2), (3, 1)])
@pytest.mark.parametrize(
    ("n", "bad", "jpeg"),
    [(13, (), ()), (16, (0, 5, 6, 7, 15), ()), (11, (2,), (1, 3, 4, 9)), (6, (), range(6))],
)
def test_batches_are_full_in_order_and_equal_the_samples(batch, workers, n, bad, jpeg):
    """Against the samples one by one: batches full but the last (skipped samples are made up
    by the next ones), in order, the images of undecoded samples left out of ``image``, also
    across chunks with and without undecoded samples."""
    ds = _Items(n, bad, jpeg)
    loader = ChunkedBatches(ds, batch, workers, collate_skip_none)
    assert len(loader) == -(-n // batch)
    batches = list(loader)
    sizes = [len(b["path"]) for b in batches]
    readable = n - len(bad)
    assert sizes == [batch] * (readable // batch) + ([readable % batch] if readable % batch else [])
    if jpeg:
        assert all(len(b["jpeg"]) == len(b["path"]) for b in batches)
    want = [dict(b, jpeg=b.get("jpeg", [None])) for b in _reference(ds)]
    for w in want:
        w.setdefault("image", None)
    _same(_flatten(batches), _flatten(want))
    if jpeg and len(jpeg) == n:
        assert all(b["image"] is None for b in batches)


def test_chunks_are_a_share_of_the_batch_and_only_named_tensors_are_pinned():
    """Workers decode ⌈batch / workers⌉ samples per job, about two batches ahead; the tensors
    named in ``pin`` are asked of torch's pinned allocator (mocked: no CUDA here), the others
    are views of the chunk when one chunk holds the batch."""
    assert chunk_plan(32, 16) == (2, 2)
    assert chunk_plan(32, 3) == (11, 2)
    assert chunk_plan(8, 0) == (8, None)
    assert chunk_plan(2, 8) == (1, 2)
    assert chunk_plan(32, 16, chunk=8) == (8, 2) and chunk_plan(32, 2, chunk=1) == (1, 32)
    ds = _Items(8)
    loader = ChunkedBatches(ds, 8, 0, collate_skip_none, pin=("image",))
    real_empty = torch.empty
    asked = []

    def empty(*args, pin_memory=False, **kwargs):
        asked.append((args[0][1:], pin_memory))
        return real_empty(*args, **kwargs)

    with mock.patch.object(torch, "empty", empty):
        (batch,) = list(loader)
    assert [shape for shape, pin in asked if pin] == [(3, 5, 5)]  # the images only
    assert ((1, 4, 4), False) not in asked  # the masks: a view of the chunk
    _same(_flatten([batch]), _flatten(_reference(ds)))


def test_chunk_entries_must_be_per_sample():
    def collate(items):
        out = collate_skip_none(items)
        out["meta"] = {"not": "per sample"}
        return out

    with pytest.raises(TypeError, match="'meta' is a dict"):
        list(ChunkedBatches(_Items(4), 2, 0, collate))
    with pytest.raises(ValueError, match="batch_size"):
        ChunkedBatches(_Items(4), 0, 0, collate_skip_none)


def test_select_rows_equals_list_indexing_without_an_index_tensor(monkeypatch):
    from crane.engine.batching import select_rows

    t = torch.arange(6 * 4, dtype=torch.float32).view(6, 4)
    for idx in ([2, 3, 4], [0], [5], [0, 2, 5], [4, 1]):
        assert torch.equal(select_rows(t, idx), t[idx])
    assert select_rows(t, [2, 3, 4]).data_ptr() == t[2].data_ptr()  # a run: a view
    # no list or tensor index reaches __getitem__ (on CUDA it would copy the index there
    # synchronously): slices only
    seen = []
    real = torch.Tensor.__getitem__

    def spy(self, key):
        seen.append(key)
        return real(self, key)

    monkeypatch.setattr(torch.Tensor, "__getitem__", spy)
    select_rows(t, [0, 2, 5])
    assert seen and all(isinstance(k, slice) for k in seen)


def test_predictions_own_their_maps(tmp_path):
    """A kept Prediction holds its own map, not a view into its batch's (up to 32 maps of
    16 MB at 2048 px); mixed sizes in one batch are grouped and each still comes back."""
    from crane.engine.predict import Detector
    from crane.models import create_model

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in ((40, 50), (30, 60), (40, 50))
    ]
    det = Detector(create_model("tiny", image_size=112), device="cpu", batch_size=3)
    preds = det.predict(images)
    assert [p.anomaly_map.shape for p in preds] == [(40, 50), (30, 60), (40, 50)]
    assert all(p.anomaly_map.base is None and p.anomaly_map.flags.owndata for p in preds)
