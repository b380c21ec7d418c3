"""Decoding image and mask files robustly (no torch here, so the CLI stays light).

The reference pipeline resizes the *decoded* PIL image and only then converts it to RGB
(open_clip's ``image_transform``: Resize -> CenterCrop -> convert("RGB") -> ToTensor).
For palette (P) and alpha (RGBA/LA) images the order changes the pixels, so
:func:`open_image` keeps those modes as decoded and leaves the conversion to
:func:`crane.data.transforms.image_to_tensor`. Modes the reference would mangle are
normalised here instead: 16-bit greyscale is scaled to 8 bits (``convert("RGB")``
would clip it to white), 32-bit integer greyscale (a 32-bit TIFF) by the range its values
show (0..255: as the reference reads it; up to 65535: as 16-bit data; beyond: refused),
float greyscale by its range ([0, 1] scaled by 255), and YCbCr/LAB/HSV are converted to RGB.
Images the reference reads correctly in their own mode — CMYK, 32-bit integer greyscale
holding 0..255, float greyscale on the 0..255 scale — are resized in that mode and converted
after, as the reference does (:func:`reference_mode`), so their pixels are its bit for bit.

EXIF orientation is deliberately *not* applied: masks are drawn on the stored pixel
grid and the reference never transposes either.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from crane.errors import DatasetError, ImageReadError

log = logging.getLogger(__name__)

#: File extensions treated as images when scanning dataset folders (compared lower-case):
#: the still-image formats PIL decodes that inspection and medical data come in (a GIF's
#: first frame).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".webp"}
    | {".pbm", ".pgm", ".ppm", ".pnm", ".gif"}
)

# Modes the reference pipeline resizes natively; kept as decoded (see module docstring).
_NATIVE_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "LA"})
_INT_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# File formats whose mode-I images hold 16-bit data (see _grey_to_uint8)
_AT_MOST_16_BITS = frozenset({"PNG", "PPM"})

PathLike = str | os.PathLike[str]


def is_image_file(path: PathLike) -> bool:
    """True for a non-hidden file name with one of :data:`IMAGE_EXTENSIONS`."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def warn_broken_links(
    paths: Iterable[Path], where: str = "", name: Callable[[Path], str] = str
) -> None:
    """Warn about the links among ``paths`` that point to no file, which a listing of image
    files leaves out (a dataset of links into an unmounted disk, say): named, not dropped
    silently. ``where`` prefixes the message; ``name`` says how each link is named in it."""
    broken = sorted(name(p) for p in paths if p.is_symlink() and not p.exists())
    if broken:
        log.warning(
            "%s%d image link(s) point to no file and are left out: %s",
            where,
            len(broken),
            ", ".join(broken[:5]) + (", ..." if len(broken) > 5 else ""),
        )


def _decode(path: PathLike, what: str, draft: int | None = None) -> Image.Image:
    """Open and fully decode ``path`` (first frame), turning every failure into ImageReadError.

    ``draft``: for JPEGs, let libjpeg decode at a reduced DCT scale (1/2, 1/4, 1/8) that is
    still at least ``draft`` pixels on each side — several times faster for large photos.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if draft and im.format == "JPEG":
                im.draft(im.mode, (draft, draft))
            # load() forces the decoder to run now, so truncated/corrupt data fails here and
            # not later inside a DataLoader worker with an unrelated traceback.
            im.load()
            return im
    except FileNotFoundError as exc:
        raise ImageReadError(f"{what} file not found: {path}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        reason = str(exc) or type(exc).__name__
        raise ImageReadError(f"cannot read {what} {path}: {reason}") from exc


def _float_scale(hi: float, what: str) -> float:
    """255 for float pixels in [0, 1], 1 for [0, 255]: by the largest value ``hi``. Values
    just above 1 (up to 2) are refused: an overshoot of a [0, 1] image read as 0..255 would be
    nearly black, and a [0, 255] image that dark is implausible."""
    if 1.0 < hi < 2.0:
        raise ImageReadError(
            f"{what} reaches {hi:g}, just above 1: neither [0, 1] pixels (an overshoot? clip "
            "them to [0, 1]) nor [0, 255] ones (it would be nearly black)"
        )
    return 255.0 if hi <= 1.0 else 1.0


def _grey_to_uint8(im: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float greyscale image to an 8-bit L image.

    16-bit data map their full range onto 8 bits, whatever the image holds: the ``I;16*``
    modes (16-bit PNG and TIFF files) and mode ``I`` from the formats that store at most 16
    bits (PNG, which older Pillows open as ``I``, and 16-bit PGM/PPM). Otherwise mode ``I`` is
    a 32-bit container (a 32-bit TIFF, an image made in memory) whose range nothing states:
    8-bit data (0..255) are kept as they are, as the reference's conversion reads them; 16-bit
    data (up to 65535) are scaled as 16-bit files are; negative values or values beyond 16
    bits raise :class:`~crane.errors.ImageReadError` (the reference would clip them)."""
    arr = np.asarray(im)
    if im.mode == "I" and arr.size and getattr(im, "format", None) not in _AT_MOST_16_BITS:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ImageReadError(
                f"a 32-bit integer greyscale image with values {lo}..{hi}: crane reads such "
                "images when they hold 8-bit (0..255) or 16-bit (0..65535) data; convert it to "
                "8 or 16 bits"
            )
        if hi <= 255:
            return Image.fromarray(arr.astype(np.uint8))
    if im.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        # Float images carry no range; [0, 1] is the common convention, else assume 8-bit.
        scale = _float_scale(float(arr.max()) if arr.size else 0.0, "a float image")
        out = np.rint(np.clip(arr * scale, 0, 255))
    else:
        # Full 16-bit range onto 8 bits (65535 / 255 = 257 exactly), like cv2/ImageMagick;
        # a fixed mapping keeps the result independent of image content.
        out = np.rint(np.clip(arr.astype(np.float64), 0, 65535) / 257.0)
    return Image.fromarray(out.astype(np.uint8))


