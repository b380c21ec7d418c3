"""Crane / Crane+: zero-shot anomaly detection with CLIP (library API).

Heavy imports (torch, open_clip, timm) happen on first use of the model API, so the CLI's
dataset commands and ``import crane`` stay fast.
"""

from __future__ import annotations

from typing import Any

from crane.errors import CheckpointError, CraneError, DatasetError, ImageReadError, WeightsError

__version__ = "0.1.0"

_LAZY = {
    "create_model": "crane.models.factory",
    "save_model": "crane.models.factory",
    "CraneModel": "crane.models.crane",
    "CraneOutput": "crane.models.crane",
    "CraneConfig": "crane.config",
    "list_models": "crane.config",
    "Detector": "crane.engine.predict",
    "Prediction": "crane.engine.predict",
    "Failure": "crane.engine.predict",
    "run_predict": "crane.engine.predict",
    "get_config": "crane.config",
    "AnomalyDataset": "crane.data",
    "evaluate": "crane.engine.evaluate",
    "EvalResult": "crane.engine.evaluate",
    "train": "crane.engine.train",
    "TrainSettings": "crane.engine.train",
    "TrainResult": "crane.engine.train",
    "MetricAccumulator": "crane.metrics",
    "MetricsReport": "crane.metrics",
}

__all__ = [
    "CheckpointError",
    "CraneError",
    "DatasetError",
    "ImageReadError",
    "WeightsError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crane' has no attribute {name!r}")


def __dir__() -> list[str]:  # (so that completion and dir() show the lazy names too)
    return sorted({*globals(), *_LAZY})
