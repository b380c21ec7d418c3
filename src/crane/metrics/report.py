"""Per-class metric tables and their dataset mean (SPEC section 9).

Undefined metrics are ``float('nan')`` throughout (a class with one label only, no anomalous
pixel, no maps ...). The mean of a metric is the unweighted mean over the classes where it is
defined -- an undefined class is left out, never counted as 0 -- and NaN if no class defines it.
:meth:`MetricsReport.to_dict` turns NaN into ``None`` for JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

METRICS: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_aupro",
)

_HEADERS = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_f1_max": "P-F1max",
    "pixel_aupro": "AUPRO",
}

MEAN_ROW = "mean"


def mean_label(classes: Iterable[str]) -> str:
    """The mean row's name in tables: ``"mean"``, unless a class has that name (ignoring
    case); then ``"mean (all classes)"`` (with more parentheses while that is taken too)."""
    taken = {c.casefold() for c in classes}
    label = MEAN_ROW
    if label in taken:
        label = "mean (all classes)"
        while label.casefold() in taken:
            label = f"({label})"
    return label


def class_mean(
    per_class: Mapping[str, Mapping[str, float]], metrics: Iterable[str] = METRICS
) -> dict[str, float]:
    """Unweighted mean of each metric over the classes where it is defined (not NaN)."""
    out = {}
    for key in metrics:
        vals = [float(v[key]) for v in per_class.values() if not math.isnan(v.get(key, math.nan))]
        out[key] = math.fsum(vals) / len(vals) if vals else math.nan
    return out


def _mean_bound(
    per_class: Mapping[str, Mapping[str, float]], bounds: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    # |mean(exact) - mean(estimate)| <= mean of the bounds over the classes in the mean, when
    # the exact mean averages the same classes. A class left out as undefined (NaN) with a
    # positive bound (inf; NaN or 0 mean surely undefined) may be defined for the exact value
    # (too few bins to tell): then the means may average different classes, and nothing
    # bounds their difference.
    out = {}
    for key in METRICS:
        vals, unknown = [], False
        for name, v in per_class.items():
            bound = bounds[name].get(key, math.nan)
            if not math.isnan(v.get(key, math.nan)):
                vals.append(bound)
            elif bound > 0:
                unknown = True
        out[key] = math.inf if unknown else (math.fsum(vals) / len(vals) if vals else math.nan)
    return out


@dataclass(frozen=True)
class MetricsReport:
    """Per-class metrics, their mean and (binned mode) error bounds.

    ``per_class[cls][metric]`` and ``mean[metric]`` are floats in [0, 1], NaN when undefined;
    metric keys are :data:`METRICS`. Binned mode only: ``bounds[cls]`` and ``mean_bounds``
    hold the largest possible |exact - reported| per metric of a class and of the mean
    (apart, so that a class may be called "mean").
    """

    per_class: dict[str, dict[str, float]]
    mean: dict[str, float]
    aupro: str
    mode: str
    bounds: dict[str, dict[str, float]] | None = field(default=None)
    mean_bounds: dict[str, float] | None = field(default=None)

    def rows(self) -> list[tuple[str, dict[str, float], dict[str, float]]]:
        """``(name, metrics, bounds)`` per class, then the mean's under :func:`mean_label`;
        bounds are ``{}`` in exact mode."""
        out = [
            (c, v, self.bounds[c] if self.bounds is not None else {})
            for c, v in self.per_class.items()
        ]
        out.append((mean_label(self.per_class), self.mean, self.mean_bounds or {}))
        return out

    def format_table(
        self, *, percent: bool = True, digits: int = 1, metrics: Iterable[str] = METRICS
    ) -> str:
        """Plain-text table, one row per class plus the mean; undefined shown as ``n/a``."""
        keys = list(metrics)
        scale = 100.0 if percent else 1.0
        rows = [["class", *(_HEADERS.get(k, k) for k in keys)]]
        for name, vals, _ in self.rows():
            rows.append([name, *(_fmt(vals.get(k, math.nan), scale, digits) for k in keys)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, lines[1])
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: NaN (undefined) -> None; in ``bounds`` and ``mean_bounds``, inf
        (no finite bound: too few bins to tell) -> the string ``"inf"``, so strict JSON
        parsers read it."""
        out: dict[str, Any] = {
            "aupro": self.aupro,
            "mode": self.mode,
            "per_class": {c: _json(v) for c, v in self.per_class.items()},
            "mean": _json(self.mean),
        }
        if self.bounds is not None:
            out["bounds"] = {c: _json_bounds(v) for c, v in self.bounds.items()}
        if self.mean_bounds is not None:
            out["mean_bounds"] = _json_bounds(self.mean_bounds)
        return out


def make_report(
    per_class: Mapping[str, Mapping[str, float]],
    *,
    aupro: str,
    mode: str = "exact",
    bounds: Mapping[str, Mapping[str, float]] | None = None,
) -> MetricsReport:
    """Build a :class:`MetricsReport` from per-class metrics (missing keys become NaN)."""
    table = {c: {k: float(v.get(k, math.nan)) for k in METRICS} for c, v in per_class.items()}
    mean = class_mean(table)
    bound_table = mean_bounds = None
    if bounds is not None:
        bound_table = {c: {k: float(bounds[c].get(k, math.nan)) for k in METRICS} for c in table}
        mean_bounds = _mean_bound(table, bound_table)
    return MetricsReport(table, mean, aupro, mode, bound_table, mean_bounds)


def _fmt(value: float, scale: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value * scale:.{digits}f}"


def _json(values: Mapping[str, float]) -> dict[str, float | None]:
    return {k: None if math.isnan(v) else v for k, v in values.items()}


def _json_bounds(values: Mapping[str, float]) -> dict[str, float | str | None]:
    return {k: "inf" if b == math.inf else b for k, b in _json(values).items()}
