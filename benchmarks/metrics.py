"""Benchmark of crane.metrics on a deterministic MVTec-shaped workload.

Workload: 15 classes, 1725 anomaly maps of 518x518 (float32), 1258 of them anomalous with 1-5
elliptical ground-truth blobs of varying size; maps are smooth noise (37x37 upsampled
bilinearly, like the model's patch grid) plus a soft bump of random strength on each blob, so
the metrics are far from 0 and 1. ``--small``: 5 classes, 100 maps.

Each measurement runs in a fresh subprocess that regenerates the maps (deterministic) in
chunks of 16 and times only the metric calls. Peak memory is the peak resident set size
(``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident size before the measured
section, i.e. beyond what the process held (interpreter, libraries and, for the per-class
batch functions, the class's maps and masks themselves).

Runs: ``stream-exact`` (MetricAccumulator exact, compute() with AUPRO mvtec, then the legacy
AUPRO from the cached sort), ``stream-exact-finalize`` (the same with finalize_class at each
class end, so one class is held at a time), ``stream-binned`` (K = 65536 bins), ``batch``
(each functional metric per class on the class's maps), ``naive`` (the reference legacy
AUPRO loop -- 200 thresholds x relabel every mask with skimage.measure.label + regionprops --
on a subset of maps, scaled linearly by map count to the whole workload).

Usage: python benchmarks/metrics.py [--small] [--json PATH] [--naive-maps N]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from throughput import PeakRss, cpu_model  # same folder

from crane.files import strict_json
from crane.metrics import (
    MetricAccumulator,
    aupro,
    image_metrics,
    pixel_auroc,
    pixel_f1_max,
    pixel_metrics,
)

SIZE = 518
GRID = 37
CHUNK = 16
SEED = 2024
MVTEC_CLASSES = (
    "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush "
    "transistor wood zipper"
).split()


@dataclass(frozen=True)
class Workload:
    classes: tuple[str, ...]
    n_images: tuple[int, ...]
    n_anomalous: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.n_images)


def _split(total: int, parts: int) -> tuple[int, ...]:
    q, r = divmod(total, parts)
    return tuple(q + (i < r) for i in range(parts))


def workload(small: bool) -> Workload:
    n_cls, total, anomalous = (5, 100, 73) if small else (15, 1725, 1258)
    return Workload(tuple(MVTEC_CLASSES[:n_cls]), _split(total, n_cls), _split(anomalous, n_cls))


def make_sample(index: int, anomalous: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """One deterministic (map, mask, image score)."""
    rng = np.random.default_rng([SEED, index])
    low = torch.from_numpy(rng.standard_normal((1, 1, GRID, GRID)).astype(np.float32))
    field = F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
    logit = field.numpy() * 1.5 - 1.5
    mask = np.zeros((SIZE, SIZE), bool)
    if anomalous:
        for _ in range(int(rng.integers(1, 6))):
            cy, cx = rng.uniform(0, SIZE, 2)
            a = rng.uniform(4, 60)
            b = a * rng.uniform(0.3, 1.0)
            theta = rng.uniform(0, math.pi)
            strength = rng.uniform(0.0, 3.5)
            reach = int(2.5 * a) + 1
            y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, SIZE)
            x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, SIZE)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            dy, dx = yy - cy, xx - cx
            u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
            v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
            r2 = u * u + v * v
            mask[y0:y1, x0:x1] |= r2 <= 1.0
            logit[y0:y1, x0:x1] += strength * np.exp(-0.5 * r2)
        if not mask.any():  # a blob that fell between pixel centres
            mask[min(int(cy), SIZE - 1), min(int(cx), SIZE - 1)] = True
    amap = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    score = float(np.clip(amap.max() + rng.normal(0, 0.08), 0, 1))
    return amap, mask, score


def class_labels(wl: Workload, c: int) -> np.ndarray:
    rng = np.random.default_rng([SEED, 10_000 + c])
    labels = np.zeros(wl.n_images[c], bool)
    labels[: wl.n_anomalous[c]] = True
    return rng.permutation(labels)


def chunks(wl: Workload, classes: range | None = None) -> Iterator[tuple]:
    """(class name, image scores, labels, maps, masks) in chunks of CHUNK images of one class."""
    start = 0
    for c, name in enumerate(wl.classes):
        labels = class_labels(wl, c)
        if classes is None or c in classes:
            for lo in range(0, len(labels), CHUNK):
                samples = [
                    make_sample(start + i, bool(labels[i]))
                    for i in range(lo, min(lo + CHUNK, len(labels)))
                ]
                maps = np.stack([s[0] for s in samples])
                masks = np.stack([s[1] for s in samples])
                scores = np.array([s[2] for s in samples])
                yield name, scores, labels[lo : lo + len(samples)], maps, masks
        start += len(labels)


# ---------------------------------------------------------------- memory


# ---------------------------------------------------------------- workers


def _mean_table(report) -> dict:
    return {k: v for k, v in report.mean.items()}


def worker_stream(wl: Workload, mode: str, finalize: bool) -> dict:
    acc = MetricAccumulator(aupro="mvtec", mode=mode)
    mem = PeakRss()
    gen = chunks(wl)
    first = next(gen)
    mem.start()  # baseline: before any state; the chunk being fed counts as "the maps"
    t_update, held, current = 0.0, 0, None
    for batch in itertools.chain([first], gen):
        name = batch[0]
        if finalize and current is not None and name != current:
            t0 = time.perf_counter()
            acc.finalize_class(current)
            t_update += time.perf_counter() - t0
        current = name
        t0 = time.perf_counter()
        acc.update(*batch)
        t_update += time.perf_counter() - t0
        held = max(held, acc.nbytes())
    t0 = time.perf_counter()
    if finalize and current is not None:
        acc.finalize_class(current)
    report = acc.compute()
    t_compute = time.perf_counter() - t0
    out = {
        "update_s": t_update,
        "compute_s": t_compute,
        "held_state_bytes": held,
        "mean": _mean_table(report),
        "chunk_bytes": CHUNK * SIZE * SIZE * 5,
    }
    if report.bounds is not None:
        out["bound_mean"] = report.mean_bounds
    if not finalize:
        t0 = time.perf_counter()
        legacy = acc.compute(aupro="legacy")  # both definitions were computed and kept
        out["legacy_compute_s"] = time.perf_counter() - t0
        out["legacy_aupro_mean"] = legacy.mean["pixel_aupro"]
        if legacy.bounds is not None:
            out["legacy_bound_mean"] = legacy.mean_bounds["pixel_aupro"]
    out["peak_extra_bytes"] = mem.peak()
    out["peak_exact"] = mem.exact
    return out


BATCH_FUNCS = {
    "pixel_auroc": lambda m, g: pixel_auroc(m, g),
    "pixel_f1_max": lambda m, g: pixel_f1_max(m, g),
    "aupro_mvtec": lambda m, g: aupro(m, g, "mvtec"),
    "aupro_legacy": lambda m, g: aupro(m, g, "legacy"),
    "pixel_metrics (all 3, mvtec)": lambda m, g: pixel_metrics(m, g),
}


def worker_batch(wl: Workload) -> dict:
    times = dict.fromkeys([*BATCH_FUNCS, "image_metrics"], 0.0)
    peaks = dict.fromkeys(times, 0)
    mem = PeakRss()
    exact = True
    for c in range(len(wl.classes)):
        parts = list(chunks(wl, range(c, c + 1)))
        maps = np.concatenate([p[3] for p in parts])
        masks = np.concatenate([p[4] for p in parts])
        scores = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([p[2] for p in parts])
        del parts
        for name, fn in BATCH_FUNCS.items():
            mem.start()
            t0 = time.perf_counter()
            fn(maps, masks)
            times[name] += time.perf_counter() - t0
            peaks[name] = max(peaks[name], mem.peak())
            exact &= mem.exact
        mem.start()
        t0 = time.perf_counter()
        image_metrics(scores, labels)
        times["image_metrics"] += time.perf_counter() - t0
        peaks["image_metrics"] = max(peaks["image_metrics"], mem.peak())
        del maps, masks
    return {"time_s": times, "peak_extra_bytes": peaks, "peak_exact": exact}


def naive_legacy(maps: np.ndarray, masks: np.ndarray, max_step: int = 200) -> float:
    """The reference algorithm (cal_pro_score), kept literal for timing."""
    from skimage import measure
    from sklearn.metrics import auc

    binary = np.zeros_like(maps, dtype=bool)
    lo, hi = float(maps.min()), float(maps.max())
    pros, fprs = [], []
    inverse = 1 - masks.astype(np.int64)
    for th in np.arange(lo, hi, (hi - lo) / max_step):
        binary[maps <= th], binary[maps > th] = 0, 1
        pro = []
        for b, mask in zip(binary, masks, strict=True):
            for region in measure.regionprops(measure.label(mask.astype(np.int64))):
                pro.append(b[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
        pros.append(np.mean(pro))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    x = fprs[keep]
    return float(auc((x - x.min()) / (x.max() - x.min()), pros[keep]))


def worker_naive(wl: Workload, n_maps: int) -> dict:
    parts = list(chunks(wl, range(0, 1)))
    maps = np.concatenate([p[3] for p in parts])[:n_maps]
    masks = np.concatenate([p[4] for p in parts])[:n_maps]
    t0 = time.perf_counter()
    ref = naive_legacy(maps, masks)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = aupro(maps, masks, "legacy")
    t_ours = time.perf_counter() - t0
    return {
        "maps": int(maps.shape[0]),
        "anomalous_maps": int(masks.reshape(len(masks), -1).any(1).sum()),
        "naive_s": t_naive,
        "ours_s": t_ours,
        "naive_value": ref,
        "ours_value": ours,
    }


# ---------------------------------------------------------------- driver


def _run_worker(args: argparse.Namespace, name: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name]
    cmd += ["--small"] if args.small else []
    cmd += ["--naive-maps", str(args.naive_maps)]
    print(f"  running {name} ...", file=sys.stderr, flush=True)
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        print(exc.stderr, file=sys.stderr)  # (the worker's traceback; check=True hides it)
        raise
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="100 maps instead of 1725")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--naive-maps", type=int, default=None, help="maps for the naive loop")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_maps is None:
        args.naive_maps = 8 if args.small else 16
    wl = workload(args.small)

    if args.worker:
        result = {
            "stream-exact": lambda: worker_stream(wl, "exact", finalize=False),
            "stream-exact-finalize": lambda: worker_stream(wl, "exact", finalize=True),
            "stream-binned": lambda: worker_stream(wl, "binned", finalize=False),
            "batch": lambda: worker_batch(wl),
            "naive": lambda: worker_naive(wl, args.naive_maps),
        }[args.worker]()
        print(json.dumps(result))
        return

    runs = ["stream-exact", "stream-exact-finalize", "stream-binned", "batch", "naive"]
    res = {name: _run_worker(args, name) for name in runs}
    n_pixels = wl.total * SIZE * SIZE
    maps_bytes = n_pixels * 4
    ex, fin, bn, batch, naive = (res[r] for r in runs)

    naive_per_map = naive["naive_s"] / naive["maps"]
    naive_total = naive_per_map * wl.total
    ours_legacy = batch["time_s"]["aupro_legacy"]
    stream_all = ex["update_s"] + ex["compute_s"] + ex["legacy_compute_s"]

    lines = []
    w = lines.append
    w(
        f"workload: {len(wl.classes)} classes, {wl.total} maps of {SIZE}x{SIZE} "
        f"({sum(wl.n_anomalous)} anomalous), {n_pixels / 1e6:.0f} M pixels, "
        f"float32 maps {_gb(maps_bytes)}"
    )
    w(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}; "
        f"date {datetime.date.today().isoformat()}"
    )
    w("")
    w("| run | time (s) | peak RSS beyond baseline | state held |")
    w("|---|---:|---:|---:|")
    w(
        f"| stream exact: update() x {math.ceil(wl.total / CHUNK)} batches (label regions, "
        f"copy maps) | {ex['update_s']:.2f} | | |"
    )
    w(
        "| stream exact: compute() -- image metrics, pixel AUROC, F1-max, AUPRO mvtec and "
        f"legacy | {ex['compute_s']:.2f} | | |"
    )
    w(
        f"| stream exact: compute(aupro='legacy') afterwards (kept results) | "
        f"{ex['legacy_compute_s']:.3f} | | |"
    )
    w(
        f"| **stream exact total, all pixel metrics (both AUPROs)** | **{stream_all:.2f}** | "
        f"{_gb(ex['peak_extra_bytes'])} | {_gb(ex['held_state_bytes'])} |"
    )
    w(
        f"| stream exact + finalize_class at each class end | "
        f"{fin['update_s'] + fin['compute_s']:.2f} | {_gb(fin['peak_extra_bytes'])} | "
        f"{_gb(fin['held_state_bytes'])} |"
    )
    w(
        f"| stream binned K=65536, update + compute | "
        f"{bn['update_s'] + bn['compute_s']:.2f} | {_gb(bn['peak_extra_bytes'])} | "
        f"{bn['held_state_bytes'] / 1e6:.1f} MB |"
    )
    for name, t in batch["time_s"].items():
        w(
            f"| batch `{name}`, summed over classes | {t:.2f} | "
            f"{_gb(batch['peak_extra_bytes'][name])} (max over classes) | |"
        )
    w(
        f"| naive legacy loop on {naive['maps']} maps ({naive['anomalous_maps']} anomalous) | "
        f"{naive['naive_s']:.2f} | | |"
    )
    w("")
    w(
        f"naive legacy, scaled: {naive_per_map:.3f} s/map x {wl.total} maps = "
        f"{naive_total:.0f} s (measured on {naive['maps']} maps of class {wl.classes[0]}, "
        "linear in the number of maps)"
    )
    w(
        f"ours, legacy AUPRO over the full workload (batch `aupro_legacy`): {ours_legacy:.2f} s "
        f"-> {naive_total / ours_legacy:.0f}x faster; on the same {naive['maps']} maps: "
        f"{naive['naive_s'] / naive['ours_s']:.0f}x "
        f"(values {naive['naive_value']:.6f} vs {naive['ours_value']:.6f})"
    )
    w("")
    mean = ex["mean"]
    w(
        "dataset means (exact): "
        + ", ".join(f"{k} {v:.4f}" for k, v in mean.items())
        + f", pixel_aupro(legacy) {ex['legacy_aupro_mean']:.4f}"
    )
    bm = bn["mean"]
    w(
        "dataset means (binned, +- bound): "
        + ", ".join(
            f"{k} {bm[k]:.4f}+-{bn['bound_mean'][k]:.1e}" for k in bm if k.startswith("pixel")
        )
        + f", pixel_aupro(legacy) {bn['legacy_aupro_mean']:.4f}+-{bn['legacy_bound_mean']:.1e}"
    )
    if not all(r.get("peak_exact", True) for r in (ex, fin, bn, batch)):
        w("note: /proc/self/clear_refs unavailable: peaks are process-lifetime peaks")
    if not args.small:
        w("")
        w(
            "targets: all pixel metrics <= 15 s: "
            f"{'met' if stream_all <= 15 else 'MISSED'} ({stream_all:.1f} s); peak RAM beyond "
            f"the maps < 4 GB: {'met' if ex['peak_extra_bytes'] < 4e9 else 'MISSED'}; "
            f">= 100x naive: {'met' if naive_total / ours_legacy >= 100 else 'MISSED'} "
            f"({naive_total / ours_legacy:.0f}x)"
        )
    print("\n".join(lines))
    if args.json:
        payload = {
            "workload": {
                "classes": list(wl.classes),
                "maps": wl.total,
                "anomalous": sum(wl.n_anomalous),
                "size": SIZE,
            },
            "machine": {
                "cpu": cpu_model(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "numpy": np.__version__,
            },
            "date": datetime.date.today().isoformat(),
            "runs": res,
            "naive_scaled_s": naive_total,
            "speedup_vs_naive": naive_total / ours_legacy,
            "stream_exact_all_pixel_s": stream_all,
        }
        with open(args.json, "w") as f:
            json.dump(strict_json(payload), f, indent=2, allow_nan=False)  # (inf bounds: null)


if __name__ == "__main__":
    main()
