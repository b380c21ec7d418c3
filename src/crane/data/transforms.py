"""Model-input preprocessing (SPEC §2), as plain functions shared by datasets and predict code.

Image: PIL resize to S x S bicubic (no crop) -> RGB -> [0, 1] -> CLIP mean/std.
Mask: binarise (> 0) -> 0/255 L image -> PIL resize bilinear -> threshold 0.5.

Both reproduce the reference torchvision pipelines bit for bit (``Resize((S, S),
BICUBIC)``, ``CenterCrop(S)`` (a no-op after the resize), RGB conversion, ``ToTensor``,
``Normalize``; for masks ``Resize((S, S))``, ``CenterCrop``, ``ToTensor``, ``> 0.5``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

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
from crane.data import jpeg_decoders
from crane.data.handover import HandoverPool, SharedMemoryFull, shared_uint8
from crane.data.imageio import (
    PathLike,
    binarize_mask,
    normalize_mode,
    open_image,
    read_jpeg,
    reference_mode,
)
from crane.data.pil_resample import pil_resize_uint8

log = logging.getLogger(__name__)


def _resized_rgb(image: Image.Image, size: int) -> Image.Image:
    resized = reference_mode(image).resize((size, size), Image.Resampling.BICUBIC)
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
    it resizes premultiplied). Any PIL mode is accepted (16-bit greyscale is scaled; CMYK
    resized, then converted, as the reference does; see
    :func:`crane.data.imageio.reference_mode`). Pass ``mean=None, std=None`` to get the
    [0, 1] pixels.
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
    # It runs PIL's two passes horizontal first; where this Pillow starts with the vertical
    # one (see resize_uint8), the vertical pass runs as a call of its own first.
    x = hwc.permute(2, 0, 1)[None]
    height, width = x.shape[-2:]
    if _pil_vertical_first() and height - size > 2 * (width - size):
        x = F.interpolate(x, size=(size, width), mode="bicubic", antialias=True)
    out = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0]
    return out.expand(3, -1, -1).contiguous() if out.shape[0] == 1 else out.contiguous()


def resize_uint8(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(..., C, H, W) uint8 → (..., C, size, size) uint8, bitwise PIL's bicubic resize of
    each image, on the tensor's device.

    PIL's bicubic ``resize`` (antialiased when shrinking) runs two passes of fixed-point sums,
    rounding to 8 bits after each and skipping a pass whose side does not change: horizontal
    then vertical, or in recent Pillow (13 does) vertical first when the height shrinks by
    more than twice as many pixels as the width (:func:`_pil_vertical_first`). On a GPU this
    is :func:`crane.data.pil_resample.pil_resize_uint8` (the same integer arithmetic, exact
    in float64 products); on the CPU PIL itself runs, image by image (6x faster there than
    those products). For GPU-decoded images (:func:`decode_jpegs`), where PIL cannot run."""
    return (
        _pil_resize_cpu(pixels, size)
        if pixels.device.type == "cpu"
        else _pil_resize_tensor(pixels, size)
    )


def _pil_resize_tensor(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`resize_uint8` as tensor code on any device (the GPU path; tests run it on the CPU)."""
    height, width = pixels.shape[-2:]
    vertical_first = (
        _pil_vertical_first() and 0 < height - size and 2 * (width - size) < height - size
    )
    return pil_resize_uint8(pixels, size, size, vertical_first)


def _pil_resize_cpu(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's bicubic resize of each (C, H, W) uint8 image (RGB as one image, other channel
    counts channel by channel, as PIL resizes each band alone)."""
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    out = torch.empty((*flat.shape[:2], size, size), dtype=torch.uint8)
    for image, dest in zip(flat, out, strict=True):
        hwc = image.permute(1, 2, 0).numpy()
        channels = [hwc[..., c] for c in range(hwc.shape[-1])] if hwc.shape[-1] != 3 else [hwc]
        resized = [
            np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((size, size), _BICUBIC))
            for c in channels
        ]
        stacked = resized[0] if len(resized) == 1 else np.stack(resized, axis=-1)
        dest.numpy()[...] = stacked.reshape(size, size, -1).transpose(2, 0, 1)
    return out.view(*pixels.shape[:-2], size, size)


