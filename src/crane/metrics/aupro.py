"""AUPRO (area under the per-region-overlap curve), both definitions of SPEC section 9.

``mvtec``  The MVTec AD benchmark definition: every distinct score is a threshold, PRO(t) is the
           mean over all ground-truth regions (8-connected) of the fraction of the region scoring
           at least t, FPR(t) the fraction of normal pixels scoring at least t; the curve
           starts at (0, 0) and is integrated exactly (trapezoids, linearly interpolated at
           ``max_fpr``) from 0 to ``max_fpr``, divided by ``max_fpr``.
``legacy`` The variant behind the published Crane / AnomalyCLIP / VAND tables (``cal_pro_score``):
           thresholds ``np.arange(min, max, (max - min) / 200)``, a pixel is predicted anomalous
           when its score is ``> t``; points with FPR < 0.3 are kept, their FPRs rescaled
           min-max to [0, 1] and the area taken with trapezoids. Not invariant under nonlinear
           monotone transforms of the scores (the thresholds are equally spaced). Thresholds
           are float64 (as NumPy's arange with float64 bounds, and the count the reference's
           ``torch.arange(min.item(), max.item(), step)`` makes); the reference's CUDA path
           rounds them to float32, which can only flip pixels within one float32 ulp of a
           threshold. Like the reference, np.arange's rounding sometimes gives 201
           thresholds (the last just below the maximum); that is kept.

Regions are labelled once per mask (``scipy.ndimage.label`` on CPU; only the masks travel
there, the maps stay on their device) and every threshold is then evaluated with sorted-array
look-ups instead of relabelling, see :func:`aupro_mvtec_from_stats` and
:func:`aupro_legacy_from_sorted`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from crane.metrics._core import (
    ArrayLike,
    RankStats,
    binary_tensor,
    pixel_inputs,
    rank_stats,
    searchsorted,
    sorted_scores,
    suffix_sum,
    take,
)

AuproDefinition = Literal["mvtec", "legacy"]
AUPRO_DEFINITIONS: tuple[str, ...] = ("mvtec", "legacy")

# Full 3x3 neighbourhood = 8-connectivity, as the MVTec code's structure and skimage.measure.label's
# default (connectivity = ndim) on 2-D masks.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def check_definition(definition: str) -> None:
    """Raise ValueError unless ``definition`` is one of :data:`AUPRO_DEFINITIONS`."""
    if definition not in AUPRO_DEFINITIONS:
        raise ValueError(f"unknown AUPRO definition {definition!r}; use one of {AUPRO_DEFINITIONS}")


def check_aupro_args(max_fpr: float, num_thresholds: int) -> None:
    """Raise ValueError unless ``max_fpr`` is in (0, 1] and ``num_thresholds`` >= 1 (an FPR
    limit given in percent would otherwise integrate past the curve's end silently)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if num_thresholds < 1:
        raise ValueError(f"num_thresholds must be >= 1, got {num_thresholds}")


def label_regions(masks: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label the 8-connected anomalous regions of a (B, H, W) bool mask stack (on CPU).

    Returns ``(flat_index, region, areas)``: the flat indices into ``masks.reshape(-1)`` of the
    anomalous pixels (row-major), the 0-based region of each (numbered across the stack) and
    the pixel count of every region. Each mask is labelled once, cropped to the bounding box of
    its anomalous pixels (labelling cost scales with the box, not the image).
    """
    m = binary_tensor(masks).cpu().numpy()
    if m.ndim != 3:
        raise ValueError(f"masks must be (B, H, W); got {m.shape}")
    n_img, height, width = m.shape
    flat_parts, region_parts = [], []
    n_regions = 0
    for i in np.flatnonzero(m.reshape(n_img, height * width).any(1)):  # (0 images too)
        rows, cols = np.flatnonzero(m[i].any(1)), np.flatnonzero(m[i].any(0))
        r0, c0 = rows[0], cols[0]
        labels, n = ndimage.label(
            m[i, r0 : rows[-1] + 1, c0 : cols[-1] + 1], structure=_EIGHT_CONNECTED
        )
        rr, cc = np.nonzero(labels)
        flat_parts.append((i * height + rr + r0) * width + cc + c0)
        region_parts.append(labels[rr, cc].astype(np.int64) + (n_regions - 1))
        n_regions += n
    if not flat_parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    region = np.concatenate(region_parts)
    return np.concatenate(flat_parts), region, np.bincount(region, minlength=n_regions)


def extract_positives(
    maps: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of the anomalous pixels, their region index (0-based, int64) and region areas.

    ``maps`` (B, H, W) scores and ``masks`` (B, H, W) bool. Outputs live on the maps' device;
    only the masks visit the CPU (for labelling).
    """
    flat, region, areas = label_regions(masks)
    device = maps.device
    scores = take(maps.reshape(-1), torch.from_numpy(flat))
    return scores, torch.from_numpy(region).to(device), torch.from_numpy(areas).to(device)


def region_weights(region: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
    """Per-pixel weight 1 / area of its region: PRO(t) = sum of the weights above t / #regions."""
    return take(1.0 / areas.double(), region)


def aupro_mvtec_from_stats(st: RankStats, n_regions: int, max_fpr: float = 0.3) -> float:
    """MVTec AUPRO from weighted rank statistics (weights 1 / region area).

    The curve point after each distinct threshold v is (#normal >= v / N, W(>= v) / R). An
    anomalous pixel scoring v therefore counts fully for FPR >= b = #normal >= v / N, not at all
    below a = #normal > v / N, and linearly in between: that segment is the trapezoid joining
    the point before v's tie group (pixels equal to v cross the threshold together) to the point
    after it. Integrating each pixel's share up to ``max_fpr`` gives the exact area, including
    the interpolation at ``max_fpr``, without enumerating the curve.
    """
    if not st.defined or n_regions == 0:
        return math.nan
    assert st.weight is not None
    limit = float(max_fpr)
    after = st.neg_ge / st.n_neg
    before = (st.neg_ge - st.neg_eq) / st.n_neg
    full = np.clip(limit - after, 0.0, None)
    inside = np.clip(limit - before, 0.0, None)
    width = np.where(after > before, after - before, 1.0)
    ramp = np.where(
        after <= limit,
        (after - before) / 2.0,
        np.where(before < limit, inside * inside / (2.0 * width), 0.0),
    )
    area = float(np.sum(st.weight * (full + ramp)))
    # (Clipped: a perfect map's sum of 1/area weights can round to 1 + a few ulps.)
    return min(max(area / n_regions / limit, 0.0), 1.0)


def legacy_thresholds(lo: float, hi: float, num_thresholds: int = 200) -> np.ndarray:
    """The reference's thresholds ``np.arange(min, max, (max - min) / num)`` (float64)."""
    return np.arange(lo, hi, (hi - lo) / num_thresholds)


def _round_down(thresholds: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Largest value of ``dtype`` <= each float64 threshold.

    For scores s of ``dtype``, ``s > t`` holds exactly when ``s > round_down(t)``, so the
    comparisons can run in the scores' own dtype and still mean the float64 comparison.
    """
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    t = thresholds.astype(np_dtype)
    return np.where(t > thresholds, np.nextafter(t, np_dtype.type(-np.inf)), t)


def legacy_area(fprs: np.ndarray, pros: np.ndarray, max_fpr: float = 0.3) -> float:
    """The reference's last step: keep FPR < max_fpr, rescale the FPRs min-max, trapezoid area.

    Undefined (NaN) where the reference fails: fewer than two kept points or all kept FPRs
    equal (its min-max rescaling divides by zero).
    """
    keep = fprs < max_fpr
    if int(keep.sum()) < 2:
        return math.nan
    x, y = fprs[keep], pros[keep]
    span = x.max() - x.min()
    if not span > 0:
        return math.nan
    x = (x - x.min()) / span
    # x falls as the threshold rises; sklearn.metrics.auc then returns the positive area.
    area = float(abs(np.sum((x[:-1] - x[1:]) * (y[:-1] + y[1:]))) / 2.0)
    return min(area, 1.0)  # (PRO sums of 1/area weights can round to 1 + a few ulps)


def aupro_legacy_from_sorted(
    all_sorted: torch.Tensor,
    st: RankStats,
    n_regions: int,
    max_fpr: float = 0.3,
    num_thresholds: int = 200,
) -> float:
    """Legacy AUPRO from all scores sorted ascending and the weighted positive statistics.

    FPR(t) and PRO(t) at each of the ~200 thresholds are binary searches into the sorted
    scores and the distinct positive values (cumulative region weights), instead of
    relabelling every mask at every threshold.
    """
    if not st.defined or n_regions == 0:
        return math.nan
    assert st.weight is not None
    lo, hi = float(all_sorted[0].item()), float(all_sorted[-1].item())
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        return math.nan  # constant maps (a zero threshold step) or infinite scores: no range
    thresholds = _round_down(legacy_thresholds(lo, hi, num_thresholds), all_sorted.dtype)
    all_le = searchsorted(all_sorted, torch.from_numpy(thresholds), right=True)
    idx = np.searchsorted(st.values, thresholds, side="right")  # distinct positive values <= t
    pos_gt = np.append(suffix_sum(st.pos), 0)[idx]
    weight_gt = np.append(suffix_sum(st.weight), 0.0)[idx]
    fprs = (all_sorted.numel() - all_le - pos_gt) / st.n_neg
    return legacy_area(fprs, weight_gt / n_regions, max_fpr)


def aupro_from_pixels(
    all_sorted: torch.Tensor,
    pos_scores: torch.Tensor,
    region: torch.Tensor,
    areas: torch.Tensor,
    definition: str = "mvtec",
    *,
    max_fpr: float = 0.3,
    num_thresholds: int = 200,
    stats: RankStats | None = None,
) -> float:
    """AUPRO from all scores sorted ascending plus the anomalous pixels' scores and regions."""
    check_definition(definition)
    check_aupro_args(max_fpr, num_thresholds)
    if stats is None:
        stats = rank_stats(all_sorted, pos_scores, region_weights(region, areas))
    if definition == "mvtec":
        return aupro_mvtec_from_stats(stats, areas.numel(), max_fpr)
    return aupro_legacy_from_sorted(all_sorted, stats, areas.numel(), max_fpr, num_thresholds)


def aupro(
    maps: ArrayLike,
    masks: ArrayLike,
    definition: AuproDefinition = "mvtec",
    *,
    max_fpr: float = 0.3,
    num_thresholds: int = 200,
) -> float:
    """AUPRO of anomaly maps against ground-truth masks, (B, H, W) or (B, 1, H, W).

    ``definition`` is ``"mvtec"`` or ``"legacy"`` (module docstring); ``num_thresholds`` only
    applies to ``legacy``. NaN when undefined: no anomalous or no normal pixel, or (legacy) a
    degenerate curve.
    """
    check_definition(definition)
    check_aupro_args(max_fpr, num_thresholds)
    scores, gt = pixel_inputs(maps, masks)
    all_sorted = sorted_scores(scores, name="anomaly maps")
    pos, region, areas = extract_positives(scores, gt)
    return aupro_from_pixels(
        all_sorted, pos, region, areas, definition, max_fpr=max_fpr, num_thresholds=num_thresholds
    )
