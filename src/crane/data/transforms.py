"""Model-input preprocessing (SPEC §2), as plain functions shared by datasets and predict code.

Image: PIL resize to S x S bicubic (no crop) -> RGB -> [0, 1] -> CLIP mean/std.
Mask: binarise (> 0) -> 0/255 L image -> PIL resize bilinear -> threshold 0.5.

Both reproduce the reference torchvision pipelines bit for bit (``Resize((S, S),
BICUBIC)``, ``CenterCrop(S)`` (a no-op after the resize), RGB conversion, ``ToTensor``,
``Normalize``; for masks ``Resize((S, S))``, ``CenterCrop``, ``ToTensor``, ``> 0.5``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from crane.constants import (
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from crane.data.imageio import PathLike, binarize_mask, normalize_mode, open_image


def _resized_rgb(image: Image.Image, size: int) -> Image.Image:
    resized = normalize_mode(image).resize((size, size), Image.Resampling.BICUBIC)
    return resized if resized.mode == "RGB" else resized.convert("RGB")


def image_to_tensor(
    image: Image.Image,
    size: int = DEFAULT_IMAGE_SIZE,
    mean: Sequence[float] | None = OPENAI_CLIP_MEAN,
    std: Sequence[float] | None = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """Preprocess a PIL image into a float32 (3, size, size) tensor.

    Resizes *before* converting to RGB, as the reference does (this matters for palette
    images, which PIL always resizes with nearest neighbour, and for alpha images, which
    it resizes premultiplied). Any PIL mode is accepted (16-bit greyscale is scaled, CMYK
    converted; see :func:`crane.data.imageio.normalize_mode`). Pass ``mean=None, std=None``
    to get the [0, 1] pixels.
    """
    rgb = _resized_rgb(image, size)
    # The same float32 operations in the same order as torchvision's ToTensor + Normalize
    # (exact IEEE division/subtraction), so the result is bitwise identical. Done in numpy
    # because torch's intra-op thread pool makes these small ops slow in the main process.
    pixels = np.asarray(rgb, dtype=np.float32) / np.float32(255)
    if mean is not None and std is not None:
        pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def image_to_uint8(
    image: Image.Image, size: int = DEFAULT_IMAGE_SIZE, fast: bool = False
) -> torch.Tensor:
    """The resized RGB pixels as a uint8 (3, size, size) tensor: a quarter of the bytes of
    :func:`image_to_tensor` to move between processes and to the GPU. Finish with
    :func:`normalize_uint8` (on any device) for the identical float tensor.

    ``fast``: shrink RGB and greyscale images with torch's vectorised uint8 antialiased
    bicubic kernel instead of PIL's (about 4x faster for a 1024-px image on one core; the
    same filter, so pixels differ from PIL's by at most a level or two, in well under 1 %
    of values). Other modes, and images smaller than ``size`` on either side, take the
    reference path."""
    if fast:
        pixels = _shrunk_uint8(normalize_mode(image), size)
        if pixels is not None:
            return pixels
    rgb = np.asarray(_resized_rgb(image, size), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def _shrunk_uint8(image: Image.Image, size: int) -> torch.Tensor | None:
    """(3, size, size) uint8 by torch's antialiased bicubic resize, or None where PIL's
    semantics differ (palette/alpha/bilevel modes) or it would enlarge."""
    if image.mode not in ("RGB", "L") or min(image.size) < size:
        return None
    hwc = torch.from_numpy(np.array(image))  # a writable copy (PIL's buffer is read-only)
    if hwc.ndim == 2:
        hwc = hwc[..., None]
    # (1, C, H, W) with channels-last strides: the layout torch's AVX2 uint8 kernel takes
    # (torch >= 2.1, pytorch/pytorch#103252, written to match PIL's antialiased bicubic).
    out = F.interpolate(
        hwc.permute(2, 0, 1)[None], size=(size, size), mode="bicubic", antialias=True
    )[0]
    return out.expand(3, -1, -1).contiguous() if out.shape[0] == 1 else out.contiguous()


def normalize_uint8(
    pixels: torch.Tensor,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """uint8 (..., 3, H, W) → float32 ``(x / 255 − mean) / std``, the same IEEE operations in the
    same order as :func:`image_to_tensor`, hence bitwise equal to it on CPU and CUDA."""
    div, m, s = _norm_constants(pixels.device, tuple(mean), tuple(std))
    # A tensor divisor: CUDA turns division by a Python scalar into multiplication by its
    # reciprocal, which is not bitwise the IEEE division numpy does.
    return (pixels.to(torch.float32) / div - m) / s


@functools.lru_cache(maxsize=16)
def _norm_constants(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Made once per device: a fresh host-to-device copy per batch would make the host wait
    # for the GPU's queued work (a blocking copy) and stall the predict pipeline.
    def put(values):
        return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).to(device)

    return torch.tensor(255.0).to(device), put(mean), put(std)


def mask_to_tensor(
    mask: np.ndarray | Image.Image,
    size: int = DEFAULT_IMAGE_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Binarise and resize a mask into a (1, size, size) tensor of 0/1 (float32 by default;
    ``dtype=torch.bool`` for a compact one).

    ``mask`` is a PIL mask image or an (H, W) array (non-zero = anomalous).
    """
    fg = binarize_mask(mask) if isinstance(mask, Image.Image) else np.asarray(mask) > 0
    if fg.ndim != 2:
        raise ValueError(f"mask array must be 2-D (H, W), got shape {fg.shape}")
    grey = Image.fromarray(np.where(fg, 255, 0).astype(np.uint8))
    resized = np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR))
    # ToTensor gives v / 255 and the reference keeps v / 255 > 0.5, i.e. v >= 128.
    return torch.from_numpy(resized[None] > 127).to(dtype)