@functools.lru_cache(maxsize=1)
def _pil_vertical_first() -> bool:
    """Whether this Pillow resizes with the vertical pass first when the height shrinks by
    more than twice as many pixels as the width (Pillow 13's ``ImagingResampleInner``; older
    versions always start with the horizontal pass). Found by asking PIL, so the answer
    follows the installed version."""
    noise = np.random.default_rng(0).integers(0, 256, (30, 12), dtype=np.uint8)
    im = Image.fromarray(noise)
    bicubic = Image.Resampling.BICUBIC
    direct = np.asarray(im.resize((8, 8), bicubic))
    vertical_first = np.asarray(im.resize((12, 8), bicubic).resize((8, 8), bicubic))
    return bool(np.array_equal(direct, vertical_first))


def unresized_pixels(
    image: Image.Image, size: int, pool: HandoverPool | None = None
) -> torch.Tensor | Any | None:
    """An RGB or greyscale image larger than ``size``² as its (H, W, C) uint8 pixels (in shared
    memory in a worker, :func:`shared_uint8`), for :func:`resize_each` to resize on a GPU
    exactly as :func:`image_to_uint8` would on the host; None for other images (resize those
    on the host: small ones cost little, other modes resize differently).

    ``pool`` (made in the main process before the workers start): in a worker, the pixels go
    into one of the worker's reusable buffers, and what is returned is a hand-over object that
    arrives in the main process as the tensor (:class:`~crane.data.handover.HandoverPool`)."""
    if image.mode not in ("RGB", "L") or image.width * image.height <= size * size:
        return None
    arr = np.asarray(image).reshape(image.height, image.width, -1)
    try:
        if pool is None:
            out, where = shared_uint8(arr.size).view(arr.shape), None
        else:
            out, where = pool.empty(arr.shape)
    except SharedMemoryFull as exc:  # (resized here instead: a fraction of the bytes)
        if not _SAID.get("shm"):
            _SAID["shm"] = True
            log.warning("%s; resizing such images in the decode workers meanwhile", exc)
        return None
    np.copyto(out.numpy(), arr)
    return out if where is None else pool.wrap(out, where)


def read_jpeg_tensor(path: PathLike) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """:func:`~crane.data.imageio.read_jpeg` with the bytes as the 1-D uint8 tensor that
    :func:`decode_jpegs` takes (it keeps the buffer alive), or None."""
    got = read_jpeg(path)
    if got is None:
        return None
    return torch.frombuffer(bytearray(got[0]), dtype=torch.uint8), got[1]


