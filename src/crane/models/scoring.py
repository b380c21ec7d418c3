"""Scores from patch sets and text features (SPEC §5); pure torch, any device."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patch_logits(patch_sets: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """(S, B, N, E) · text → (S, B, N, 2) logits; ``text`` is (2, E) or per-image (B, 2, E)."""
    if text.dim() == 2:
        return patch_sets @ text.t() / temperature
    return torch.einsum("sbne,bce->sbnc", patch_sets, text) / temperature


def _upsample(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(S, B, N) per-patch values → (S, B, size, size)."""
    s, b, n = x.shape
    g = math.isqrt(n)
    x = x.reshape(s * b, 1, g, g)
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=(size, size), mode=mode, **kwargs).view(s, b, size, size)


def anomaly_map(logits: torch.Tensor, size: int, combine: str) -> torch.Tensor:
    """Unsmoothed pixel map (B, size, size) from (S, B, N, 2) logits.

    ``soft_mean``: per-set probabilities upsampled bilinearly, then averaged.
    ``logit_mean``: per-set logits upsampled, averaged, then the 2-way softmax. A 2-way
    softmax is the sigmoid of the logit difference, and upsampling is linear, so one channel
    (the difference) is upsampled instead of two.
    """
    diff = (logits[..., 1] - logits[..., 0]).float()
    if combine == "soft_mean":
        return _upsample(torch.sigmoid(diff), size, "bilinear").mean(0)
    if combine == "logit_mean":
        return torch.sigmoid(_upsample(diff, size, "bilinear").mean(0))
    raise ValueError(f"unknown map combination {combine!r}")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None) -> torch.Tensor:
    """scipy.ndimage's kernel: radius ``int(truncate·σ + 0.5)``, normalised, float64."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices for scipy's ``reflect`` border (d c b a | a b c d | d c b a), any radius."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of (..., H, W) maps matching ``scipy.ndimage.gaussian_filter``
    (mode ``reflect``, ``truncate=4``) on each map; runs where ``maps`` lives."""
    if sigma <= 0:
        return maps
    shape = maps.shape
    h, w = shape[-2:]
    x = maps.reshape(-1, 1, h, w)
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    k = gaussian_kernel1d(sigma, truncate, device=x.device).to(dtype)
    r = (k.numel() - 1) // 2
    x = x.index_select(2, _reflect_index(h, r, x.device))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    x = x.index_select(3, _reflect_index(w, r, x.device))
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return x.reshape(shape).to(maps.dtype if maps.is_floating_point() else dtype)


def fused_image_feature(
    patch_sets: torch.Tensor, logits: torch.Tensor, global_feat: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Local-to-global fusion g⁺ (B, E), SPEC §5 steps 1-4."""
    w = torch.softmax(logits.mean(0), dim=-1)[..., 1]  # (B, N), always the logit mean
    p = patch_sets.mean(0)  # (B, N, E)
    c = F.normalize(torch.einsum("bn,bne->be", w.to(p.dtype), p), dim=-1)
    return F.normalize(alpha * c + (1 - alpha) * global_feat, dim=-1)


def image_logits(fused: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, 2) image logits from g⁺ and static (2, E) or per-image (B, 2, E) text features."""
    if text.dim() == 2:
        return fused @ text.t() / temperature
    return torch.einsum("be,bce->bc", fused, text) / temperature
