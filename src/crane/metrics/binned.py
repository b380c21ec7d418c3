"""Pixel metrics from K-bin score histograms, each with a certified error bound.

Scores are binned by ``b(s) = clamp(floor(s * K), 0, K - 1)``: for K a power of two ``s * K`` is
exact in every float dtype, so bin b is exactly [b/K, (b+1)/K) (bin 0 also takes s < 0, bin
K-1 also s >= 1) and b(s) is monotone. Estimates treat the scores inside a bin as tied. With
``n_b`` normal and ``p_b`` anomalous pixels and ``w_b`` summed region weights (1 / region area)
in bin b, N, P, R the totals, the bounds below hold for *any* scores that produce the
histograms, so they bound |exact - estimate|:

* AUROC: only pairs in the same bin can be misordered, each by at most 1/2 of its count, so
  ``|err| <= sum_b n_b p_b / (2 N P)``.
* F1-max: the estimate is attained by an exact threshold (the set {s : b(s) >= c} is a
  threshold set), so it is a lower bound; an optimal exact threshold inside bin c has at most
  TP(b >= c) true and at least FP(b > c) false positives, so
  ``F1 <= max_c 2 TP(>=c) / (TP(>=c) + FP(>c) + P)``.
* AUPRO ``mvtec``: the estimated curve joins a subset of the exact curve's vertices, one per
  bin, and the exact curve is monotone in between, so it stays inside each box
  [F_c+1, F_c] x [PRO_c+1, PRO_c]; per box the area differs by at most half the box
  (``n_c w_c / (2 N R)``), and the box cut by ``max_fpr`` by its part left of the cut.
* AUPRO ``legacy``: each threshold t falls in a known bin, which brackets FPR(t) and PRO(t)
  between the counts strictly above and at-or-above that bin. The area is a weighted mean of
  the segment heights with non-negative weights (the FPR steps); bounding it over all curves
  inside the brackets gives :func:`legacy_enclosure`. It is infinite when the brackets allow a
  degenerate curve (the kept FPR range could be empty or a single point). With very few bins
  the estimated curve itself can be degenerate: the estimate is then NaN with an infinite
  bound (the exact value may be defined), and the class mean's bound is infinite too.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from crane.metrics._core import (
    RankStats,
    auroc_from_stats,
    f1_max_from_stats,
    suffix_sum,
    use_numpy,
)
from crane.metrics.aupro import (
    aupro_mvtec_from_stats,
    legacy_area,
    legacy_thresholds,
)

DEFAULT_NUM_BINS = 1 << 16


MAX_NUM_BINS = 1 << 24


def check_num_bins(num_bins: int) -> None:
    if num_bins < 2 or num_bins & (num_bins - 1):
        raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins}")
    if num_bins > MAX_NUM_BINS:  # (float32 scores times K past 2**24 round into bin K)
        raise ValueError(f"num_bins must be at most 2**24 ({MAX_NUM_BINS}), got {num_bins}")


def bin_index(scores: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Bin of each score (int32: half the memory traffic of int64).

    Truncation equals floor once negatives are clamped to 0.
    """
    if use_numpy(scores):
        x = np.multiply(scores.numpy(), num_bins)
        np.clip(x, 0, num_bins - 1, out=x)
        return torch.from_numpy(x.astype(np.int32))
    return (scores * num_bins).clamp_(0, num_bins - 1).to(torch.int32)


def _stats(neg: np.ndarray, pos: np.ndarray, weight: np.ndarray) -> RankStats:
    # Bins play the role of distinct values; empty bins contribute nothing to any sum.
    return RankStats(
        pos=pos,
        neg_ge=suffix_sum(neg),
        neg_eq=neg,
        weight=weight,
        values=np.arange(neg.size),
        n_pos=int(pos.sum()),
        n_neg=int(neg.sum()),
    )


