"""AnomalyDataset, image decoding and preprocessing (SPEC §2)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_image, write_mask
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from crane.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from crane.data import (
    AnomalyDataset,
    Sample,
    collate_skip_none,
    image_to_tensor,
    load_image,
    mask_to_tensor,
    new_meta,
    normalize_mode,
    open_image,
    open_mask,
    read_image_tensor,
    write_meta,
)
from crane.errors import DatasetError, ImageReadError

S = 40  # small model size: exactness does not depend on it
MEAN = np.asarray(OPENAI_CLIP_MEAN, np.float32)[:, None, None]
STD = np.asarray(OPENAI_CLIP_STD, np.float32)[:, None, None]


def reference_image_pipeline(size: int) -> T.Compose:
    """The reference preprocessing (open_clip image_transform as patched by get_transform)."""
    return T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.Lambda(lambda im: im.convert("RGB")),
            T.ToTensor(),
            T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )


def reference_mask_pipeline(mask: np.ndarray, size: int) -> torch.Tensor:
    """The reference target_transform applied to its 0/255 L mask, then > 0.5."""
    pil = Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")
    t = T.Compose([T.Resize((size, size)), T.CenterCrop(size), T.ToTensor()])(pil)
    return (t > 0.5).float()


def numpy_expected(rgb_resized: np.ndarray) -> torch.Tensor:
    """Independent [0,1] + CLIP normalisation of an (H, W, 3) uint8 array."""
    x = rgb_resized.astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    return torch.from_numpy((x - MEAN) / STD)


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [S, 518])
def test_preprocessing_matches_torchvision_exactly(tmp_path, size):
    path = write_image(tmp_path / "a.png", size=(67, 45), seed=3)
    ours = image_to_tensor(open_image(path), size)
    ref = reference_image_pipeline(size)(Image.open(path))
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1"])
def test_native_modes_match_reference_order(tmp_path, mode):
    # The reference resizes in the decoded mode and converts to RGB afterwards.
    path = write_image(tmp_path / f"{mode}.png", size=(31, 23), mode=mode, seed=5)
    with Image.open(path) as im:
        assert im.mode == mode
    ours = image_to_tensor(open_image(path), S)
    assert torch.equal(ours, reference_image_pipeline(S)(Image.open(path)))


def test_greyscale_equals_replicated_channels(tmp_path):
    path = write_image(tmp_path / "g.png", size=(30, 20), mode="L", seed=1)
    grey = np.asarray(Image.open(path).resize((S, S), Image.Resampling.BICUBIC))
    expected = numpy_expected(np.repeat(grey[..., None], 3, axis=-1))
    assert torch.allclose(image_to_tensor(open_image(path), S), expected, atol=1e-6)
    assert load_image(path).mode == "RGB"


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 24).reshape(24, 32).astype(np.uint16)
    path = tmp_path / "i16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    img = open_image(path)
    assert img.mode == "L"
    eight = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(np.asarray(img), eight)
    assert 120 <= np.asarray(img)[12, 16] <= 135  # mid-grey, not saturated to 255
    resized = np.asarray(Image.fromarray(eight).resize((S, S), Image.Resampling.BICUBIC))
    expected = numpy_expected(np.repeat(resized[..., None], 3, axis=-1))
    assert torch.allclose(image_to_tensor(img, S), expected, atol=1e-6)
    # An in-memory 16-bit PIL image (predict inputs) gets the same treatment.
    with Image.open(path) as raw:
        assert torch.equal(image_to_tensor(raw, S), image_to_tensor(img, S))


def _reference_modes(tmp_path) -> dict[str, Path]:
    """Files the reference reads correctly in their own mode, of noise (where resizing at
    8 bits first would round and clip differently): a CMYK JPEG, a 32-bit integer TIFF
    holding 0..255, a float TIFF on the 0..255 scale with values below 0 and above 255."""
    rng = np.random.default_rng(0)
    cmyk = Image.fromarray(rng.integers(0, 256, (50, 70, 4), np.uint8), mode="CMYK")
    cmyk.save(tmp_path / "cmyk.jpg", format="JPEG", quality=95)  # with black: clipped in RGB
    Image.fromarray(rng.integers(0, 256, (50, 70)).astype(np.int32)).save(tmp_path / "i.tif")
    f = rng.uniform(-20, 280, (50, 70)).astype(np.float32)
    Image.fromarray(f, mode="F").save(tmp_path / "f.tif")
    return {"CMYK": tmp_path / "cmyk.jpg", "I": tmp_path / "i.tif", "F": tmp_path / "f.tif"}


@pytest.mark.parametrize("size", [S, 30])
def test_modes_the_reference_reads_are_resized_in_their_own_mode(tmp_path, size):
    """CMYK, 32-bit integer greyscale holding 0..255 and float greyscale on the 0..255 scale
    are resized in their own mode and converted after, as the reference does: its pixels
    exactly (converting them to 8 bits first moved values by up to 12 levels)."""
    for mode, path in _reference_modes(tmp_path).items():
        with Image.open(path) as im:
            assert im.mode == mode
            want = reference_image_pipeline(size)(im)
            assert torch.equal(image_to_tensor(im, size), want), mode  # in memory
        assert torch.equal(read_image_tensor(path, size)[0], want), mode
        assert open_image(path).mode == mode
        # The 8-bit conversion first is not the reference (what this test guards).
        with Image.open(path) as im:
            assert not torch.equal(image_to_tensor(normalize_mode(im), size), want), mode


def test_float_images_display_rounded_as_overlays_scale_them(tmp_path):
    """load_image (overlays of files) rounds a float image's values as normalize_mode does,
    as overlay() of the same image in memory: PIL's conversion would truncate."""
    from crane.viz import overlay

    values = np.full((8, 10), 100.7, np.float32)
    values[0, 0] = 250.0
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    shown = np.asarray(load_image(tmp_path / "f.tif"))
    assert shown.shape == (8, 10, 3) and shown[1, 1].tolist() == [101, 101, 101]
    with Image.open(tmp_path / "f.tif") as im:
        drawn = np.asarray(overlay(im, np.zeros((8, 10)), alpha=0.0))
    assert np.array_equal(drawn, shown)


