"""A small deterministic synthetic anomaly dataset (MVTec layout + meta.json).

Each class is a procedural texture with per-image jitter; anomalous images are the clean
texture with one painted defect (scratch, spot, crack or missing material). Every defect
pixel differs from the clean texture by a clear margin and no other pixel changes, so the
written mask is *exactly* the set of changed pixels:
``(image != synth_sample(...).clean).any(-1) == mask``. The same seed gives
byte-identical files on any machine (numpy's PCG64 streams, lossless PNG).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from crane.data.meta import META_FILENAME, Meta, Sample, new_meta, write_meta
from crane.errors import DatasetError

logger = logging.getLogger(__name__)

DEFAULT_CLASSES = ("tile", "fabric", "plate")
DEFECTS = ("scratch", "spot", "crack", "missing")
#: Every defect pixel differs from the clean texture by at least this much (0-255 scale).
MIN_DEFECT_CONTRAST = 60

_STREAMS = {"train": 0, "test_good": 1, "test_bad": 2}
_STAIN_COLOURS = (
    [85.0, 50.0, 20.0],
    [235.0, 150.0, 30.0],
    [40.0, 130.0, 40.0],
    [150.0, 30.0, 140.0],
)

Texture = Callable[[int, np.random.Generator], np.ndarray]


# --------------------------------------------------------------------------- textures


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size]
    return y.astype(np.float64), x.astype(np.float64)


def _finish(rgb: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    rgb = rgb + rng.normal(0.0, noise, rgb.shape[:2])[..., None]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _tile(size: int, rng: np.random.Generator) -> np.ndarray:
    """Terracotta tiles with light grout lines."""
    y, x = _grid(size)
    period = size / rng.integers(3, 6)
    oy, ox = rng.uniform(0, period, 2)
    ty, tx = np.floor((y + oy) / period), np.floor((x + ox) / period)
    shade = rng.normal(0, 7, (int(size / period) + 3,) * 2)[ty.astype(int), tx.astype(int)]
    base = np.array([176.0, 112.0, 78.0]) + rng.normal(0, 5, 3)
    rgb = base + shade[..., None]
    dy = np.minimum((y + oy) % period, period - (y + oy) % period)
    dx = np.minimum((x + ox) % period, period - (x + ox) % period)
    grout = np.minimum(dy, dx) < 2.5
    rgb[grout] = np.array([214.0, 208.0, 196.0])
    return _finish(rgb, rng, 4.0)


def _fabric(size: int, rng: np.random.Generator) -> np.ndarray:
    """Blue plain weave: alternating warp/weft threads."""
    y, x = _grid(size)
    period = rng.uniform(9.0, 12.0)
    py, px = rng.uniform(0, period, 2)
    warp = np.sin(2 * np.pi * (x + px) / period)
    weft = np.sin(2 * np.pi * (y + py) / period)
    over = np.sign(np.sin(np.pi * (x + px) / period) * np.sin(np.pi * (y + py) / period))
    v = 0.55 + 0.2 * np.where(over > 0, warp, weft)
    base = np.array([70.0, 100.0, 165.0]) + rng.normal(0, 5, 3)
    return _finish(base * (0.6 + 0.6 * v[..., None]), rng, 3.0)


def _plate(size: int, rng: np.random.Generator) -> np.ndarray:
    """Brushed steel: horizontal streaks and a soft light gradient."""
    y, x = _grid(size)
    width = 31
    raw = rng.normal(0, 1, (size, size + width))
    c = np.cumsum(raw, axis=1)
    streaks = (c[:, width:] - c[:, :-width]) / math.sqrt(width)
    light = 20 * (y / size) * rng.uniform(-1, 1) + 10 * (x / size)
    grey = 150 + rng.normal(0, 4) + 9 * streaks + light
    return _finish(grey[..., None] + np.array([0.0, 2.0, 6.0]), rng, 2.0)


def _wood(size: int, rng: np.random.Generator) -> np.ndarray:
    """Wood grain: wavy light/dark bands."""
    y, x = _grid(size)
    period = rng.uniform(14.0, 20.0)
    wave = 7 * np.sin(2 * np.pi * x / (size * rng.uniform(0.5, 0.9)) + rng.uniform(0, 6.3))
    v = 0.5 + 0.5 * np.sin(2 * np.pi * (y + wave) / period + rng.uniform(0, 6.3))
    base = np.array([150.0, 100.0, 55.0]) + rng.normal(0, 5, 3)
    return _finish(base * (0.75 + 0.35 * v[..., None]), rng, 3.0)


def _mesh(size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark wire mesh on a pale yellow background."""
    y, x = _grid(size)
    period = rng.uniform(14.0, 18.0)
    oy, ox = rng.uniform(0, period, 2)
    wire = (((y + oy) % period) < 3) | (((x + ox) % period) < 3)
    rgb = np.where(wire[..., None], np.array([55.0, 60.0, 40.0]), np.array([215.0, 200.0, 140.0]))
    return _finish(rgb + rng.normal(0, 4, 3), rng, 3.0)