def decode_jpegs(
    data: Sequence[torch.Tensor], size: int, device: torch.device | str
) -> list[torch.Tensor | RuntimeError]:
    """Decode JPEG files' bytes (1-D uint8 CPU tensors, from :func:`read_jpeg_tensor`) on
    ``device`` and resize them as the reference does
    (:func:`resize_uint8`): (3, size, size) uint8 tensors on ``device``, or for a stream the
    decoder rejects the error it raised (a bad stream fails the batch call, so the batch is
    then decoded one image at a time; so is a batch that runs out of device memory, and an
    image that does not fit alone gets its error, which the callers answer by decoding it on
    the host).

    The decoder is torchvision's or TorchCodec's (:mod:`crane.data.jpeg_decoders`, which says
    which one runs): on CUDA nvJPEG (baseline JPEGs on the GPU's hardware JPEG engines where
    it has them; others in software), so the CPUs only read files; on the CPU libjpeg-turbo,
    bitwise PIL's decode. Both give the stored pixels: EXIF orientation is not applied
    (TorchCodec is given the bytes without their EXIF segments). nvJPEG's inverse DCT and
    chroma upsampling may round differently from libjpeg-turbo's."""
    device = torch.device(device)
    name = jpeg_decoders.jpeg_decoder()
    batched = jpeg_decoders.batched(name)
    # TorchCodec would rotate or mirror an image by its EXIF orientation: it gets the bytes
    # without their EXIF segments (an image whose segments cannot be removed gets an error).
    given = [jpeg_decoders.without_exif(d) for d in data] if name == "torchcodec" else data
    todo = [i for i, d in enumerate(given) if not isinstance(d, RuntimeError)]

    def run(batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return jpeg_decoders.decode(name, batch, device, batched)

    images: list[torch.Tensor | RuntimeError] = list(given)
    decoded: list[torch.Tensor | RuntimeError] | None = None
    with _decoding_stream(device) as done:
        try:
            decoded = run([given[i] for i in todo]) if todo else []
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError among them
            short = device.type == "cuda" and _out_of_memory(exc)
        if decoded is None:
            if short:  # (the failed call's partial outputs are gone with its traceback)
                torch.cuda.empty_cache()  # nvJPEG's own buffers need what torch's cache holds
            decoded = []
            for i in todo:
                try:
                    decoded.append(run([given[i]])[0])
                except RuntimeError as exc:
                    decoded.append(exc)
    for i, im in zip(todo, decoded, strict=True):
        images[i] = im
    ok = [i for i, im in enumerate(images) if not isinstance(im, RuntimeError)]
    done([images[i] for i in ok])
    for i, pixels in zip(ok, resize_each([images[i] for i in ok], size), strict=True):
        images[i] = pixels
    return images


def _out_of_memory(exc: RuntimeError) -> bool:
    """A device allocation failure: CUDA's ``OutOfMemoryError``, or a decoder's RuntimeError
    saying so (TorchCodec's allocations go through torch's stable ABI)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


@contextlib.contextmanager
def _decoding_stream(device: torch.device):
    """On CUDA: run the nvJPEG decode with a side stream current on ``device``, then hand its
    outputs to the stream that was current (``done(outputs)``).

    torchvision allocates the decoded images on the current stream, then writes them on its
    own decoder stream, which never waits for the current one (TorchCodec allocates and
    decodes on the current stream: the side stream here, which ``done`` makes the main one
    wait for). On the main stream, a block the caching allocator hands out may still be read
    by queued kernels (the previous batch's forward, whose activations Python has already
    freed): the decoder could overwrite them first. Allocated on a side stream that only
    decodes, the images take blocks no queued kernel reads; ``record_stream`` keeps each one
    from being reused there until the main stream's work on it is done. Elsewhere: nothing
    to do."""
    if device.type != "cuda":
        yield lambda outputs: None
        return
    with torch.cuda.device(device):
        main = torch.cuda.current_stream(device)
        side = _DECODE_STREAMS.get(device)
        if side is None:
            side = _DECODE_STREAMS[device] = torch.cuda.Stream(device)

        def done(outputs: Sequence[torch.Tensor]) -> None:
            main.wait_stream(side)  # torchvision made ``side`` wait for its decoder
            for t in outputs:
                t.record_stream(main)

        with torch.cuda.stream(side):
            yield done


def resize_each(images: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Each (C, H, W) uint8 image (C = 1 or 3, any sizes, all on one device) resized as PIL
    does (:func:`resize_uint8`) to (3, size, size); one channel is repeated, as PIL converts
    a resized L image to RGB. Images of one size are resized together, a few at a time (the
    float64 windows of a 2048-px photo's first pass take about 120 MB)."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    for shape, members in groups.items():
        step = max(1, _RESIZE_BYTES // (8 * math.prod(shape)))
        for start in range(0, len(members), step):
            part = members[start : start + step]
            resized = None
            try:
                resized = resize_uint8(torch.stack([images[i] for i in part]), size)
            except torch.cuda.OutOfMemoryError:
                pass
            if resized is None:  # (not in the handler: its traceback holds the products)
                resized = _resized_on_the_host([images[i] for i in part], size)
            for i, pixels in zip(part, resized, strict=True):
                out[i] = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels
    return out


def _resized_on_the_host(images: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Out of GPU memory resizing: the same exact products on the CPU, one image at a time
    (the same pixels; a large photo costs seconds there instead of failing the batch)."""
    log.warning(
        "out of GPU memory resizing %d image(s) of %s px there: resized on the CPU instead "
        "(the same pixels)",
        len(images),
        "x".join(map(str, images[0].shape[-2:])),
    )
    device = images[0].device
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [resize_uint8(im.cpu()[None], size)[0].to(device) for im in images]


_SAID: dict[str, bool] = {}  # (warnings said once per process)
_RESIZE_BYTES = 256 << 20  # float64 bytes of the images resized in one group
_BICUBIC = Image.Resampling.BICUBIC


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
