"""Training losses of SPEC §6, written to match the reference numerically."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from crane.models.crane import TrainOutput


def focal_loss(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """Focal loss on 2-channel probabilities (B, 2, H, W) against a 0/1 mask (B, H, W).

    As in the reference: the one-hot target is clamped to [smooth, 1 − smooth],
    ``p_t = Σ_c onehot_c·p_c + smooth``, loss = mean(−(1 − p_t)^γ · log p_t).
    """
    onehot = torch.stack([1 - target, target], dim=1).clamp(smooth, 1 - smooth)
    pt = (onehot * probs).sum(1) + smooth
    return (-(1 - pt).pow(gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Binary Dice per sample (smooth 1), averaged: 1 − mean_b (2|X∩Y|+1)/(|X|+|Y|+1)."""
    p, t = prob.flatten(1), target.flatten(1)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1 - dice.mean()


def crane_loss(
    out: TrainOutput,
    masks: torch.Tensor,
    labels: torch.Tensor,
    size: int,
    set_multiplicity: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``2·Σ_b Focal_b + 2·Σ_b Dice_b + 0.2·CE`` with probabilities upsampled *nearest*.

    ``set_multiplicity`` counts each set that many times (the ``crane`` reference returns its
    single layer-24 set four times, SPEC §3/§6). ``masks`` is (B, H, W) or (B, 1, H, W).
    """
    masks = masks.reshape(masks.shape[0], size, size).to(out.patch_logits.dtype)
    s, b, n, _ = out.patch_logits.shape
    g = math.isqrt(n)
    probs = out.patch_logits.softmax(-1)  # (S, B, N, 2)
    grid = probs.permute(0, 1, 3, 2).reshape(s * b, 2, g, g)
    up = F.interpolate(grid, size=(size, size), mode="nearest").view(s, b, 2, size, size)
    focal = sum(focal_loss(up[i], masks) for i in range(s)) * set_multiplicity
    dice = sum(dice_loss(up[i, :, 1], masks) for i in range(s)) * set_multiplicity
    ce = F.cross_entropy(out.image_logits, labels.long())
    total = 2 * focal + 2 * dice + 0.2 * ce
    parts = {"loss": total, "focal": focal, "dice": dice, "ce": ce}
    values = torch.stack([v.detach().float() for v in parts.values()]).tolist()  # (one sync)
    return total, dict(zip(parts, values, strict=True))