def image_from_array(arr: np.ndarray) -> Image.Image:
    """An image given as pixels in memory, ``(H, W)`` or ``(H, W, C)`` with C = 1, 3 or 4
    (grey, RGB, RGBA), as an 8-bit PIL image; raises :class:`~crane.errors.ImageReadError`
    saying what is wrong with any other array.

    The value range follows the dtype, never the content, except for floats: uint8 as is;
    bool as 0/255 (2-D: a 1-bit image); uint16 as 16-bit data (÷257, as 16-bit image
    files); other integer types must hold 0..255; floats must be finite and lie in [0, 1]
    (scaled by 255, the convention of torchvision's ``ToTensor``) or, with any value of 2 or
    more, in [0, 255] (a largest value between 1 and 2 is refused: an overshoot, most likely).
    """
    arr = np.asarray(arr)
    shape = tuple(arr.shape)
    if arr.ndim == 3 and shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and shape[2] in (3, 4))):
        raise ImageReadError(
            f"an image array must be (H, W) or (H, W, C) with C = 1, 3 or 4, got shape {shape}"
            + (
                " (channels first? arrays are channels last; torch tensors channels first)"
                if arr.ndim == 3 and shape[0] in (1, 3, 4)
                else ""
            )
        )
    if 0 in shape:
        raise ImageReadError(f"an image array has no pixels: shape {shape}")
    kind = arr.dtype.kind
    if kind == "b" and arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr))  # mode "1", as a 1-bit image file
    if kind == "b":
        out = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint8:
        out = arr
    elif kind == "u" and arr.dtype.itemsize == 2:  # (either byte order)
        out = np.rint(arr / 257.0).astype(np.uint8)
    elif kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageReadError(
                f"an {arr.dtype} image array must hold values 0..255, got {lo}..{hi}: scale it "
                "to uint8 (or pass 16-bit data as uint16)"
            )
        out = arr.astype(np.uint8)
    elif kind == "f":
        if not np.isfinite(arr).all():
            raise ImageReadError("a float image array holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255:
            raise ImageReadError(
                f"a float image array must lie in [0, 1] or [0, 255], got {lo:g}..{hi:g}"
            )
        scaled = arr.astype(np.float64) * _float_scale(hi, "a float image array")
        out = np.rint(scaled).astype(np.uint8)
    else:
        raise ImageReadError(f"an image array of dtype {arr.dtype} is not an image")
    return Image.fromarray(np.ascontiguousarray(out))


def open_image(path: PathLike, draft: int | None = None) -> Image.Image:
    """Decode an image for the model pipeline (see the module docstring for the mode policy).

    Returns a loaded PIL image in one of the modes 1, L, P, RGB, RGBA, LA, or CMYK, I, F
    where :func:`reference_mode` keeps them. Raises :class:`~crane.errors.ImageReadError`
    naming the file if it is missing or cannot be decoded (corrupt, truncated, not an image).
    """
    im = _decode(path, "image", draft)
    try:
        return reference_mode(im)
    except ImageReadError as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from None


def reference_mode(im: Image.Image) -> Image.Image:
    """``im`` in the mode the model pipeline resizes it in: as it is where the reference's
    resize and then ``convert("RGB")`` read it correctly — the modes :func:`normalize_mode`
    keeps, CMYK, 32-bit integer greyscale holding 0..255, finite float greyscale whose largest
    value is 2 or more (the 0..255 scale: PIL's conversion clips and truncates it after the
    resize) — so the resize runs at that precision as the reference's does; anything else as
    :func:`normalize_mode` makes it (8-bit)."""
    if im.mode in _NATIVE_MODES or im.mode == "CMYK":
        return im
    if im.mode in ("I", "F") and getattr(im, "format", None) not in _AT_MOST_16_BITS:
        arr = np.asarray(im)
        if arr.size and np.isfinite(arr).all():
            lo, hi = arr.min(), arr.max()
            if (im.mode == "I" and lo >= 0 and hi <= 255) or (im.mode == "F" and hi >= 2):
                return im
    return normalize_mode(im)


def normalize_mode(im: Image.Image) -> Image.Image:
    """Bring an image into one of the modes the pipeline resizes natively (see module doc).

    1, L, P, RGB, RGBA and LA are returned unchanged; 16/32-bit and float greyscale are
    scaled to 8-bit L; PA becomes RGBA; anything else (CMYK, YCbCr, ...) becomes RGB.
    """
    if im.mode in _NATIVE_MODES:
        return im
    if im.mode in _INT_GREY_MODES or im.mode == "F":
        return _grey_to_uint8(im)
    if im.mode == "PA":
        return im.convert("RGBA")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def read_jpeg(path: PathLike) -> tuple[bytes, tuple[int, int]] | None:
    """The undecoded bytes and ``(height, width)`` of a JPEG file that a GPU decoder can take
    exactly as the reference reads it, or None for anything else (decode those with
    :func:`open_image`, which also reports unreadable files).

    Taken: JPEG files in RGB or greyscale (L) whose data ends with the end-of-image marker.
    Left to :func:`open_image`: other formats, CMYK/YCCK JPEGs (converted to RGB there), and
    JPEGs that do not end with the marker — truncated files, which PIL refuses, and files
    with trailing data — so a GPU decoder never sees data PIL would reject. Only the header
    is parsed here (no decoding)."""
    try:
        with Image.open(path) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            width, height = im.size
        data = Path(path).read_bytes()
    except MemoryError:
        raise
    except Exception:  # missing, unreadable or not an image: open_image says why
        return None
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    return data, (height, width)


def load_image(path: PathLike) -> Image.Image:
    """Decode an image as 8-bit RGB (for display and overlays).

    For model input use :func:`crane.data.transforms.read_image_tensor`, which resizes
    before converting to RGB exactly as the reference does.
    """
    im = normalize_mode(open_image(path))  # (8 bits as overlay() makes them: rounded)
    return im if im.mode == "RGB" else im.convert("RGB")


def binarize_mask(im: Image.Image) -> np.ndarray:
    """Boolean (H, W) foreground of a mask image: > 0 after conversion to greyscale, as the
    reference (``Image.open(p).convert("L")``, then > 0) computes it.

    Integer greyscale masks (8, 16, 32-bit) are thresholded directly (PIL's conversion only
    clips them); float, colour and palette masks through PIL's L conversion (so a float value
    below 1, which the conversion truncates to 0, or a near-black colour such as (1, 0, 0),
    which rounds to 0, is background, as in the reference); alpha channels are ignored (the
    conversion drops them).
    """
    mode = im.mode
    if mode in _INT_GREY_MODES or mode in ("1", "L"):
        return np.asarray(im) > 0
    if mode == "LA":
        return np.asarray(im)[..., 0] > 0
    return np.asarray(im.convert("L")) > 0


def open_mask(path: PathLike) -> np.ndarray:
    """Decode a mask file into a boolean (H, W) array (:func:`binarize_mask`); a mode PIL
    cannot convert (a LAB TIFF) is an :class:`~crane.errors.ImageReadError` naming the file,
    which ``on_error="skip"`` skips (a bare ValueError stopped the run)."""
    im = _decode(path, "mask")
    try:
        return binarize_mask(im)
    except (ValueError, OSError) as exc:
        raise ImageReadError(f"cannot read mask {path}: {exc}") from exc


def open_mask_of(mask: PathLike, image: PathLike, height: int, width: int) -> np.ndarray:
    """:func:`open_mask` for the image ``image`` of ``height`` × ``width`` pixels: a
    :class:`~crane.errors.DatasetError` if the sizes differ (resizing would silently
    misalign the ground truth)."""
    fg = open_mask(mask)
    if fg.shape != (height, width):
        raise DatasetError(
            f"mask {mask} is {fg.shape[1]}x{fg.shape[0]} but its image {image} is "
            f"{width}x{height} (width x height)"
        )
    return fg