def binned_pixel_metrics(
    hist_all: torch.Tensor,
    hist_pos: torch.Tensor,
    weight_pos: torch.Tensor,
    n_regions: int,
    score_range: tuple[float, float],
    *,
    max_fpr: float = 0.3,
    num_thresholds: int = 200,
) -> tuple[dict[str, float], dict[str, float]]:
    """(estimates, bounds) of pixel AUROC, F1-max and both AUPROs from K-bin histograms.

    ``hist_all``/``hist_pos``: int64 pixel counts per bin (all / anomalous pixels);
    ``weight_pos``: float64 summed 1/area of the anomalous pixels per bin; ``score_range``: the
    exact (min, max) score, which the legacy thresholds need. Keys as
    :func:`~crane.metrics.functional.pixel_metrics_from_pixels`; bounds: |exact - estimate| <=
    bound (NaN where the metric is undefined).
    """
    keys = ("pixel_auroc", "pixel_f1_max", "pixel_aupro_mvtec", "pixel_aupro_legacy")
    pos = hist_pos.cpu().numpy().astype(np.int64)
    neg = hist_all.cpu().numpy().astype(np.int64) - pos
    weight = weight_pos.cpu().numpy().astype(np.float64)
    st = _stats(neg, pos, weight)
    if not st.defined:
        nan = dict.fromkeys(keys, math.nan)
        return nan, dict(nan)
    n_neg, n_pos = st.n_neg, st.n_pos

    values = {"pixel_auroc": auroc_from_stats(st), "pixel_f1_max": f1_max_from_stats(st)}
    # Tied pairs per bin, summed in float64: int64 products wrap past 2**63 (3e9 x 3e9 pixels).
    tied = float(np.sum(neg.astype(np.float64) * pos))
    bounds = {"pixel_auroc": tied / (2.0 * n_neg * n_pos)}

    tp_ge = suffix_sum(pos).astype(np.float64)
    fp_gt = st.neg_ge - neg
    f1_upper = float(np.max(2.0 * tp_ge / (tp_ge + fp_gt + n_pos)))
    bounds["pixel_f1_max"] = max(f1_upper - values["pixel_f1_max"], 0.0)

    if n_regions == 0:
        for key in keys[2:]:
            values[key] = bounds[key] = math.nan
        return values, _with_rounding_slack(bounds)
    values["pixel_aupro_mvtec"] = aupro_mvtec_from_stats(st, n_regions, max_fpr)
    bounds["pixel_aupro_mvtec"] = _mvtec_bound(neg, weight, n_neg, n_regions, max_fpr)
    values["pixel_aupro_legacy"], bounds["pixel_aupro_legacy"] = _legacy_estimate(
        neg, weight, n_neg, n_regions, score_range, max_fpr, num_thresholds
    )
    return values, _with_rounding_slack(bounds)


def _with_rounding_slack(bounds: dict[str, float]) -> dict[str, float]:
    """Each finite bound made a little wider (relative 1e-9 plus 1e-14): the estimate and the
    exact value are both rounded floats, summed in other orders, so a bound the estimate
    reaches exactly (0 included: no bin mixes normal and anomalous pixels) could otherwise
    miss the computed exact value by a few ulps (and the reports round printed bounds up only
    past 1e-10 of a step)."""
    return {k: b * (1 + 1e-9) + 1e-14 if 0 <= b < math.inf else b for k, b in bounds.items()}


def _mvtec_bound(
    neg: np.ndarray, weight: np.ndarray, n_neg: int, n_regions: int, max_fpr: float
) -> float:
    d_f = neg / n_neg
    d_p = weight / n_regions
    f_after = suffix_sum(neg) / n_neg  # FPR once bin c is included
    f_before = f_after - d_f
    cut = max_fpr - f_before
    whole = f_after <= max_fpr
    crossing = ~whole & (f_before < max_fpr)
    err = np.where(whole, d_f * d_p / 2.0, 0.0)
    # Box cut by max_fpr: exact and chord areas both lie in [x P_lo, x P_hi], x = max_fpr - F.
    safe = np.where(crossing, d_f, 1.0)
    chord_excess = cut * cut * d_p / (2.0 * safe)
    err += np.where(crossing, np.maximum(chord_excess, cut * d_p - chord_excess), 0.0)
    return float(err.sum() / max_fpr)


