"""Stateless image- and pixel-level metrics over NumPy arrays or torch tensors (SPEC section 9).

Every function takes scores (higher = more anomalous) and binary ground truth (True / > 0.5 =
anomalous), works on the tensors' device and returns a Python float. A metric that is undefined
-- only one label present, i.e. no anomalous or no normal sample / pixel -- is ``NaN`` (never 0).

AUROC, AP and F1-max equal scikit-learn's ``roc_auc_score``, ``average_precision_score`` and the
F1-max of ``precision_recall_curve`` (ties included) up to float rounding.
"""

from __future__ import annotations

import math

import torch

from crane.metrics._core import (
    ArrayLike,
    RankStats,
    auroc_from_stats,
    average_precision_from_stats,
    binary_tensor,
    f1_max_from_stats,
    pixel_inputs,
    rank_stats,
    score_tensor,
    sorted_scores,
)
from crane.metrics.aupro import (
    AuproDefinition,
    aupro_from_pixels,
    check_aupro_args,
    check_definition,
    extract_positives,
    region_weights,
)

IMAGE_METRICS: tuple[str, ...] = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS: tuple[str, ...] = ("pixel_auroc", "pixel_f1_max", "pixel_aupro")


def _ranking_inputs(scores: ArrayLike, labels: ArrayLike) -> RankStats:
    s = score_tensor(scores).reshape(-1)
    y = binary_tensor(labels).reshape(-1).to(s.device)
    if s.numel() != y.numel():
        raise ValueError(f"{s.numel()} scores but {y.numel()} labels")
    return rank_stats(sorted_scores(s), s[y])


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve (ties count half); NaN if only one label is present."""
    return auroc_from_stats(_ranking_inputs(scores, labels))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision, step-wise as scikit-learn (not trapezoidal); NaN if one label only."""
    return average_precision_from_stats(_ranking_inputs(scores, labels))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Maximum F1 = 2PR/(P+R) over all thresholds; NaN if only one label is present."""
    return f1_max_from_stats(_ranking_inputs(scores, labels))


def image_metrics(scores: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Image AUROC, AP and F1-max from one ranking: keys :data:`IMAGE_METRICS`."""
    st = _ranking_inputs(scores, labels)
    return {
        "image_auroc": auroc_from_stats(st),
        "image_ap": average_precision_from_stats(st),
        "image_f1_max": f1_max_from_stats(st),
    }


def _pixel_ranking(maps: ArrayLike, masks: ArrayLike) -> RankStats:
    scores, gt = pixel_inputs(maps, masks)
    flat = scores.reshape(-1)
    return rank_stats(sorted_scores(flat, name="anomaly maps"), flat[gt.reshape(-1)])


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel AUROC over all pixels of the maps, (B, H, W) or (B, 1, H, W)."""
    return auroc_from_stats(_pixel_ranking(maps, masks))


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel F1-max over all pixels of the maps."""
    return f1_max_from_stats(_pixel_ranking(maps, masks))


AUPRO_KEYS = {d: f"pixel_aupro_{d}" for d in ("mvtec", "legacy")}


def pixel_metrics_from_pixels(
    all_sorted: torch.Tensor,
    pos_scores: torch.Tensor,
    region: torch.Tensor,
    areas: torch.Tensor,
    *,
    max_fpr: float = 0.3,
    num_thresholds: int = 200,
) -> dict[str, float]:
    """Pixel metrics from all scores sorted ascending and the anomalous pixels (with regions).

    Keys ``pixel_auroc``, ``pixel_f1_max``, ``pixel_aupro_mvtec``, ``pixel_aupro_legacy``: both
    AUPRO definitions share the ranking, the legacy one costs ~200 more look-ups. The shared
    back end of :func:`pixel_metrics` and the exact streaming accumulator.
    """
    keys = ("pixel_auroc", "pixel_f1_max", *AUPRO_KEYS.values())
    check_aupro_args(max_fpr, num_thresholds)
    if pos_scores.numel() == 0 or pos_scores.numel() == all_sorted.numel():
        return dict.fromkeys(keys, math.nan)
    st = rank_stats(all_sorted, pos_scores, region_weights(region, areas))
    out = {"pixel_auroc": auroc_from_stats(st), "pixel_f1_max": f1_max_from_stats(st)}
    for definition, key in AUPRO_KEYS.items():
        out[key] = aupro_from_pixels(
            all_sorted,
            pos_scores,
            region,
            areas,
            definition,
            max_fpr=max_fpr,
            num_thresholds=num_thresholds,
            stats=st,
        )
    return out


def select_aupro(values: dict[str, float], definition: str) -> dict[str, float]:
    """Rename ``pixel_aupro_<definition>`` to ``pixel_aupro`` and drop the other definition."""
    check_definition(definition)
    out = {k: v for k, v in values.items() if k not in AUPRO_KEYS.values()}
    out["pixel_aupro"] = values[AUPRO_KEYS[definition]]
    return out


def pixel_metrics(
    maps: ArrayLike,
    masks: ArrayLike,
    *,
    aupro: AuproDefinition = "mvtec",
    max_fpr: float = 0.3,
    num_thresholds: int = 200,
) -> dict[str, float]:
    """Pixel AUROC, F1-max and AUPRO (``aupro`` = "mvtec" or "legacy") from one sort.

    Keys :data:`PIXEL_METRICS`; all NaN when the masks hold no anomalous or no normal pixel.
    """
    check_definition(aupro)
    check_aupro_args(max_fpr, num_thresholds)
    scores, gt = pixel_inputs(maps, masks)
    all_sorted = sorted_scores(scores, name="anomaly maps")
    pos, region, areas = extract_positives(scores, gt)
    values = pixel_metrics_from_pixels(
        all_sorted, pos, region, areas, max_fpr=max_fpr, num_thresholds=num_thresholds
    )
    return select_aupro(values, aupro)
