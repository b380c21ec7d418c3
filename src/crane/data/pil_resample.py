"""PIL's bicubic resize of 8-bit images, bit for bit, as tensor code (any device).

Pillow resizes an 8-bit image in two separable passes (``libImaging/Resample.c``). Each
output value of a pass is ``clip8((2**21 + Σ_j p_j·k_j) >> 22)``: the input pixels ``p_j``
times integer coefficients ``k_j`` (the filter's weights, normalised to sum 1 in double
precision, then scaled by 2**22 and rounded half away from zero), summed in 32-bit integers.
Here the coefficients are computed with the same double-precision operations in the same
order (:func:`bicubic_coefficients`) and the sums run as float64 matrix products: every
product and partial sum is an integer below 2**53, so float64 holds each exactly and the
result does not depend on the order of summation — on any device, GPU GEMMs included.

Why by hand: torch's antialiased bicubic kernel uses the same filter but other arithmetic
(float, or 16-bit fixed point in its uint8 CPU kernel), which rounds about 1e-4 of a photo's
values one level away from PIL's. Evaluation reproduces the reference's PIL pipeline exactly,
so resizing on the GPU (JPEGs decoded there, or decoded on the host and shipped whole) must
give PIL's pixels to keep that promise. No library offers PIL's fixed-point resize on a GPU.

Coefficients are evaluated without fused multiply-adds, as Pillow's x86-64 builds compute
them; where a compiler contracts Pillow's filter into FMAs (some ARM builds) a coefficient
could differ in its last bit of 2**-52, which changes its rounded integer with a probability
of about 1e-9.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

_PRECISION_BITS = 32 - 8 - 2  # Pillow's PRECISION_BITS for 8-bit resampling
_HALF = float(1 << (_PRECISION_BITS - 1))
_ONE = float(1 << _PRECISION_BITS)
_BLOCK = 64  # outputs per block of a pass (one banded product per block)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bicubic_filter`` (a = -0.5), operation for operation."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for a bicubic resize of one
    axis from ``in_size`` to ``out_size`` over the whole image (box ``(0, in_size)``).

    Returns ``(start, count, k)``: output ``i`` reads inputs ``start[i] .. start[i] +
    count[i] - 1`` with the int64 coefficients ``k[i, :count[i]]`` (zero beyond)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) cast truncates toward zero; Pillow then clamps to the image.
    start = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    stop = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    count = stop - start
    weights = np.zeros((out_size, ksize), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for x in range(ksize):  # left to right, as Pillow sums the weights
        used = x < count
        w = np.where(
            used, _bicubic(((x + start).astype(np.float64) - center + 0.5) * inv_filterscale), 0.0
        )
        weights[:, x] = w
        total = np.where(used, total + w, total)
    weights = np.where(
        total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights
    )
    scaled = weights * _ONE
    k = np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return start, count, k


def _banded(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The pass as blocks of ``_BLOCK`` outputs, each reading one window of ``win`` inputs:
    ``(window starts (n_blocks,), coefficients (n_blocks, win, _BLOCK) float64, win)``."""
    start, count, k = bicubic_coefficients(in_size, out_size)
    n_blocks = -(-out_size // _BLOCK)
    first = [start[b * _BLOCK] for b in range(n_blocks)]
    ends = [int((start + count)[b * _BLOCK : (b + 1) * _BLOCK].max()) for b in range(n_blocks)]
    win = max(e - f for f, e in zip(first, ends, strict=True))
    starts = np.minimum(np.asarray(first, dtype=np.int64), in_size - win)
    mats = np.zeros((n_blocks, win, _BLOCK), dtype=np.float64)
    for i in range(out_size):
        b, o = divmod(i, _BLOCK)
        lo = start[i] - starts[b]
        mats[b, lo : lo + count[i], o] = k[i, : count[i]]
    return starts, mats, win


@functools.lru_cache(maxsize=64)
def _device_tables(
    in_size: int, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`_banded` on ``device``: the windows' input indices (flat), the coefficients.
    On CUDA copied from pinned memory without blocking: a pageable copy would make the host
    wait for the kernels queued before it (each new image size in a pipeline that already
    queued the next batch's forward)."""
    starts, mats, win = _banded(in_size, out_size)
    index = torch.from_numpy(starts[:, None] + np.arange(win)).reshape(-1)
    tables = (index, torch.from_numpy(mats))
    if device.type == "cuda":
        tables = tuple(t.pin_memory() for t in tables)
    index, coef = (t.to(device, non_blocking=True) for t in tables)
    return index, coef, win


#: Bytes of a pass's intermediates (gathered windows, their float64 copy, the sums) per
#: product: rows beyond it go in further products (rows are independent: the same pixels).
#: A 2048-px RGB photo's first pass fits in one (two photos, as ``resize_each`` groups them,
#: in two); a 10k-px one no longer needs gigabytes.
_PASS_BYTES = 256 << 20


def _pass_last_dim(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """One PIL pass along the last dimension of uint8 ``x``: uint8 result, bitwise PIL's."""
    in_size = x.shape[-1]
    index, mats, win = _device_tables(in_size, out_size, x.device)
    n_blocks = mats.shape[0]
    lead = x.shape[:-1]
    rows = x.reshape(-1, in_size)  # (R, in)
    per_row = n_blocks * (win * 9 + _BLOCK * 8)
    parts = -(-rows.shape[0] // max(1, _PASS_BYTES // per_row))  # (ceil: parts of even size)
    step = max(1, -(-rows.shape[0] // max(1, parts)))
    out = torch.empty(rows.shape[0], out_size, dtype=torch.uint8, device=x.device)
    for r0 in range(0, rows.shape[0], step):
        part = rows[r0 : r0 + step]
        # (n_blocks, r, win) @ (n_blocks, win, _BLOCK): one batched GEMM per part.
        windows = part.index_select(1, index).view(-1, n_blocks, win).transpose(0, 1)
        sums = torch.bmm(windows.to(torch.float64), mats)  # exact integers
        sums = sums.transpose(0, 1).reshape(-1, n_blocks * _BLOCK)[:, :out_size]
        # (2**21 + sum) >> 22 is floor((2**21 + sum) / 2**22): both exact in float64.
        out[r0 : r0 + step] = sums.add_(_HALF).div_(_ONE).floor_().clamp_(0, 255)
    return out.view(*lead, out_size)


def pil_resize_uint8(
    pixels: torch.Tensor, height: int, width: int, vertical_first: bool
) -> torch.Tensor:
    """(..., H, W) uint8 → (..., height, width) uint8, bitwise what Pillow's bicubic
    ``Image.resize((width, height))`` gives for each channel of an 8-bit image.

    ``vertical_first``: the installed Pillow runs the vertical pass first for this shape
    (see :func:`crane.data.transforms.resize_uint8`). A pass whose side does not change is
    skipped, as in Pillow."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"pil_resize_uint8 takes uint8 pixels, got {pixels.dtype}")
    x = pixels

    def vertical(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-2] == height:
            return t
        return _pass_last_dim(t.transpose(-1, -2), height).transpose(-1, -2)

    def horizontal(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[-1] == width else _pass_last_dim(t, width)

    x = horizontal(vertical(x)) if vertical_first else vertical(horizontal(x))
    return x.contiguous()
