"""Image / pixel AUROC, AP and F1-max against scikit-learn, properties, inputs and reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from crane.metrics import (
    METRICS,
    auroc,
    average_precision,
    class_mean,
    f1_max,
    image_metrics,
    make_report,
    pixel_auroc,
    pixel_f1_max,
    pixel_metrics,
)

TOL = 1e-9


def sk_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """The reference's calc_f1_max: F1 over scikit-learn's precision-recall curve."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def random_case(seed: int, n: int, decimals: int | None, pos_rate: float = 0.3):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < pos_rate
    labels[:2] = [True, False]  # both labels present
    scores = rng.random(n) + 0.3 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # heavy ties, also across the two labels
    return scores, labels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n, decimals", [(7, 1), (200, 2), (5000, 2), (3000, None)])
def test_image_metrics_match_sklearn(seed: int, n: int, decimals: int | None) -> None:
    scores, labels = random_case(seed, n, decimals)
    got = image_metrics(scores, labels)
    assert abs(got["image_auroc"] - roc_auc_score(labels, scores)) < TOL
    assert abs(got["image_ap"] - average_precision_score(labels, scores)) < TOL
    assert abs(got["image_f1_max"] - sk_f1_max(labels, scores)) < TOL
    assert got["image_auroc"] == auroc(scores, labels)
    assert got["image_ap"] == average_precision(scores, labels)
    assert got["image_f1_max"] == f1_max(scores, labels)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=40).filter(
        lambda xs: len({y for _, y in xs}) == 2
    )
)
def test_match_sklearn_on_tiny_tied_inputs(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([s for s, _ in pairs], dtype=np.float64) / 6
    labels = np.array([y for _, y in pairs])
    assert abs(auroc(scores, labels) - roc_auc_score(labels, scores)) < TOL
    assert abs(average_precision(scores, labels) - average_precision_score(labels, scores)) < TOL
    assert abs(f1_max(scores, labels) - sk_f1_max(labels, scores)) < TOL


def test_torch_and_numpy_inputs_agree() -> None:
    scores, labels = random_case(3, 500, 2)
    ref = image_metrics(scores, labels)
    assert image_metrics(torch.from_numpy(scores), torch.from_numpy(labels)) == ref
    assert image_metrics(scores.tolist(), labels.astype(np.int64)) == ref
    # float32 scores: same ranking as float32 in scikit-learn
    s32 = scores.astype(np.float32)
    assert abs(auroc(torch.from_numpy(s32), labels) - roc_auc_score(labels, s32)) < TOL


def test_one_label_is_undefined_not_zero() -> None:
    scores = np.array([0.1, 0.5, 0.9])
    for labels in (np.zeros(3, bool), np.ones(3, bool)):
        assert all(math.isnan(v) for v in image_metrics(scores, labels).values())
    assert math.isnan(auroc([], []))


def test_perfect_and_inverted_rankings() -> None:
    n_pos, n_neg = 5, 12
    labels = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    perfect = np.r_[np.linspace(0.6, 1.0, n_pos), np.linspace(0.0, 0.5, n_neg)]
    assert image_metrics(perfect, labels) == {
        "image_auroc": 1.0,
        "image_ap": 1.0,
        "image_f1_max": 1.0,
    }
    inverted = -perfect
    assert auroc(inverted, labels) == 0.0
    # Every threshold that admits k positives also admits all negatives: F1 = 2k/(k+N+P),
    # best at k = P; precision at the k-th positive is k/(k+N).
    assert abs(f1_max(inverted, labels) - 2 * n_pos / (2 * n_pos + n_neg)) < TOL
    expected_ap = np.mean([k / (k + n_neg) for k in range(1, n_pos + 1)])
    assert abs(average_precision(inverted, labels) - expected_ap) < TOL
    # All scores tied: AUROC 1/2, AP = prevalence, F1 = 2P/(2P+N).
    tied = np.zeros(n_pos + n_neg)
    assert auroc(tied, labels) == 0.5
    assert abs(average_precision(tied, labels) - n_pos / (n_pos + n_neg)) < TOL
    assert abs(f1_max(tied, labels) - 2 * n_pos / (2 * n_pos + n_neg)) < TOL


_TRANSFORMS = {
    "affine": lambda x: 3.0 * x - 7.0,
    "cubic": lambda x: x**3 + x,
    "exp": np.exp,
    "logit": lambda x: np.log((x + 0.01) / (1.01 - x)),
}


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(4, 300),
    transform=st.sampled_from(sorted(_TRANSFORMS)),
)
def test_strictly_increasing_transform_leaves_ranking_metrics_unchanged(
    seed: int, n: int, transform: str
) -> None:
    scores, labels = random_case(seed, n, 2)
    scores = np.clip(scores, 0.0, 1.0)
    # On a 0.01 grid none of these transforms merges two values in float64.
    assert image_metrics(_TRANSFORMS[transform](scores), labels) == image_metrics(scores, labels)


