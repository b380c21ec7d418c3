"""Model-input preprocessing (SPEC §2), as plain functions shared by datasets and predict code.

Image: PIL resize to S x S bicubic (no crop) -> RGB -> [0, 1] -> CLIP mean/std.
Mask: binarise (> 0) -> 0/255 L image -> PIL resize bilinear -> threshold 0.5.

Both reproduce the reference torchvision pipelines bit for bit (``Resize((S, S),
BICUBIC)``, ``CenterCrop(S)`` (a no-op after the resize), RGB conversion, ``ToTensor``,
``Normalize``; for masks ``Resize((S, S))``, ``CenterCrop``, ``ToTensor``, ``> 0.5``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from crane.constants import (
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from crane.data.imageio import PathLike, binarize_mask, normalize_mode, open_image


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
    resized = normalize_mode(image).resize((size, size), Image.Resampling.BICUBIC)
    rgb = resized if resized.mode == "RGB" else resized.convert("RGB")
    # The same float32 operations in the same order as torchvision's ToTensor + Normalize
    # (exact IEEE division/subtraction), so the result is bitwise identical. Done in numpy
    # because torch's intra-op thread pool makes these small ops slow in the main process.
    pixels = np.asarray(rgb, dtype=np.float32) / np.float32(255)
    if mean is not None and std is not None:
        pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def mask_to_tensor(mask: np.ndarray | Image.Image, size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """Binarise and resize a mask into a float32 (1, size, size) tensor of 0/1.

    ``mask`` is a PIL mask image or an (H, W) array (non-zero = anomalous).
    """
    fg = binarize_mask(mask) if isinstance(mask, Image.Image) else np.asarray(mask) > 0
    if fg.ndim != 2:
        raise ValueError(f"mask array must be 2-D (H, W), got shape {fg.shape}")
    grey = Image.fromarray(np.where(fg, 255, 0).astype(np.uint8))
    resized = np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR))
    # ToTensor gives v / 255 and the reference keeps v / 255 > 0.5, i.e. v >= 128.
    return torch.from_numpy((resized > 127).astype(np.float32)[None])


def empty_mask(size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """An all-normal (1, size, size) mask."""
    return torch.from_numpy(np.zeros((1, size, size), dtype=np.float32))


def read_image_tensor(
    path: PathLike,
    size: int = DEFAULT_IMAGE_SIZE,
    mean: Sequence[float] | None = OPENAI_CLIP_MEAN,
    std: Sequence[float] | None = OPENAI_CLIP_STD,
    draft: int | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode and preprocess one image file.

    Returns the (3, size, size) tensor and the original ``(height, width)``. Raises
    :class:`~crane.errors.ImageReadError` naming the file if it cannot be decoded.
    """
    image = open_image(path, draft)
    if draft:  # report the file's true size, not the reduced decode
        with Image.open(path) as header:
            width, height = header.size
        return image_to_tensor(image, size, mean, std), (height, width)
    width, height = image.size
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
