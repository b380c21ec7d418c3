"""Offline end-to-end demo: synthetic data → train (tiny) → evaluate → predict → HTML report."""

from __future__ import annotations

import html
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from crane.data import AnomalyDataset, make_synthetic_dataset
from crane.engine.evaluate import evaluate, write_report
from crane.engine.predict import Detector, run_predict
from crane.engine.train import TrainSettings, train
from crane.errors import CraneError
from crane.files import atomic_write_bytes, strict_json
from crane.metrics import METRICS
from crane.models import create_model

log = logging.getLogger(__name__)

AUX_CLASSES = ("tile", "fabric", "plate")


def run_demo(
    out: str | Path,
    *,
    preset: str = "tiny",
    epochs: int = 15,
    image_size: int = 224,
    device: torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on one synthetic dataset (auxiliary), evaluate zero-shot on another (other seed)."""
    if epochs < 1:  # (before any file is written)
        raise CraneError(f"the demo trains for epochs >= 1, got {epochs}")
    out = Path(out)
    if (out / "report.html").exists() and not overwrite:
        raise CraneError(f"{out} already holds a demo; pass --overwrite or another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CraneError(
            f"{out} is not empty: the demo writes its data, run and predictions there and would "
            "replace files of the same names; choose an empty or new --out (or --overwrite)"
        )
    device = device or torch.device("cpu")
    t0 = time.perf_counter()
    aux, target = out / "data" / "auxiliary", out / "data" / "target"
    make_synthetic_dataset(aux, seed=0, classes=AUX_CLASSES, overwrite=overwrite)
    make_synthetic_dataset(target, seed=1, classes=AUX_CLASSES, overwrite=overwrite)

    model = create_model(preset, seed=111, image_size=image_size)
    untrained = evaluate(
        model, AnomalyDataset(target, "test", image_size=image_size), device=device, progress=False
    )
    res = train(
        model,
        AnomalyDataset(aux, "test", image_size=image_size),
        out / "run",
        TrainSettings(epochs=epochs, dataset={"name": "synthetic", "root": str(aux)}),
        device=device,
        overwrite=True,
        progress=progress,
    )
    ev = evaluate(
        model,
        AnomalyDataset(target, "test", image_size=image_size),
        device=device,
        visualize_dir=out / "overlays",
        progress=progress,
    )
    write_report(
        ev.report, out / "eval", {"dataset": "synthetic-target", "model": str(out / "run")}
    )
    det = Detector(create_model(str(out / "run")), device=device)
    det.source = str(out / "run")
    summary = run_predict(
        det, [target / "plate" / "test"], out / "predict", overwrite=True, progress=progress
    )
    result = {
        "before_training": untrained.report.mean,
        "after_training": ev.report.mean,
        "epoch_losses": res.epoch_losses,
        "predict": {k: summary[k] for k in ("n_images", "n_failed")},
        "seconds": time.perf_counter() - t0,
    }
    text = json.dumps(strict_json(result), indent=2, allow_nan=False)
    atomic_write_bytes(out / "demo.json", (text + "\n").encode())
    atomic_write_bytes(out / "report.html", _html(out, result).encode())
    return result


def _round_robin(groups: list[list[Path]], n: int) -> list[Path]:
    """Up to ``n`` items taking one from each group in turn: every class in the report."""
    out: list[Path] = []
    for k in range(max(map(len, groups), default=0)):
        out += [g[k] for g in groups if k < len(g)]
    return out[:n]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def _html(out: Path, result: dict[str, Any]) -> str:
    head = "".join(f"<th>{m}</th>" for m in METRICS)
    rows = "".join(
        f"<tr><td>{label}</td>"
        + "".join(f"<td>{_fmt(result[key].get(m))}</td>" for m in METRICS)
        + "</tr>"
        for label, key in (
            ("untrained prompts", "before_training"),
            ("trained prompts", "after_training"),
        )
    )
    losses = ", ".join(f"{h['loss']:.3f}" for h in result["epoch_losses"])
    by_class: dict[str, list[Path]] = {}
    for p in sorted((out / "overlays").rglob("*.png")):
        by_class.setdefault(p.parent.name, []).append(p)
    anomalous = _round_robin(
        [[p for p in ps if not p.name.startswith("good_")] for ps in by_class.values()], 12
    )
    normal = _round_robin(
        [[p for p in ps if p.name.startswith("good_")] for ps in by_class.values()], 4
    )
    figs = "".join(
        f'<figure><img src="{html.escape(p.relative_to(out).as_posix())}" width="224">'
        f"<figcaption>{html.escape(p.parent.name)}/{html.escape(p.stem)}</figcaption></figure>"
        for p in anomalous + normal
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>crane demo</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{display:inline-block;margin:4px}} figcaption{{font-size:12px}}</style>
</head><body><h1>crane demo (synthetic data, tiny random backbone)</h1>
<p>Prompts trained on a synthetic auxiliary set, evaluated on a separate synthetic target set.
Metrics in %, class mean. Training losses per epoch: {losses}. Total {result["seconds"]:.0f}s.</p>
<table><tr><th></th>{head}</tr>{rows}</table>
<h2>Heatmaps (green: ground-truth contour)</h2>{figs}
<p>Files: <code>eval/metrics.csv</code>, <code>predict/predictions.csv</code>,
<code>run/</code> (model).</p>
</body></html>
"""
