"""Heatmap overlays: anomaly map in a jet palette over the image, ground-truth contour on top."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from crane.data.imageio import load_image


def jet(values: np.ndarray) -> np.ndarray:
    """Matplotlib-style 'jet' colours (uint8 RGB) for values in [0, 1]: channel c is
    ``round(255 · clip(1.5 − |4v − k|, 0, 1))`` with k = 3, 2, 1 for red, green, blue.
    Computed channel by channel in one scratch buffer (a full-size overlay's maps are tens of
    megabytes; temporaries per step cost more than the arithmetic)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1)
    out = np.empty((*v.shape, 3), np.uint8)
    t = np.empty_like(v)
    for c, k in enumerate((3, 2, 1)):
        np.multiply(v, 4, out=t)
        t -= k
        np.abs(t, out=t)
        np.subtract(1.5, t, out=t)
        np.clip(t, 0, 1, out=t)
        t *= 255
        np.round(t, out=t)
        out[..., c] = t
    return out


def resize_map(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map to (height, width)."""
    if amap.shape == (height, width):
        return amap.astype(np.float32, copy=False)
    im = Image.fromarray(amap.astype(np.float32), mode="F")
    return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(
    image: Image.Image,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Image.Image:
    """RGB overlay at the image's own size. ``amap`` is any size (resized bilinearly);
    ``mask`` (same size as the image, non-zero = anomalous) is drawn as a green contour."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # read only: no copy needed
    h, w = rgb.height, rgb.width
    m = np.subtract(resize_map(np.asarray(amap, dtype=np.float32), h, w), vmin)
    m /= max(vmax - vmin, 1e-12)
    if alpha == 0.5:
        # The float blend below, exactly: 0.5·a + 0.5·b is exact in float32 for bytes and the
        # cast truncates, so it equals (a + b) >> 1 — in integers, without float copies.
        out = np.asarray(rgb, dtype=np.uint16)
        out += jet(m)
        out >>= 1
    else:
        # (1 − alpha)·rgb + alpha·jet(m), the float32 operations done in place.
        out = np.asarray(rgb, dtype=np.float32)
        out *= 1 - alpha
        heat = jet(m).astype(np.float32)
        heat *= alpha
        out += heat
    if mask is not None:
        fg = np.asarray(mask) > 0
        if fg.shape != (h, w):
            fg = (
                np.asarray(
                    Image.fromarray(fg.astype(np.uint8) * 255).resize(
                        (w, h), Image.Resampling.NEAREST
                    )
                )
                > 0
            )
        edge = fg & ~ndimage.binary_erosion(fg, iterations=max(1, min(h, w) // 256))
        out[edge] = (0, 255, 0)
    if out.dtype != np.uint16:  # the integer blend cannot leave [0, 255]
        np.clip(out, 0, 255, out=out)
    return Image.fromarray(out.astype(np.uint8))


# zlib's run-length strategy ("designed to be almost as fast as Huffman-only, but give better
# compression for PNG image data", zlib.h), passed by Pillow's PNG writer as compress_type.
_Z_RLE = 3


def _atomic_save(image: Image.Image, path: str | os.PathLike, **options) -> None:
    """Save to a temp file beside ``path``, then rename over it (no half-written image ever
    carries the final name; the temp file is removed if saving fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, **options)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_png(image: Image.Image, path: str | os.PathLike, fast: bool = True) -> None:
    """Atomic PNG write. ``fast``: zlib level 1 with the run-length strategy, 5-7× faster than
    Pillow's default (level 6) on photo overlays, files no larger (measured:
    benchmarks/RESULTS.md); otherwise Pillow's defaults."""
    options = {"compress_level": 1, "compress_type": _Z_RLE} if fast else {}
    _atomic_save(image, path, format="PNG", **options)


def save_jpeg(image: Image.Image, path: str | os.PathLike, quality: int = 90) -> None:
    """Atomic JPEG write."""
    _atomic_save(image, path, format="JPEG", quality=quality)


OVERLAY_FORMATS = {"png": save_png, "jpg": save_jpeg}


def write_overlay(
    path: str | os.PathLike,
    image: Image.Image | str | os.PathLike,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
) -> None:
    """:func:`overlay` of ``image`` (or the image file it names, decoded here) saved as PNG,
    or as JPEG (quality 90) for a ``.jpg`` path: one job for a writer thread."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in OVERLAY_FORMATS:
        raise ValueError(f"overlay path must end in .png or .jpg, got {path}")
    OVERLAY_FORMATS[suffix](overlay(image, amap, mask), path)
