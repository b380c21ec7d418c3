"""Heatmap overlays: anomaly map in a jet palette over the image, ground-truth contour on top."""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from crane.data.imageio import load_image, normalize_mode
from crane.files import atomic_write_bytes

log = logging.getLogger(__name__)


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


def _plane(x: object, name: str, colour: bool) -> np.ndarray:
    """``x`` (array or tensor) as an (H, W) array, or (H, W, C) for a ``colour`` mask; a
    leading axis of 1 — crane's (1, H, W) masks and (B=1, H, W) maps — is dropped."""
    if hasattr(x, "detach"):  # (a torch tensor, possibly on a GPU)
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    a = np.asarray(x)
    while a.ndim > 2 and a.shape[0] == 1 and not (colour and a.ndim == 3 and a.shape[-1] in (3, 4)):
        a = a[0]
    if a.ndim == 2 or (colour and a.ndim == 3 and a.shape[-1] in (1, 3, 4)):
        return a
    raise ValueError(
        f"{name} must be (H, W){', (H, W, C)' if colour else ''} or (1, H, W), got shape {a.shape}"
    )


def overlay(
    image: Image.Image,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Image.Image:
    """RGB overlay at the image's own size. ``amap`` is any size (resized bilinearly; NaN
    drawn as 0; (H, W) or (1, H, W)); ``mask`` ((H, W) or (1, H, W), or (H, W, C) with any
    channel non-zero; non-zero = anomalous; resized if need be) is drawn as a green
    contour. Arrays or tensors. 16-bit and float images are scaled as
    :func:`~crane.data.imageio.normalize_mode` does, not clipped at 255."""
    if not vmax > vmin:
        raise ValueError(f"vmax must be above vmin, got vmin={vmin}, vmax={vmax}")
    if image.mode != "RGB":
        image = normalize_mode(image)
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # read only: no copy needed
    h, w = rgb.height, rgb.width
    m = np.nan_to_num(_plane(amap, "amap", colour=False).astype(np.float32), nan=0.0)
    m = np.subtract(resize_map(m, h, w), vmin)
    m /= vmax - vmin
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
        fg = _plane(mask, "mask", colour=True) > 0
        if fg.ndim == 3:  # (a colour or RGBA mask)
            fg = fg.any(axis=-1)
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
# compression for PNG image data", zlib.h).
_Z_RLE = zlib.Z_RLE
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FAST_MODES = ("L", "RGB", "RGBA")  # what png_bytes writes
_IDAT_MAX = 1 << 24  # bytes per IDAT chunk (the format allows up to 2**31 - 1)


def _atomic_save(image: Image.Image, path: str | os.PathLike, **options) -> None:
    """Atomic ``image.save(path, **options)``, flushed to disk before the rename (a resumed
    run takes a file that carries its final name for complete)."""
    buf = io.BytesIO()
    image.save(buf, **options)
    atomic_write_bytes(path, buf.getvalue())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bytes(pixels: np.ndarray, level: int = 1) -> bytes:
    """A PNG file's bytes for 8-bit pixels, (H, W) grey or (H, W, 3 | 4) RGB(A): every row
    with the Up filter (its difference from the row above), deflated by zlib at ``level``
    with the run-length strategy. Lossless; any PNG reader decodes it.

    Written here rather than through Pillow because Pillow's PNG encoder filters the rows its
    own way, and none of its PNG options (optimize, compress_level, compress_type, dictionary)
    picks the filter: on a 2048-px overlay that filtering cost more than the level-1 deflate
    itself (on the 2-core dev box Pillow took ≈ 390 ms at level 1 and still 260 ms with
    compression off; this takes ≈ 170-200 ms and makes a file ≈ 6 % larger;
    ``benchmarks/outputs.py``)."""
    a = np.asarray(pixels)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"png_bytes takes (H, W[, 3|4]) uint8 pixels, got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    if not h or not w:
        raise ValueError(f"a PNG has at least one pixel, got a {h}×{w} image")
    channels = 1 if a.ndim == 2 else a.shape[2]
    color = {1: 0, 3: 2, 4: 6}[channels]
    rows = a.reshape(h, w * channels)
    filtered = np.empty((h, w * channels + 1), np.uint8)
    filtered[:, 0] = 2  # filter type Up
    filtered[:1, 1:] = rows[:1]  # the first row's "above" is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG defines it
    deflate = zlib.compressobj(level, zlib.DEFLATED, 15, 9, _Z_RLE)
    data = deflate.compress(filtered) + deflate.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    idat = [_png_chunk(b"IDAT", data[i : i + _IDAT_MAX]) for i in range(0, len(data), _IDAT_MAX)]
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header), *idat, _png_chunk(b"IEND", b"")))


def save_png(image: Image.Image, path: str | os.PathLike, fast: bool = True) -> None:
    """Atomic PNG write. ``fast``: 8-bit grey, RGB and RGBA images through :func:`png_bytes`
    (Up filter, zlib level 1, run-length strategy: on photo overlays the encoding ≈ 2× faster
    than Pillow's at level 1, a whole overlay 1.5-1.6×); other modes through Pillow at level 1
    with the run-length strategy. Otherwise Pillow's defaults."""
    if fast and image.mode in _PNG_FAST_MODES:
        atomic_write_bytes(path, png_bytes(np.asarray(image)))
        return
    options = {"compress_level": 1, "compress_type": _Z_RLE} if fast else {}
    _atomic_save(image, path, format="PNG", **options)


#: The most pixels a side that a JPEG file holds (its header allows 65535; libjpeg less).
JPEG_MAX_SIDE = 65500


def save_jpeg(image: Image.Image, path: str | os.PathLike, quality: int = 90) -> None:
    """Atomic JPEG write. An image with a side over :data:`JPEG_MAX_SIDE` (a line-scan
    camera's, say) is scaled down to fit, with a warning: the format holds no larger one."""
    w, h = image.size
    if max(w, h) > JPEG_MAX_SIDE:
        scale = JPEG_MAX_SIDE / max(w, h)
        size = (
            max(1, min(JPEG_MAX_SIDE, round(w * scale))),
            max(1, min(JPEG_MAX_SIDE, round(h * scale))),
        )
        log.warning(
            "%s: a JPEG holds at most %d px a side; this %d×%d overlay is written at %d×%d "
            "(PNG overlays keep the full size)",
            path,
            JPEG_MAX_SIDE,
            w,
            h,
            *size,
        )
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
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
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in OVERLAY_FORMATS:
        raise ValueError(f"overlay path must end in .png or .jpg, got {path}")
    source = None if isinstance(image, Image.Image) else image
    if source is not None:
        image = load_image(source)
    try:
        OVERLAY_FORMATS[suffix](overlay(image, amap, mask), path)
    except OSError as exc:  # (a full disk, a file system's limits: name the overlay)
        of = f" of {source}" if source is not None else ""
        why = exc.strerror or str(exc)
        raise OSError(f"cannot write the overlay{of} to {path}: {why}") from exc