def _legacy_estimate(
    neg: np.ndarray,
    weight: np.ndarray,
    n_neg: int,
    n_regions: int,
    score_range: tuple[float, float],
    max_fpr: float,
    num_thresholds: int,
) -> tuple[float, float]:
    lo, hi = score_range
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        return math.nan, 0.0  # undefined for the exact value too (see aupro_legacy_from_sorted)
    num_bins = neg.size
    thresholds = legacy_thresholds(lo, hi, num_thresholds)
    b = np.clip(np.floor(thresholds * num_bins), 0, num_bins - 1).astype(np.int64)
    neg_ge = np.append(suffix_sum(neg), 0)
    w_ge = np.append(suffix_sum(weight), 0.0)
    f_lo, f_hi = neg_ge[b + 1] / n_neg, neg_ge[b] / n_neg
    y_lo, y_hi = w_ge[b + 1] / n_regions, w_ge[b] / n_regions
    # Estimate: scores spread uniformly inside the threshold's bin.
    above = np.clip((b + 1) - thresholds * num_bins, 0.0, 1.0)
    estimate = legacy_area(f_lo + (f_hi - f_lo) * above, y_lo + (y_hi - y_lo) * above, max_fpr)
    low, high = legacy_enclosure(f_lo, f_hi, y_lo, y_hi, max_fpr)
    if math.isnan(low):
        return estimate, 0.0 if math.isnan(estimate) else math.inf
    if math.isnan(estimate):
        return estimate, math.inf
    return estimate, max(high - estimate, estimate - low, 0.0)


def legacy_enclosure(
    f_lo: np.ndarray, f_hi: np.ndarray, y_lo: np.ndarray, y_hi: np.ndarray, max_fpr: float = 0.3
) -> tuple[float, float]:
    """Interval holding the legacy AUPRO of every curve with FPR_j in [f_lo_j, f_hi_j] and
    PRO_j in [y_lo_j, y_hi_j] (j = thresholds ascending; all four non-increasing in j).

    Returns (nan, nan) when every such curve is undefined, (-inf, inf) when some may be.

    With kept points j0..J (J the last threshold), FPR steps d_j = f_j - f_j+1 >= 0 and segment
    heights s_j = (y_j + y_j+1) / 2, the area is sum d_j s_j / (f_j0 - f_J). It rises with s, so
    s = s_hi gives the upper end; written per point it is
    (f_j0 s_j0 + sum_interior f_j (s_j - s_j-1) - f_J s_J-1) / (f_j0 - f_J), where the interior
    coefficients are <= 0 (s non-increasing), so interior f_j = f_lo_j maximises it; what is
    left is linear-fractional in (f_j0, f_J), maximal at a corner of their box. The lower end
    mirrors this. Every exact curve lies in the brackets, so its area lies in the interval.
    """
    n = f_lo.size
    maybe_first = np.flatnonzero(f_lo < max_fpr)
    if maybe_first.size == 0:
        return math.nan, math.nan  # nothing can be kept: undefined for every curve
    surely_first = np.flatnonzero(f_hi < max_fpr)
    j_min = int(maybe_first[0])
    j_max = int(surely_first[0]) if surely_first.size else n
    if j_max >= n - 1:
        return -math.inf, math.inf  # fewer than two kept points is possible
    s_lo = (y_lo[:-1] + y_lo[1:]) / 2.0
    s_hi = (y_hi[:-1] + y_hi[1:]) / 2.0
    low, high = math.inf, -math.inf
    last = n - 1
    for j0 in range(j_min, j_max + 1):
        firsts = (f_lo[j0], min(f_hi[j0], max_fpr))  # j0 kept means f_j0 < max_fpr
        lasts = (f_lo[last], f_hi[last])
        if firsts[0] - lasts[1] <= 0:
            return -math.inf, math.inf  # the kept FPR range may be a single point
        inner = slice(j0 + 1, last)
        c_hi = float(np.sum(f_lo[inner] * (s_hi[j0 + 1 :] - s_hi[j0:-1])))
        c_lo = float(np.sum(f_hi[inner] * (s_lo[j0 + 1 :] - s_lo[j0:-1])))
        for e in firsts:
            for z in lasts:
                high = max(high, (e * s_hi[j0] + c_hi - z * s_hi[-1]) / (e - z))
                low = min(low, (e * s_lo[j0] + c_lo - z * s_lo[-1]) / (e - z))
    return low, high
