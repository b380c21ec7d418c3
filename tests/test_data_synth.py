"""Synthetic dataset: determinism, exact masks, layout and loading."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crane.data import AnomalyDataset, prepare, read_meta
from crane.data.synth import (
    DEFECTS,
    MARKER,
    MIN_DEFECT_CONTRAST,
    TEXTURES,
    make_synthetic_dataset,
    paint_defect,
    synth_sample,
)
from crane.errors import DatasetError

SMALL = dict(classes=("tile", "fabric"), n_train=2, n_test_good=2, n_test_bad=5, size=64)


def files_bytes(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes(tmp_path):
    make_synthetic_dataset(tmp_path / "a", seed=7, **SMALL)
    make_synthetic_dataset(tmp_path / "b", seed=7, **SMALL)
    make_synthetic_dataset(tmp_path / "c", seed=8, **SMALL)
    a, b, c = (files_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert all(a[k] != c[k] for k in images)


def test_worker_processes_write_the_same_files(tmp_path):
    make_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    make_synthetic_dataset(tmp_path / "b", seed=3, workers=2, **SMALL)
    a, b = files_bytes(tmp_path / "a"), files_bytes(tmp_path / "b")
    assert "meta.json" in a and len(a) == 2 * (2 + 2 + 2 * 5 + 1) + 1  # (+ each class's marker)
    assert a == b


def test_class_images_do_not_depend_on_other_classes(tmp_path):
    make_synthetic_dataset(tmp_path / "a", seed=1, **SMALL)
    make_synthetic_dataset(tmp_path / "b", seed=1, **{**SMALL, "classes": ("fabric",)})
    a, b = files_bytes(tmp_path / "a"), files_bytes(tmp_path / "b")
    assert all(a[k] == v for k, v in b.items() if k.startswith("fabric/"))
    make_synthetic_dataset(tmp_path / "c", seed=1, **{**SMALL, "classes": "fabric"})  # one name
    assert files_bytes(tmp_path / "c") == b


def test_masks_are_exactly_the_changed_pixels(tmp_path):
    out = tmp_path / "syn"
    meta = make_synthetic_dataset(out, seed=3, **SMALL)
    for cls in SMALL["classes"]:
        bad = [s for s in meta["test"][cls] if s.anomaly]
        assert sorted({s.specie_name for s in bad}) == sorted(DEFECTS)
        for s in bad:
            img = np.asarray(Image.open(out / s.img_path))
            mask = np.asarray(Image.open(out / s.mask_path))
            assert set(np.unique(mask)) == {0, 255}
            kind = s.specie_name
            index = next(
                j
                for j in range(SMALL["n_test_bad"])
                if DEFECTS[j % len(DEFECTS)] == kind
                and f"{j // len(DEFECTS):03d}.png" == s.img_path.rsplit("/", 1)[-1]
            )
            clean = synth_sample(
                cls, seed=3, stream="test_bad", index=index, size=SMALL["size"]
            ).clean
            changed = (img != clean).any(axis=-1)
            assert np.array_equal(changed, mask > 0), (cls, s.img_path)
            diff = np.abs(img.astype(int) - clean.astype(int)).max(axis=-1)
            assert diff[mask > 0].min() >= MIN_DEFECT_CONTRAST
        for i, s in enumerate(meta["train"][cls]):
            img = np.asarray(Image.open(out / s.img_path))
            expected = synth_sample(cls, seed=3, stream="train", index=i, size=SMALL["size"])
            assert np.array_equal(img, expected.image)


@pytest.mark.parametrize("kind", DEFECTS)
@pytest.mark.parametrize("cls", sorted(TEXTURES))
def test_every_defect_is_visible_on_every_texture(cls, kind):
    for i in range(3):
        rng = np.random.default_rng(i)
        clean = TEXTURES[cls](128, rng)
        assert clean.shape == (128, 128, 3) and clean.dtype == np.uint8
        image, mask = paint_defect(clean, kind, rng)
        area = mask.mean()
        assert 0.001 < area < 0.1, (cls, kind, area)
        assert np.array_equal((image != clean).any(-1), mask)
        diff = np.abs(image.astype(int) - clean.astype(int)).max(axis=-1)
        assert diff[mask].min() >= MIN_DEFECT_CONTRAST
        assert diff[mask].mean() > 1.5 * MIN_DEFECT_CONTRAST  # clearly visible on average


def test_textures_differ_between_classes():
    means = {c: TEXTURES[c](64, np.random.default_rng(0)).reshape(-1, 3).mean(0) for c in TEXTURES}
    names = sorted(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 10, (a, b)


def test_layout_meta_and_loading(tmp_path):
    out = tmp_path / "syn"
    meta = make_synthetic_dataset(out, seed=0, **SMALL)
    assert read_meta(out) == meta
    # The generic scanner finds exactly the same samples.
    scanned = prepare("generic", out)
    for split in ("train", "test"):
        assert {c: meta[split][c] for c in sorted(meta[split])} == scanned[split]
    for cls in SMALL["classes"]:
        assert len(meta["train"][cls]) == 2
        assert [s.anomaly for s in meta["test"][cls]].count(1) == 5
    ds = AnomalyDataset(out, image_size=32)
    items = [ds[i] for i in range(len(ds))]
    assert all((it["mask"].sum() > 0) == bool(it["label"]) for it in items)


def test_default_size_and_counts():
    s = synth_sample("plate")
    assert s.image.shape == (256, 256, 3)
    import inspect

    params = inspect.signature(make_synthetic_dataset).parameters
    assert params["classes"].default == ("tile", "fabric", "plate")
    assert (
        params["n_train"].default,
        params["n_test_good"].default,
        params["n_test_bad"].default,
    ) == (10, 8, 12)


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "syn"
    make_synthetic_dataset(out, **SMALL)
    stale = out / "tile" / "train" / "good" / "099.png"  # (an earlier, larger synthetic set's)
    stale.write_bytes(b"x")
    with pytest.raises(DatasetError, match="already exist"):
        make_synthetic_dataset(out, **SMALL)
    make_synthetic_dataset(out, overwrite=True, **SMALL)
    assert not stale.exists()


def test_overwrite_replaces_only_a_synthetic_dataset(tmp_path):
    """--overwrite deleted whole class folders, a user's notes and extra images in them too,
    and rewrote a meta.json that indexed other classes (they dropped out of it); a real
    download in MVTec form (000.png, 000_mask.png, defects named crack ...) looks like a
    synthetic set by its names: each synthetic class folder carries a marker."""
    out = tmp_path / "syn"
    make_synthetic_dataset(out, **SMALL)
    assert (out / "tile" / MARKER).is_file() and (out / "fabric" / MARKER).is_file()
    notes = out / "tile" / "NOTES.txt"
    notes.write_text("mine")
    with pytest.raises(DatasetError, match=r"files synth did not write \(.*NOTES\.txt\)"):
        make_synthetic_dataset(out, overwrite=True, **SMALL)
    assert notes.read_text() == "mine"
    notes.unlink()
    shots = out / "tile" / "test" / "good" / "shot_1.png"
    shots.write_bytes(b"x")
    with pytest.raises(DatasetError, match="shot_1.png"):
        make_synthetic_dataset(out, overwrite=True, **SMALL)
    shots.unlink()
    with pytest.raises(DatasetError, match="also indexes fabric, which the rewritten index"):
        make_synthetic_dataset(out, overwrite=True, **{**SMALL, "classes": ("tile",)})
    assert set(read_meta(out)["test"]) == {"tile", "fabric"}
    make_synthetic_dataset(out, overwrite=True, **SMALL)  # (its own files only: replaced)
    # A download in MVTec form, no marker: refused, and left as it was.
    real = tmp_path / "mvtec" / "tile"
    for rel in ("train/good/000.png", "test/crack/000.png", "ground_truth/crack/000_mask.png"):
        (real / rel).parent.mkdir(parents=True, exist_ok=True)
        (real / rel).write_bytes(b"a real image")
    with pytest.raises(DatasetError, match=r"not a synthetic class folder \(no \.crane-synth"):
        make_synthetic_dataset(real.parent, overwrite=True, **{**SMALL, "classes": ("tile",)})
    assert (real / "test" / "crack" / "000.png").read_bytes() == b"a real image"
    with pytest.raises(DatasetError, match="size must be 32 to 4096 pixels, got 100000"):
        make_synthetic_dataset(tmp_path / "big", **{**SMALL, "size": 100000})
    assert not (tmp_path / "big").exists()


def test_overwrite_takes_a_synthetic_set_of_a_thousand_images_and_more(tmp_path):
    """Images from 1000 on are named 1000.png: the overwrite refused the set it wrote."""
    small = dict(classes=("tile",), n_train=1001, n_test_good=1, n_test_bad=0, size=32)
    make_synthetic_dataset(tmp_path / "s", **small)
    assert (tmp_path / "s" / "tile" / "train" / "good" / "1000.png").is_file()
    make_synthetic_dataset(tmp_path / "s", overwrite=True, **{**small, "n_train": 2})
    assert not (tmp_path / "s" / "tile" / "train" / "good" / "1000.png").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": ("marble",)}, "unknown synthetic class"),
        ({"classes": ()}, "at least one class"),
        ({"classes": ("tile", "tile")}, "duplicate"),
        ({"n_test_good": 0, "n_test_bad": 0}, "at least one test image"),
        ({"size": 8}, "size must be 32 to 4096"),
        ({"workers": -1}, "workers must be >= 0"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DatasetError, match=message):
        make_synthetic_dataset(tmp_path / "out", **{**SMALL, **kwargs})
    assert not (tmp_path / "out").exists()  # (refused before anything is written)


def test_a_synth_stopped_midway_is_replaced_by_overwrite(tmp_path, monkeypatch):
    """The marker was written after the samples: a run stopped midway left unmarked folders,
    which a rerun with overwrite refused as someone else's."""
    from data_fixtures import stop_on_call

    import crane.data.synth as S

    real = S._save_png
    monkeypatch.setattr(S, "_save_png", stop_on_call(real, 5))
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_dataset(tmp_path / "s", **SMALL)
    monkeypatch.setattr(S, "_save_png", real)
    make_synthetic_dataset(tmp_path / "s", overwrite=True, **SMALL)
    assert set(read_meta(tmp_path / "s")["test"]) == {"tile", "fabric"}
