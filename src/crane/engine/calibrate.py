"""Image-level decision thresholds from labelled scores."""

from __future__ import annotations

import math

import numpy as np

from crane.errors import CraneError


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, float]]:
    """Threshold t maximising F1 of the rule ``score >= t`` on the given data."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        raise CraneError("F1 calibration needs both normal and anomalous images")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # last index of each group of equal scores
    tp, fp, t = tp[last], fp[last], s[last]
    fn = y.sum() - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    best = int(np.argmax(f1))
    return float(t[best]), {
        "f1": float(f1[best]),
        "precision": float(tp[best] / (tp[best] + fp[best])),
        "recall": float(tp[best] / y.sum()),
    }


def fpr_threshold(
    scores: np.ndarray, labels: np.ndarray, target_fpr: float
) -> tuple[float, dict[str, float]]:
    """Smallest threshold whose false-positive rate on the normal images is <= ``target_fpr``."""
    if not 0 <= target_fpr < 1:
        raise CraneError(f"target FPR must be in [0, 1), got {target_fpr}")
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    neg = np.sort(s[~y])[::-1]
    if neg.size == 0:
        raise CraneError("FPR calibration needs normal images")
    k = int(math.floor(target_fpr * neg.size + 1e-9))  # false positives allowed
    t = float(np.nextafter(neg[k], np.inf)) if k < neg.size else float(neg[-1])
    fpr = float((neg >= t).mean())
    out = {"fpr": fpr}
    if y.any():
        out["recall"] = float((s[y] >= t).mean())
    return t, out