#: Texture generator per class name.
TEXTURES: dict[str, Texture] = {
    "tile": _tile,
    "fabric": _fabric,
    "plate": _plate,
    "wood": _wood,
    "mesh": _mesh,
}


# --------------------------------------------------------------------------- defects


def _point(rng: np.random.Generator, size: int, margin: float) -> tuple[float, float]:
    lo, hi = margin, size - margin
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _clamp(p: tuple[float, float], size: int, margin: float) -> tuple[float, float]:
    return (min(max(p[0], margin), size - margin), min(max(p[1], margin), size - margin))


def _walk(
    rng: np.random.Generator,
    start: tuple[float, float],
    steps: int,
    turn: float,
    step_range: tuple[float, float],
    size: int,
    margin: float,
) -> list[tuple[float, float]]:
    """A random polyline from ``start``: heading drawn once, then per step a turn in
    [-turn, turn] and a length in ``step_range`` (fractions of ``size``), clamped inside."""
    angle = rng.uniform(0, 2 * np.pi)
    pts = [start]
    for _ in range(steps):
        angle += rng.uniform(-turn, turn)
        step = rng.uniform(*step_range) * size
        last = pts[-1]
        pts.append(
            _clamp(
                (last[0] + step * math.cos(angle), last[1] + step * math.sin(angle)), size, margin
            )
        )
    return pts


def _draw_defect(
    kind: str, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[list[float]]]:
    """A binary mask and candidate RGB colours for one defect of ``kind``."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    margin = 0.12 * size
    if kind == "scratch":
        # Start near the centre so the three-segment line rarely runs into the margin.
        start = (float(rng.uniform(0.3, 0.7) * size), float(rng.uniform(0.3, 0.7) * size))
        pts = _walk(rng, start, 2, 0.35, (0.1, 0.16), size, 0.06 * size)
        draw.line(pts, fill=255, width=max(3, round(size / 85)))
        colours = [[235.0, 235.0, 230.0], [20.0, 20.0, 24.0]]
    elif kind == "spot":
        cx, cy = _point(rng, size, margin)
        rx, ry = rng.uniform(0.05, 0.1, 2) * size
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        colours = list(_STAIN_COLOURS)
    elif kind == "crack":
        pts = _walk(rng, _point(rng, size, margin), 10, 0.9, (0.03, 0.05), size, margin)
        draw.line(pts, fill=255, width=max(3, round(size / 75)), joint="curve")
        colours = [[12.0, 10.0, 10.0]]
    elif kind == "missing":
        cx, cy = _point(rng, size, margin)
        radius = rng.uniform(0.07, 0.11) * size
        n = 9
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = radius * rng.uniform(0.6, 1.0, n)
        draw.polygon(
            [
                (cx + r * math.cos(a), cy + r * math.sin(a))
                for a, r in zip(angles, radii, strict=True)
            ],
            fill=255,
        )
        colours = [[8.0, 8.0, 10.0]]
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(DEFECTS)}")
    return np.asarray(canvas) > 0, colours


def paint_defect(
    clean: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect on an (H, W, 3) uint8 texture; returns ``(image, mask)``.

    Pixels outside the mask are untouched; every masked pixel differs from ``clean`` by
    at least :data:`MIN_DEFECT_CONTRAST` in some channel.
    """
    size = clean.shape[0]
    mask, colours = _draw_defect(kind, size, rng)
    # The candidate farthest from the texture's mean colour, so defects never blend in.
    mean = clean.reshape(-1, 3).mean(axis=0)
    colour = max(colours, key=lambda c: float(np.abs(np.asarray(c) - mean).sum()))
    texture = rng.normal(0, 6, clean.shape[:2])[..., None]  # keep the defect slightly textured
    painted = np.clip(np.rint(np.asarray(colour) + texture), 0, 255)
    src = clean.astype(np.float64)
    weak = np.abs(painted - src).max(axis=-1) < MIN_DEFECT_CONTRAST
    # Where the defect colour happens to match the texture, push it away instead.
    pushed = np.where(src < 128, src + 100, src - 100)
    painted = np.where(weak[..., None], pushed, painted)
    image = np.where(mask[..., None], painted, src).astype(np.uint8)
    return image, mask


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class SynthSample:
    """One generated image: the clean texture, the written image and its mask (bool)."""

    clean: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    defect: str | None


