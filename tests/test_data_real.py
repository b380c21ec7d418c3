"""The real sample datasets shipped with the project (VisA fryum, BrainMRI).

The data folder is read-only: meta is built in memory and handed to the Dataset.
Skipped where the samples are not available.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import shared_data_dir
from PIL import Image

from crane.data import AnomalyDataset, collate_skip_none, prepare, validate_meta
from crane.data.meta import dumps_meta

DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="shared sample data not available")


@pytest.fixture(scope="module")
def visa_meta():
    return prepare("visa", DATA / "visa")


@pytest.fixture(scope="module")
def brain_meta():
    return prepare("brainmri", DATA / "brainmri")


def test_visa_fryum_counts_and_pairing(visa_meta):
    assert list(visa_meta["train"]) == ["fryum"] and list(visa_meta["test"]) == ["fryum"]
    train, test = visa_meta["train"]["fryum"], visa_meta["test"]["fryum"]
    assert len(train) == 450 and all(s.anomaly == 0 for s in train)
    normal = [s for s in test if s.anomaly == 0]
    anomalous = [s for s in test if s.anomaly == 1]
    assert (len(normal), len(anomalous)) == (50, 100)
    for s in train + normal:
        assert s.mask_path == "" and s.img_path.startswith("fryum/Data/Images/Normal/")
    for s in anomalous:
        assert s.img_path.startswith("fryum/Data/Images/Anomaly/")
        assert s.mask_path.startswith("fryum/Data/Masks/Anomaly/")
        assert Path(s.mask_path).stem == Path(s.img_path).stem
        assert (DATA / "visa" / s.mask_path).is_file()
    assert len({s.img_path for s in train + test}) == 600
    validate_meta(visa_meta, DATA / "visa")
    assert dumps_meta(visa_meta).count('"anomaly": 1') == 100


def test_visa_items_load_with_masks(visa_meta):
    ds = AnomalyDataset(DATA / "visa", meta=visa_meta, image_size=518)
    anomalous = [i for i, s in enumerate(ds.samples) if s.anomaly][:3]
    for i in anomalous:
        item = ds[i]
        assert item["image"].shape == (3, 518, 518) and torch.isfinite(item["image"]).all()
        # VisA masks store 0/1 values: they must still binarise to a non-empty mask.
        assert item["mask"].sum() > 0 and set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_brainmri_counts(brain_meta):
    samples = brain_meta["test"]["brain"]
    assert brain_meta["train"] == {}
    labels = Counter(s.anomaly for s in samples)
    assert (labels[0], labels[1]) == (98, 155)
    assert {s.specie_name for s in samples if s.anomaly == 0} == {"no"}
    assert all(s.mask_path == "" for s in samples)


def test_brainmri_every_image_loads(brain_meta):
    root = DATA / "brainmri"
    modes: dict[str, list[int]] = {}
    sizes = set()
    for i, s in enumerate(brain_meta["test"]["brain"]):
        with Image.open(root / s.img_path) as im:
            modes.setdefault(im.mode, []).append(i)
            sizes.add(im.size)
    assert {"RGB", "L", "RGBA", "P"} <= set(modes)  # the mixed modes the test is about
    assert len(sizes) > 10  # and many different original sizes
    # Every image through the full pipeline at a small size (decoding is what varies) ...
    ds = AnomalyDataset(root, meta=brain_meta, image_size=64)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64), item["path"]
        assert torch.isfinite(item["image"]).all(), item["path"]
        assert item["mask"].shape == (1, 64, 64) and item["mask"].sum() == 0
        assert item["label"] == ds.samples[i].anomaly
    # ... and a few of each mode at the model's 518.
    ds518 = AnomalyDataset(root, meta=brain_meta, image_size=518)
    picks = [i for idx in modes.values() for i in idx[:2]]
    for i in picks:
        item = ds518[i]
        assert item["image"].shape == (3, 518, 518) and torch.isfinite(item["image"]).all()
    batch = collate_skip_none([ds518[picks[0]], ds518[picks[-1]]])
    assert batch["image"].shape == (2, 3, 518, 518)
    assert np.isfinite(batch["image"].numpy()).all()


def test_a_meta_json_of_another_dataset_than_named_is_refused(visa_meta, tmp_path):
    """VisA's prepared index opened as --dataset mvtec was evaluated (with the prompts the
    paper uses for MVTec, i.e. those trained on VisA) and reported as MVTec."""
    from crane.data.meta import write_meta
    from crane.engine.common import open_dataset
    from crane.errors import DatasetError

    staged = tmp_path / "staged"  # (the shared data read-only: its index goes beside links)
    staged.mkdir()
    for entry in (DATA / "visa").iterdir():
        (staged / entry.name).symlink_to(entry)
    write_meta(staged, visa_meta)
    with pytest.raises(DatasetError, match=r"indexes visa classes \(fryum\), none of the mvtec"):
        open_dataset(staged, "mvtec", image_size=56)
    # Classes of no known dataset (one's own, or those VisA's scan keeps beside its list) pass.
    widgets = [dataclasses.replace(x, cls_name="widget") for x in visa_meta["test"]["fryum"]]
    own = {"test": {"widget": widgets}, "train": {}}
    write_meta(staged, own, overwrite=True)
    assert len(open_dataset(staged, "mvtec", image_size=56)) == len(visa_meta["test"]["fryum"])
    n = len(open_dataset(staged, "visa", image_size=56))
    assert n == len(open_dataset(staged, "generic", image_size=56)) > 0
    assert len(open_dataset(staged, None, image_size=56)) > 0