def _maps_and_masks(seed: int, n: int = 5, size: int = 24, decimals: int | None = 2):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(1, n):
        r, c = rng.integers(0, size - 6, 2)
        masks[i, r : r + rng.integers(1, 7), c : c + rng.integers(1, 7)] = True
    maps = rng.random((n, size, size)) * 0.8 + 0.3 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_match_sklearn(seed: int) -> None:
    maps, masks = _maps_and_masks(seed)
    flat_s, flat_y = maps.ravel(), masks.ravel()
    got = pixel_metrics(maps, masks)
    assert abs(got["pixel_auroc"] - roc_auc_score(flat_y, flat_s)) < TOL
    assert abs(got["pixel_f1_max"] - sk_f1_max(flat_y, flat_s)) < TOL
    assert got["pixel_auroc"] == pixel_auroc(maps, masks)
    assert got["pixel_f1_max"] == pixel_f1_max(maps, masks)


def test_pixel_input_layouts() -> None:
    maps, masks = _maps_and_masks(1)
    ref = pixel_metrics(maps, masks)
    assert pixel_metrics(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None]) == ref
    assert pixel_metrics(maps, masks.astype(np.uint8) * 255) == ref
    # float16 maps rank exactly like their float32 widening
    half = torch.from_numpy(maps).half()
    assert pixel_metrics(half, masks) == pixel_metrics(half.float(), masks)
    single = pixel_metrics(maps[2], masks[2])
    assert single == pixel_metrics(maps[2:3], masks[2:3])


def test_pixel_input_errors() -> None:
    maps, masks = _maps_and_masks(1)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_metrics(maps, masks[:, :-1])
    with pytest.raises(ValueError, match="must be"):
        pixel_metrics(maps[None, None], masks[None, None])
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(bad, masks)
    with pytest.raises(ValueError, match="labels"):
        auroc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="definition"):
        pixel_metrics(maps, masks, aupro="nope")  # type: ignore[arg-type]


def test_pixel_metrics_undefined_without_anomalous_or_normal_pixels() -> None:
    maps, masks = _maps_and_masks(0)
    for gt in (np.zeros_like(masks), np.ones_like(masks)):
        for aupro in ("mvtec", "legacy"):
            got = pixel_metrics(maps, gt, aupro=aupro)
            assert all(math.isnan(v) for v in got.values()), got


def test_class_mean_skips_undefined() -> None:
    per_class = {
        "a": {"image_auroc": 0.8, "pixel_aupro": 0.5},
        "b": {"image_auroc": math.nan, "pixel_aupro": 0.7},
        "c": {"image_auroc": 0.6, "pixel_aupro": math.nan},
    }
    mean = class_mean(per_class, ["image_auroc", "pixel_aupro"])
    assert mean == pytest.approx({"image_auroc": 0.7, "pixel_aupro": 0.6})
    assert math.isnan(class_mean({"a": {"image_auroc": math.nan}}, ["image_auroc"])["image_auroc"])


def test_report_table_and_json() -> None:
    report = make_report(
        {"bottle": {"image_auroc": 0.9375, "pixel_aupro": 0.5}, "cable": {"image_auroc": 0.5}},
        aupro="mvtec",
    )
    assert set(report.mean) == set(METRICS)
    assert report.mean["image_auroc"] == pytest.approx(0.71875)
    assert report.mean["pixel_aupro"] == 0.5  # cable's undefined AUPRO is not a 0
    table = report.format_table()
    assert "93.8" in table and "n/a" in table and table.splitlines()[-1].startswith("mean")
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["per_class"]["cable"]["pixel_aupro"] is None
