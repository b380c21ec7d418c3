"""Image-level decision thresholds from labelled scores.

A threshold is placed midway between the two neighbouring distinct scores that the decision
falls between, not on one of them: an image's score moves in its last float32 bits with the
batch it is computed in (and with the device), so a threshold equal to a calibration image's
score would let that image's decision flip between ``calibrate`` and a later ``predict``.
"""

from __future__ import annotations

import math

import numpy as np

from crane.errors import CraneError


def _checked(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise CraneError(f"{s.size} scores for {y.size} labels")
    if not np.isfinite(s).all():
        raise CraneError(
            f"{int((~np.isfinite(s)).sum())} score(s) are NaN or infinite: no threshold can be "
            "calibrated on them"
        )
    return s, y.astype(bool)


def _cut(values: np.ndarray, i: int) -> float:
    """A threshold that flags ``values[i:]`` of the ascending distinct ``values`` under
    ``score >= t``: midway between ``values[i - 1]`` and ``values[i]``; at either end, as far
    beyond the end value as half the gap to its neighbour (1e-4 without one)."""
    n = values.size
    if n == 1:  # (no neighbour: a margin far beyond the float32 drift of a score, ≈ 1e-7)
        margin = 1e-4 * max(abs(float(values[0])), 1.0)
        return float(values[0] - margin) if i == 0 else float(values[0] + margin)
    if i == 0:
        return float(values[0] - (values[1] - values[0]) / 2)
    if i == n:
        return float(values[-1] + (values[-1] - values[-2]) / 2)
    mid = (values[i - 1] + values[i]) / 2
    return float(mid if values[i - 1] < mid else values[i])  # (adjacent floats: no midpoint)


def check_labels(labels: np.ndarray, mode: str) -> None:
    """The labels ``mode`` (``"f1"``, ``"fpr"``) needs, checked before any image is scored:
    F1 needs normal and anomalous images, a false-positive rate normal ones."""
    y = np.asarray(labels).astype(bool)
    if mode == "f1" and (y.all() or not y.any()):
        raise CraneError("F1 calibration needs both normal and anomalous images")
    if mode == "fpr" and y.all():
        raise CraneError("FPR calibration needs normal images")


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, float]]:
    """Threshold t maximising F1 of the rule ``score >= t`` on the given data (midway between
    the lowest score it flags and the next lower one, see :func:`_cut`)."""
    s, y = _checked(scores, labels)
    check_labels(y, "f1")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # last index of each group of equal scores
    tp, fp, t = tp[last], fp[last], s[last]
    fn = y.sum() - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    best = int(np.argmax(f1))
    threshold = _cut(t[::-1], t.size - 1 - best)  # flags the scores >= t[best]
    return threshold, {
        "f1": float(f1[best]),
        "precision": float(tp[best] / (tp[best] + fp[best])),
        "recall": float(tp[best] / y.sum()),
    }


def fpr_threshold(
    scores: np.ndarray, labels: np.ndarray, target_fpr: float
) -> tuple[float, dict[str, float]]:
    """The threshold flagging the most images while its false-positive rate on the normal
    images stays <= ``target_fpr`` (midway between the highest normal score it leaves
    unflagged and the next higher score)."""
    if not 0 <= target_fpr < 1:
        raise CraneError(f"target FPR must be in [0, 1), got {target_fpr}")
    s, y = _checked(scores, labels)
    neg = np.sort(s[~y])[::-1]
    if neg.size == 0:
        raise CraneError("FPR calibration needs normal images")
    k = int(math.floor(target_fpr * neg.size + 1e-9))  # false positives allowed
    if k / neg.size > target_fpr:  # (the 1e-9 that absorbs rounding overshot)
        k -= 1
    values = np.unique(s)
    t = _cut(values, int(np.searchsorted(values, neg[k])) + 1)  # flags the scores > neg[k]
    out = {"fpr": float((neg >= t).mean())}
    if y.any():
        out["recall"] = float((s[y] >= t).mean())
    return t, out
