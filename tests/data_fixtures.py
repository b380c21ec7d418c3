"""Helpers for the data tests: tiny image files and miniature dataset trees."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """Folder with the real sample datasets (visa/, brainmri/), if available."""
    candidates = [
        os.environ.get("CRANE_TEST_DATA", ""),
        REPO_ROOT / "shared" / "data",
        "/work/shared/data",
    ]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def write_image(
    path: Path,
    size: tuple[int, int] = (16, 12),
    mode: str = "RGB",
    seed: int = 0,
    fmt: str | None = None,
) -> Path:
    """Write a small random image (size = (width, height)) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    rgb.convert(mode).save(path, format=fmt)
    return path


def write_mask(
    path: Path,
    size: tuple[int, int] = (16, 12),
    box: tuple[int, int, int, int] = (2, 2, 6, 6),
    value: int = 255,
) -> Path:
    """Write an L mask with ``value`` inside ``box`` (x0, y0, x1, y1, exclusive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = value
    Image.fromarray(arr).save(path)
    return path


def write_blank_mask(path: Path, size: tuple[int, int] = (16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0]), np.uint8)).save(path)
    return path


def make_mvtec_class(
    root: Path,
    cls: str,
    *,
    normal: str = "good",
    train: Iterable[str] = ("000", "001", "002"),
    test_good: Iterable[str] = ("000", "001"),
    defects: dict[str, Iterable[str]] | None = None,
    masks: dict[str, Iterable[str]] | None = None,
    img_ext: str = ".png",
    mask_name: str = "{stem}_mask.png",
) -> None:
    """An MVTec-style class. ``masks`` defaults to one mask per defect image."""
    defects = {"crack": ("000", "001")} if defects is None else defects
    masks = defects if masks is None else masks
    for stem in train:
        write_image(root / cls / "train" / normal / f"{stem}{img_ext}")
    for stem in test_good:
        write_image(root / cls / "test" / normal / f"{stem}{img_ext}")
    for specie, stems in defects.items():
        for stem in stems:
            write_image(root / cls / "test" / specie / f"{stem}{img_ext}")
    for specie, stems in masks.items():
        for stem in stems:
            write_mask(root / cls / "ground_truth" / specie / mask_name.format(stem=stem))


def samples_of(meta, split: str, cls: str) -> list:
    return meta[split].get(cls, [])


def counts(meta, split: str, cls: str) -> tuple[int, int]:
    """(normal, anomalous) of one class."""
    s = samples_of(meta, split, cls)
    return sum(x.anomaly == 0 for x in s), sum(x.anomaly == 1 for x in s)


def photo_like(mode: str, hw: tuple[int, int], seed: int = 0) -> Image.Image:
    """An (H, W) = ``hw`` image in ``mode``: smooth content plus sensor-like noise, as in a
    photograph (resampling and JPEG tests need both)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    arr = np.asarray(low.resize(hw[::-1], Image.Resampling.BICUBIC), dtype=np.int16)
    arr = arr + rng.integers(-12, 13, (*hw, 3), dtype=np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert(mode)


def separable_blob_cases(n: int, seed: int = 0):
    """``n`` (maps, masks) pairs of 4 32x32 images, three rectangles of 1..4 px sides each,
    every anomalous pixel at 0.9 and every normal one below 0.5: perfect maps over regions of
    many areas, whose 1/area weights sum to 1 only up to rounding."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        masks = np.zeros((4, 32, 32), bool)
        for b in range(4):
            for _ in range(3):
                r, c = rng.integers(0, 28, 2)
                masks[b, r : r + rng.integers(1, 5), c : c + rng.integers(1, 5)] = True
        yield np.where(masks, 0.9, rng.random((4, 32, 32)) * 0.5).astype(np.float32), masks


def stop_on_call(real, n: int):
    """``real`` wrapped to raise KeyboardInterrupt on its ``n``-th call: a run stopped there
    (Ctrl-C, the device call's time running out)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapped


def deny(monkeypatch, method: str, where) -> None:
    """``Path.<method>`` raises PermissionError for the paths ``where(path)`` picks: a folder
    without permission, simulated (the tests run as root, whom permissions do not stop)."""
    real = getattr(Path, method)

    def denied(self, *args, **kwargs):
        if where(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, denied)
