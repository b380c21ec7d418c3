"""Heatmap overlays: anomaly map in a jet palette over the image, ground-truth contour on top."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def jet(values: np.ndarray) -> np.ndarray:
    """Matplotlib-style 'jet' colours (uint8 RGB) for values in [0, 1]."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


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
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[:2]
    m = resize_map(np.asarray(amap, dtype=np.float32), h, w)
    m = (m - vmin) / max(vmax - vmin, 1e-12)
    out = (1 - alpha) * rgb + alpha * jet(m).astype(np.float32)
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
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Atomic PNG write (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