def _rng(seed: int, cls_name: str, stream: str, index: int) -> np.random.Generator:
    # crc32 rather than hash(): stable across processes, and a class's images do not
    # depend on which other classes are generated.
    key = [int(seed), zlib.crc32(cls_name.encode("utf-8")), _STREAMS[stream], int(index)]
    return np.random.default_rng(np.random.SeedSequence(key))


def synth_sample(
    cls_name: str, *, seed: int = 0, stream: str = "test_bad", index: int = 0, size: int = 256
) -> SynthSample:
    """Regenerate one sample exactly as :func:`make_synthetic_dataset` writes it.

    ``stream`` is "train", "test_good" or "test_bad"; for "test_bad" the defect kind is
    ``DEFECTS[index % len(DEFECTS)]``.
    """
    if cls_name not in TEXTURES:
        raise DatasetError(
            f"unknown synthetic class {cls_name!r}; choose from {', '.join(TEXTURES)}"
        )
    if stream not in _STREAMS:
        raise ValueError(f"stream must be one of {', '.join(_STREAMS)}, got {stream!r}")
    rng = _rng(seed, cls_name, stream, index)
    clean = TEXTURES[cls_name](size, rng)
    if stream != "test_bad":
        return SynthSample(clean, clean, np.zeros(clean.shape[:2], dtype=bool), None)
    kind = DEFECTS[index % len(DEFECTS)]
    image, mask = paint_defect(clean, kind, rng)
    return SynthSample(clean, image, mask, kind)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fast, lossless and deterministic; size does not matter for a demo set.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


#: The largest side of a synthetic image (a 100000 asked for 149 GB before failing).
MAX_SIZE = 4096
_SYNTH_FILE = re.compile(r"\d{3,}(_mask)?\.png")
#: Written into each class folder it makes: ``overwrite`` replaces only folders that hold it
#: (MVTec AD names its files 000.png, 000_mask.png and its defects crack, scratch ... as
#: this does: names alone cannot tell a download from a synthetic set).
MARKER = ".crane-synthetic"


def _check_only_synthetic(out: Path, classes: tuple[str, ...]) -> None:
    """``overwrite`` replaces a synthetic dataset: refused where ``out`` holds what this
    function did not write (a class folder without its marker, or with other files in it; a
    meta.json that also indexes other classes), which replacing would delete or drop from
    the index."""
    unmarked, foreign = [], []
    for cls in classes:
        folder = out / cls
        if folder.is_symlink() or folder.is_file():
            foreign.append(folder)
            continue
        if not folder.is_dir():
            continue
        if not (folder / MARKER).is_file():
            unmarked.append(folder)
            continue
        for path in folder.rglob("*"):
            rel = path.relative_to(folder).parts
            if path.is_dir() and not path.is_symlink():
                ok = rel[0] in ("train", "test", "ground_truth") and len(rel) <= 2
            else:
                ok = rel == (MARKER,) or (
                    len(rel) == 3
                    and rel[0] in ("train", "test", "ground_truth")
                    and bool(_SYNTH_FILE.fullmatch(rel[2]))
                )
            if not ok:
                foreign.append(path)
    if unmarked:
        raise DatasetError(
            f"{', '.join(map(str, unmarked))} {'is' if len(unmarked) == 1 else 'are'} not "
            f"a synthetic class folder (no {MARKER} file: a dataset of its own, or made by a "
            "crane before the 31st session): overwrite replaces only synthetic ones; choose "
            "another --out, or remove it yourself"
        )
    if foreign:
        shown = [str(p) for p in foreign[:3]] + (["..."] if len(foreign) > 3 else [])
        raise DatasetError(
            f"{out} holds files synth did not write ({', '.join(shown)}): overwrite would "
            "delete them with their class folders; choose another --out, or move them"
        )
    meta_file = out / META_FILENAME
    if meta_file.is_file():
        try:
            data = json.loads(meta_file.read_text())
            others = sorted(
                {c for split in data.values() if isinstance(split, dict) for c in split}
                - set(classes)
            )
        except (OSError, ValueError, AttributeError):
            others = []  # (unreadable: nothing an index of it could lose)
        if others:
            raise DatasetError(
                f"{meta_file} also indexes {', '.join(others)}, which the rewritten index "
                "would drop: name them in --classes too, or choose another --out"
            )