def test_cmyk_jpeg_displays_as_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8))
    rgb.convert("CMYK").save(path, format="JPEG", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        expected_rgb = im.convert("RGB")
    assert normalize_mode(open_image(path)).mode == "RGB"
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(expected_rgb))


def test_read_image_tensor_and_unnormalised(tmp_path):
    path = write_image(tmp_path / "a.png", size=(20, 10))
    tensor, (h, w) = read_image_tensor(path, S)
    assert (h, w) == (10, 20) and tensor.shape == (3, S, S)
    raw = image_to_tensor(open_image(path), S, mean=None, std=None)
    assert 0.0 <= raw.min() and raw.max() <= 1.0


@pytest.mark.parametrize("size", [S, 7, 518])
def test_mask_matches_reference_target_transform(size):
    rng = np.random.default_rng(0)
    mask = np.zeros((45, 67), np.uint8)
    mask[10:30, 5:40] = 1  # VisA-style 0/1 values
    mask[rng.random(mask.shape) < 0.02] = 1
    ours = mask_to_tensor(mask, size)
    assert ours.shape == (1, size, size) and ours.dtype == torch.float32
    assert set(ours.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(ours, reference_mask_pipeline(mask, size))


def test_colour_and_palette_masks(tmp_path):
    """Colour masks are binarised as the reference does: converted to L, then > 0. A
    near-black colour (JPEG noise around a coloured mask, for instance) whose luminance
    rounds to 0 is background."""
    arr = np.zeros((10, 12, 3), np.uint8)
    arr[2:5, 3:6] = (1, 0, 0)  # luminance rounds to 0: background, as in the reference
    arr[6:8, 8:10] = (0, 0, 200)
    Image.fromarray(arr).save(tmp_path / "rgb.png")
    expected = np.asarray(Image.open(tmp_path / "rgb.png").convert("L")) > 0
    assert expected.sum() == 4 and not expected[2:5, 3:6].any()
    assert np.array_equal(open_mask(tmp_path / "rgb.png"), expected)
    pal = Image.fromarray((arr.max(axis=-1) > 0).astype(np.uint8), mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 is red: luminance 76
    pal.save(tmp_path / "pal.png")
    with Image.open(tmp_path / "pal.png") as im:
        assert im.mode == "P"
    assert np.array_equal(open_mask(tmp_path / "pal.png"), arr.max(axis=-1) > 0)
    pal.putpalette([0, 0, 0, 1, 0, 0] + [0] * 762)  # index 1 near-black: background
    pal.save(tmp_path / "dark.png")
    assert not open_mask(tmp_path / "dark.png").any()
    expected = arr.max(axis=-1) > 0
    Image.fromarray(np.where(expected, 65535, 0).astype(np.uint16)).save(tmp_path / "m16.png")
    assert np.array_equal(open_mask(tmp_path / "m16.png"), expected)


def test_float_masks_are_binarised_as_the_reference_converts_them(tmp_path):
    """PIL's F → L conversion truncates: a value below 1 is background in the reference."""
    values = np.array([[0.0, 0.4, 0.99, 1.0, 1.4, 300.0, -2.0, 0.6]], np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    want = np.asarray(Image.open(tmp_path / "f.tif").convert("L")) > 0
    assert want.tolist() == [[False, False, False, True, True, True, False, False]]
    assert np.array_equal(open_mask(tmp_path / "f.tif"), want)


# --------------------------------------------------------------------------- dataset


def build(root, entries, write=True):
    """entries: (img_path, mask_path, anomaly, cls); writes meta.json."""
    meta = new_meta()
    for img, mask, anomaly, cls in entries:
        meta["test"].setdefault(cls, []).append(
            Sample(img, mask, cls, "bad" if anomaly else "good", anomaly)
        )
    if write:
        write_meta(root, meta, check_files=False)
    return meta


@pytest.fixture
def small_root(tmp_path):
    write_image(tmp_path / "a/good/0.png", size=(20, 16), mode="L")
    write_image(tmp_path / "a/bad/1.png", size=(20, 16), mode="P", seed=2)
    write_mask(tmp_path / "a/gt/1.png", size=(20, 16), box=(4, 4, 12, 10), value=1)
    write_image(tmp_path / "a/bad/2.png", size=(20, 16), mode="RGBA", seed=3)
    write_image(tmp_path / "b/good/0.jpg", size=(33, 17), fmt="JPEG")
    build(
        tmp_path,
        [
            ("a/good/0.png", "", 0, "a"),
            ("a/bad/1.png", "a/gt/1.png", 1, "a"),
            ("a/bad/2.png", "", 1, "a"),
            ("b/good/0.jpg", "", 0, "b"),
        ],
    )
    return tmp_path


def test_dataset_items(small_root):
    ds = AnomalyDataset(small_root, image_size=S)
    assert len(ds) == 4 and ds.class_names == ["a", "b"]
    items = [ds[i] for i in range(len(ds))]
    for item in items:
        assert set(item) == {
            "image",
            "mask",
            "label",
            "cls_name",
            "specie_name",
            "path",
            "mask_path",
        }
        assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, S, S) and item["mask"].dtype == torch.float32
        assert torch.isfinite(item["image"]).all()
    assert [it["label"] for it in items] == [0, 1, 1, 0]
    assert items[1]["path"] == str(small_root / "a/bad/1.png")
    expected_mask = np.zeros((16, 20), np.uint8)
    expected_mask[4:10, 4:12] = 1
    assert torch.equal(items[1]["mask"], reference_mask_pipeline(expected_mask, S))
    assert items[2]["mask"].sum() == 0  # anomalous without a mask: zeros, as the reference
    assert torch.equal(
        items[1]["image"], reference_image_pipeline(S)(Image.open(small_root / "a/bad/1.png"))
    )
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_skip_none)))
    assert batch["image"].shape == (4, 3, S, S)
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0, 1, 1, 0]
    assert batch["cls_name"] == ["a", "a", "a", "b"]