def empty_mask(size: int = DEFAULT_IMAGE_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An all-normal (1, size, size) mask."""
    return torch.zeros((1, size, size), dtype=dtype)


def read_image_tensor(
    path: PathLike,
    size: int = DEFAULT_IMAGE_SIZE,
    mean: Sequence[float] | None = OPENAI_CLIP_MEAN,
    std: Sequence[float] | None = OPENAI_CLIP_STD,
    draft: int | None = None,
    as_uint8: bool = False,
    fast_resize: bool = False,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode and preprocess one image file.

    Returns the (3, size, size) tensor (float32 normalised, or the uint8 pixels with
    ``as_uint8``; see :func:`image_to_uint8`, which ``fast_resize`` is passed to as ``fast``)
    and the original ``(height, width)``. Raises :class:`~crane.errors.ImageReadError` naming
    the file if it cannot be decoded.
    """
    if fast_resize and not as_uint8:
        raise ValueError("fast_resize applies to the uint8 pixels (as_uint8=True)")
    image = open_image(path, draft)
    width, height = image.size
    if draft:  # report the file's true size, not the reduced decode
        with Image.open(path) as header:
            width, height = header.size
    if as_uint8:
        return image_to_uint8(image, size, fast=fast_resize), (height, width)
    return image_to_tensor(image, size, mean, std), (height, width)


def renormalize(
    images: torch.Tensor,
    from_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    from_std: Sequence[float] = OPENAI_CLIP_STD,
    to_mean: Sequence[float] | None = None,
    to_std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Re-normalise (..., 3, H, W) images, e.g. CLIP -> ImageNet stats for DINOv2 (SPEC §2)."""
    to_mean = IMAGENET_MEAN if to_mean is None else to_mean
    to_std = IMAGENET_STD if to_std is None else to_std

    def stat(values: Sequence[float]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=images.dtype, device=images.device).view(-1, 1, 1)

    pixels = images * stat(from_std) + stat(from_mean)
    return (pixels - stat(to_mean)) / stat(to_std)
