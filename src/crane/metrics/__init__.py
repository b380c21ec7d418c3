"""Evaluation metrics (SPEC section 9): stateless functions plus a streaming accumulator.

Image level: AUROC, AP, F1-max. Pixel level: AUROC, F1-max, AUPRO (``mvtec`` or ``legacy``).
Inputs are NumPy arrays or torch tensors (computed on the tensors' device); undefined metrics
are NaN and are left out of class means.
"""

from crane.metrics.aupro import AUPRO_DEFINITIONS, aupro, label_regions
from crane.metrics.binned import DEFAULT_NUM_BINS
from crane.metrics.functional import (
    IMAGE_METRICS,
    PIXEL_METRICS,
    auroc,
    average_precision,
    f1_max,
    image_metrics,
    pixel_auroc,
    pixel_f1_max,
    pixel_metrics,
)
from crane.metrics.report import METRICS, MetricsReport, class_mean, make_report
from crane.metrics.streaming import MetricAccumulator

__all__ = [
    "AUPRO_DEFINITIONS",
    "DEFAULT_NUM_BINS",
    "IMAGE_METRICS",
    "METRICS",
    "PIXEL_METRICS",
    "MetricAccumulator",
    "MetricsReport",
    "aupro",
    "auroc",
    "average_precision",
    "class_mean",
    "f1_max",
    "image_metrics",
    "label_regions",
    "make_report",
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_metrics",
]