def test_dataset_class_filter_and_arguments(small_root):
    assert len(AnomalyDataset(small_root, classes=["b"], image_size=S)) == 1
    with pytest.raises(DatasetError, match="'zzz' not in the test split.*available: a, b"):
        AnomalyDataset(small_root, classes=["zzz"])
    with pytest.raises(DatasetError, match="split must be one of"):
        AnomalyDataset(small_root, split="val")
    with pytest.raises(DatasetError, match="on_error must be one of"):
        AnomalyDataset(small_root, on_error="ignore")
    assert len(AnomalyDataset(small_root, split="train")) == 0


def test_32bit_greyscale_is_read_by_the_range_its_values_show(tmp_path):
    """Mode I (a 32-bit container, e.g. an int32 TIFF): 8-bit data as the reference reads them
    (not divided by 257 into black), 16-bit data as 16-bit files, anything else refused."""
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (24, 32)).astype(np.int32)
    path = tmp_path / "i32_8bit.tif"
    Image.fromarray(eight).save(path)
    with Image.open(path) as im:
        assert im.mode == "I"
        reference = np.asarray(im.convert("L"))
    assert np.array_equal(np.asarray(open_image(path)), reference)
    assert np.array_equal(reference, eight)
    sixteen = (eight * 257).astype(np.int32)  # 16-bit data, max > 255
    Image.fromarray(sixteen).save(tmp_path / "i32_16bit.tif")
    assert np.array_equal(np.asarray(open_image(tmp_path / "i32_16bit.tif")), eight)
    for name, bad in (("wide.tif", sixteen * 2), ("negative.tif", eight - 1)):
        Image.fromarray(bad.astype(np.int32)).save(tmp_path / name)
        with pytest.raises(ImageReadError, match=f"{name}: a 32-bit integer greyscale image"):
            open_image(tmp_path / name)
    # In memory (predict inputs) the same rule; resized in mode I as the reference does.
    in_memory = Image.fromarray(eight)
    assert torch.equal(image_to_tensor(in_memory, S), reference_image_pipeline(S)(in_memory))
    # Formats that hold at most 16 bits (16-bit PGM opens as mode I): the fixed 16-bit mapping,
    # whatever the values, so that two frames of one sensor read alike.
    dark = np.full((24, 32), 200, np.uint16)
    bright = dark.copy()
    bright[0, 0] = 300
    for name, arr in (("dark.pgm", dark), ("bright.pgm", bright)):
        Image.fromarray(arr).save(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.mode == "I"
        assert np.asarray(open_image(tmp_path / name))[5, 5] == round(200 / 257)


def test_float_images_just_above_one_are_refused(tmp_path):
    values = np.linspace(0, 1.03, 24 * 32, dtype=np.float32).reshape(24, 32)
    Image.fromarray(values, mode="F").save(tmp_path / "over.tif")
    with pytest.raises(ImageReadError, match=r"over\.tif: a float image reaches 1\.03"):
        open_image(tmp_path / "over.tif")
    Image.fromarray(values * 200, mode="F").save(tmp_path / "wide.tif")  # [0, 206]: 8-bit
    assert np.asarray(open_image(tmp_path / "wide.tif")).max() == 206


def test_corrupt_image_raises_naming_the_file(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    build(tmp_path, [("x/corrupt.png", "", 0, "x")])
    ds = AnomalyDataset(tmp_path, image_size=S)
    with pytest.raises(ImageReadError, match="corrupt.png"):
        ds[0]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_raises_naming_the_file(tmp_path, fmt):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"trunc.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=f"trunc.{fmt.lower()}"):
        open_image(path)


def test_missing_files(tmp_path, caplog):
    write_image(tmp_path / "a/0.png")
    write_image(tmp_path / "a/1.png")
    build(
        tmp_path,
        [("a/0.png", "", 0, "a"), ("a/1.png", "a/gt/1_mask.png", 1, "a"), ("a/2.png", "", 0, "a")],
    )
    with pytest.raises(DatasetError) as info:
        AnomalyDataset(tmp_path)
    assert "2 problems" in str(info.value)
    assert "a/gt/1_mask.png" in str(info.value) and "a/2.png" in str(info.value)
    with caplog.at_level(logging.WARNING):
        ds = AnomalyDataset(tmp_path, on_error="skip", image_size=S)
    assert len(ds) == 1 and "2 sample(s) skipped" in caplog.text


def test_wrong_sized_mask_names_both_files(tmp_path):
    write_image(tmp_path / "img.png", size=(20, 16))
    write_mask(tmp_path / "img_mask.png", size=(16, 20))
    build(tmp_path, [("img.png", "img_mask.png", 1, "c")])
    with pytest.raises(DatasetError, match=r"img_mask\.png is 16x20 .*/img\.png is 20x16"):
        AnomalyDataset(tmp_path, image_size=S)[0]


def test_skip_mode_logs_and_collate_drops(tmp_path, caplog):
    for i in range(4):
        write_image(tmp_path / f"c/{i}.png", seed=i)
    (tmp_path / "c" / "1.png").write_bytes(b"not an image")
    write_mask(tmp_path / "c/3_mask.png", size=(5, 5))  # wrong size for 3.png
    build(
        tmp_path,
        [(f"c/{i}.png", "c/3_mask.png" if i == 3 else "", int(i == 3), "c") for i in range(4)],
    )
    ds = AnomalyDataset(tmp_path, image_size=S, on_error="skip")
    with caplog.at_level(logging.WARNING):
        assert ds[1] is None and ds[3] is None
    assert "c/1.png" in caplog.text and "3_mask.png" in caplog.text
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_skip_none)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, S, S)
    assert [p.rsplit("/", 1)[-1] for p in batch["path"]] == ["0.png", "2.png"]
    assert collate_skip_none([None, None]) is None
    with pytest.raises(ImageReadError):
        ds.load(1)  # load() always raises


def test_dataset_with_in_memory_meta(tmp_path):
    write_image(tmp_path / "x.png")
    meta = build(tmp_path, [("x.png", "", 0, "k")], write=False)
    ds = AnomalyDataset(tmp_path, meta=meta, image_size=S)
    assert ds[0]["cls_name"] == "k"


def test_a_mask_in_a_mode_pil_cannot_convert_is_a_read_error(tmp_path):
    """A LAB TIFF mask: PIL cannot convert it to L, and the bare ValueError, naming no file,
    stopped --skip-bad runs and `datasets check --deep`."""
    from crane.data.imageio import open_mask
    from crane.errors import ImageReadError

    path = tmp_path / "lab.tif"
    Image.new("LAB", (8, 6)).save(path)
    with pytest.raises(ImageReadError, match=r"cannot read mask .*lab\.tif: conversion"):
        open_mask(path)
