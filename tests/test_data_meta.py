"""meta.json read/write/validation (SPEC §8)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from data_fixtures import write_image, write_mask

from crane.data.meta import (
    MAX_LISTED,
    Sample,
    count_samples,
    dumps_meta,
    format_summary,
    meta_from_json,
    meta_to_json,
    new_meta,
    read_meta,
    validate_meta,
    write_meta,
)
from crane.errors import DatasetError


def reference_structure() -> dict:
    """What a reference generator builds (dict(...) in the same key order)."""
    return {
        "train": {
            "bottle": [
                dict(
                    img_path="bottle/train/good/000.png",
                    mask_path="",
                    cls_name="bottle",
                    specie_name="good",
                    anomaly=0,
                ),
            ]
        },
        "test": {
            "bottle": [
                dict(
                    img_path="bottle/test/good/000.png",
                    mask_path="",
                    cls_name="bottle",
                    specie_name="good",
                    anomaly=0,
                ),
                dict(
                    img_path="bottle/test/broken_large/000.png",
                    mask_path="bottle/ground_truth/broken_large/000_mask.png",
                    cls_name="bottle",
                    specie_name="broken_large",
                    anomaly=1,
                ),
            ]
        },
    }


@pytest.fixture
def dataset_root(tmp_path):
    """A root containing every file of reference_structure()."""
    for split in reference_structure().values():
        for samples in split.values():
            for s in samples:
                write_image(tmp_path / s["img_path"])
                if s["mask_path"]:
                    write_mask(tmp_path / s["mask_path"])
    return tmp_path


def test_round_trip_and_reference_bytes(dataset_root):
    meta = meta_from_json(reference_structure())
    assert meta["test"]["bottle"][1] == Sample(
        "bottle/test/broken_large/000.png",
        "bottle/ground_truth/broken_large/000_mask.png",
        "bottle",
        "broken_large",
        1,
    )
    path = write_meta(dataset_root, meta)
    raw = path.read_bytes()
    # Byte-compatible with the reference generators: json.dumps(info, indent=4) + "\n".
    assert raw == (json.dumps(reference_structure(), indent=4) + "\n").encode()
    assert raw == dumps_meta(meta).encode()
    assert read_meta(dataset_root) == meta
    assert meta_to_json(read_meta(dataset_root)) == reference_structure()
    # Key order inside each sample is the reference order.
    first = json.loads(raw)["test"]["bottle"][1]
    assert list(first) == ["img_path", "mask_path", "cls_name", "specie_name", "anomaly"]


def test_write_refuses_to_overwrite(dataset_root):
    meta = meta_from_json(reference_structure())
    path = write_meta(dataset_root, meta)
    before = path.read_bytes()
    smaller = new_meta()
    smaller["test"]["bottle"] = meta["test"]["bottle"][:1]
    with pytest.raises(DatasetError, match="already exists"):
        write_meta(dataset_root, smaller)
    assert path.read_bytes() == before
    write_meta(dataset_root, smaller, overwrite=True)
    assert read_meta(dataset_root) == smaller
    # Atomic write: no temporary files left behind.
    assert [p.name for p in dataset_root.iterdir() if p.name.startswith(".")] == []


def test_written_file_has_normal_permissions(dataset_root):
    path = write_meta(dataset_root, meta_from_json(reference_structure()))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_write_validates_before_writing(tmp_path):
    meta = new_meta()
    meta["test"]["x"] = [Sample("x/a.png", "", "x", "good", 0)]
    with pytest.raises(DatasetError, match="not found"):
        write_meta(tmp_path, meta)
    assert not (tmp_path / "meta.json").exists()


def _meta_with(entry: dict, cls: str = "bottle") -> dict:
    data = reference_structure()
    data["test"][cls] = data["test"].get(cls, []) + [entry]
    return data


GOOD = dict(
    img_path="bottle/test/good/000.png",
    mask_path="",
    cls_name="bottle",
    specie_name="good",
    anomaly=0,
)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"img_path": "/abs/x.png"}, "absolute"),
        ({"img_path": "C:/data/x.png"}, "absolute"),
        ({"img_path": "../outside.png"}, "escapes the dataset root"),
        ({"img_path": "bottle/../../x.png"}, "escapes the dataset root"),
        ({"img_path": "bottle\\test\\x.png"}, "backslash"),
        (
            {"img_path": "bottle/test/good/001.png", "mask_path": "../m.png", "anomaly": 1},
            "escapes",
        ),
        ({"img_path": "bottle/test/good/001.png", "anomaly": 2}, "anomaly must be 0 or 1, got 2"),
        (
            {
                "img_path": "bottle/test/good/001.png",
                "mask_path": "bottle/ground_truth/broken_large/000_mask.png",
            },
            "normal sample .* has a mask",
        ),
        ({}, "duplicate entry"),
        (
            {"img_path": "bottle/test/good/001.png", "cls_name": "cable"},
            "differs from its class key",
        ),
    ],
)
def test_validation_errors(dataset_root, change, message):
    write_image(dataset_root / "bottle/test/good/001.png")
    data = _meta_with({**GOOD, **change})
    with pytest.raises(DatasetError, match=message):
        validate_meta(meta_from_json(data))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({**GOOD, "extra": 1}, "unknown key"),
        ({k: v for k, v in GOOD.items() if k != "specie_name"}, "missing key.*specie_name"),
        ({**GOOD, "anomaly": True}, "anomaly must be the integer 0 or 1"),
        ({**GOOD, "anomaly": "1"}, "anomaly must be the integer 0 or 1"),
        ({**GOOD, "img_path": 3}, "img_path must be a string"),
        (["not", "an", "object"], "sample must be an object"),
    ],
)
def test_structure_errors(entry, message):
    with pytest.raises(DatasetError, match=message):
        meta_from_json(_meta_with(entry))


def test_split_errors():
    with pytest.raises(DatasetError, match="unknown split"):
        meta_from_json({"train": {}, "test": {}, "Test": {}})
    with pytest.raises(DatasetError, match="missing split"):
        meta_from_json({"test": {}})
    with pytest.raises(DatasetError, match="JSON object"):
        meta_from_json([1, 2])


def test_error_lists_first_entries_and_count():
    data = reference_structure()
    n = MAX_LISTED + 3
    data["test"]["bottle"] += [
        {**GOOD, "img_path": f"bottle/test/good/{i:03d}.png", "anomaly": 2}
        for i in range(10, 10 + n)
    ]
    with pytest.raises(DatasetError) as info:
        validate_meta(meta_from_json(data))
    text = str(info.value)
    assert f"{n} problems" in text
    assert "010.png" in text and f"{10 + MAX_LISTED - 1:03d}.png" in text
    assert f"{10 + MAX_LISTED:03d}.png" not in text
    assert "... and 3 more" in text


def test_missing_files_reported(dataset_root):
    (dataset_root / "bottle/ground_truth/broken_large/000_mask.png").unlink()
    (dataset_root / "bottle/test/good/000.png").unlink()
    data = reference_structure()
    (dataset_root / "meta.json").write_text(json.dumps(data, indent=4) + "\n")
    with pytest.raises(DatasetError) as info:
        read_meta(dataset_root)
    text = str(info.value)
    assert "2 problems" in text
    assert "image 'bottle/test/good/000.png' not found" in text
    assert "mask 'bottle/ground_truth/broken_large/000_mask.png' not found" in text
    # Without the file check the index itself is fine.
    assert read_meta(dataset_root, check_files=False) == meta_from_json(data)


def test_read_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_meta(tmp_path / "nope")
    with pytest.raises(DatasetError, match="crane datasets prepare"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"train": {}, "test": {')
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_meta(tmp_path)


def test_empty_splits_are_allowed(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"train": {}, "test": {}}))
    assert read_meta(tmp_path) == {"train": {}, "test": {}}


def test_counts_and_summary(dataset_root):
    meta = meta_from_json(reference_structure())
    c = count_samples(meta)
    assert (c["test"]["bottle"].normal, c["test"]["bottle"].anomalous) == (1, 1)
    assert c["test"]["bottle"].masks == 1 and c["train"]["bottle"].total == 1
    text = format_summary(meta)
    assert text.splitlines()[0].split() == ["split", "class", "normal", "anomalous", "masks"]
    assert "test   bottle" in text