def _write_sample(out: Path, seed: int, size: int, job: tuple[str, str, int]) -> Sample:
    """Generate and write one file of :func:`make_synthetic_dataset` (and its mask)."""
    cls, stream, i = job
    s = synth_sample(cls, seed=seed, stream=stream, index=i, size=size)
    if stream != "test_bad":
        rel = f"{cls}/{'train' if stream == 'train' else 'test'}/good/{i:03d}.png"
        _save_png(s.image, out / rel)
        return Sample(rel, "", cls, "good", 0)
    assert s.defect is not None
    name = f"{i // len(DEFECTS):03d}"
    rel = f"{cls}/test/{s.defect}/{name}.png"
    mask_rel = f"{cls}/ground_truth/{s.defect}/{name}_mask.png"
    _save_png(s.image, out / rel)
    _save_png(np.where(s.mask, 255, 0).astype(np.uint8), out / mask_rel)
    return Sample(rel, mask_rel, cls, s.defect, 1)


def make_synthetic_dataset(
    out: str | os.PathLike[str],
    seed: int = 0,
    classes: Iterable[str] = DEFAULT_CLASSES,
    n_train: int = 10,
    n_test_good: int = 8,
    n_test_bad: int = 12,
    size: int = 256,
    *,
    overwrite: bool = False,
    workers: int = 0,
) -> Meta:
    """Write a synthetic dataset in MVTec layout plus meta.json under ``out``; return its Meta.

    Layout: ``<cls>/train/good/NNN.png``, ``<cls>/test/good/NNN.png``,
    ``<cls>/test/<defect>/NNN.png`` and ``<cls>/ground_truth/<defect>/NNN_mask.png``
    (0/255), anomalous samples cycling through :data:`DEFECTS`; each class folder holds a
    :data:`MARKER` file. Existing class folders or meta.json are only replaced with
    ``overwrite=True``, and only a synthetic set's: class folders with the marker and no other
    files, a meta.json indexing these classes alone. ``workers`` > 0 writes the files
    in that many processes (the same files: each sample has its own seed).
    """
    classes = (classes,) if isinstance(classes, str) else tuple(classes)  # (one name given)
    if not classes:
        raise DatasetError("need at least one class")
    unknown = [c for c in classes if c not in TEXTURES]
    if unknown:
        raise DatasetError(
            f"unknown synthetic class(es) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(TEXTURES)}"
        )
    if len(set(classes)) != len(classes):
        raise DatasetError(f"duplicate class names in {classes}")
    if min(n_train, n_test_good, n_test_bad) < 0 or n_test_good + n_test_bad == 0:
        raise DatasetError("sample counts must be >= 0 with at least one test image")
    if workers < 0:
        raise DatasetError(f"workers must be >= 0, got {workers}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DatasetError(f"seed must be an integer >= 0, got {seed!r}")
    if not 32 <= size <= MAX_SIZE:
        raise DatasetError(f"size must be 32 to {MAX_SIZE} pixels, got {size}")
    out = Path(out)
    existing = [p for p in [out / META_FILENAME, *(out / c for c in classes)] if p.exists()]
    if existing and not overwrite:
        raise DatasetError(
            f"{', '.join(map(str, existing))} already exist(s); pass overwrite=True "
            "(CLI: --overwrite) to replace"
        )
    if existing:
        _check_only_synthetic(out, classes)
    out.mkdir(parents=True, exist_ok=True)
    marker = {"seed": seed, "size": size, "n_train": n_train, "n_test_good": n_test_good,
              "n_test_bad": n_test_bad}  # fmt: skip
    for cls in classes:
        if (out / cls).exists():
            shutil.rmtree(out / cls)
        # (first: a run stopped midway leaves folders that a later overwrite may replace)
        (out / cls).mkdir()
        (out / cls / MARKER).write_text(json.dumps(marker) + "\n")

    # One job per file (class, stream, index); written in worker processes when asked. Every
    # sample is seeded by its own (seed, class, stream, index): the files do not depend on
    # ``workers``.
    jobs = [
        (cls, stream, i)
        for cls in classes
        for stream, n in (("train", n_train), ("test_good", n_test_good), ("test_bad", n_test_bad))
        for i in range(n)
    ]
    write = functools.partial(_write_sample, out, seed, size)
    if workers > 0 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork of a caller holding threads/CUDA
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            written = list(pool.map(write, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    else:
        written = [write(job) for job in jobs]

    meta = new_meta()
    for cls in classes:
        train: list[Sample] = []
        by_specie: dict[str, list[Sample]] = {"good": []}
        for (c, stream, _), sample in zip(jobs, written, strict=True):
            if c != cls:
                continue
            if stream == "train":
                train.append(sample)
            else:
                by_specie.setdefault(sample.specie_name, []).append(sample)
        if n_train:
            meta["train"][cls] = train
        # Species sorted by name, the order the generic layout scanner produces.
        meta["test"][cls] = [s for sp in sorted(by_specie) for s in by_specie[sp]]
    write_meta(out, meta, overwrite=True)
    logger.info("synthetic dataset: %d classes written to %s", len(classes), out)
    return meta
