"""How soon and how steadily evaluate's loader feeds the model: whole batches per worker
against chunks joined in the main process (``crane.engine.batching.ChunkedBatches``).

``crane evaluate`` and the training feature cache read an MVTec-layout dataset (PNG images
and masks) through ``runtime.batch_loader``. Up to the seventeenth session each worker
decoded a whole batch (torch's DataLoader, ``pin_memory`` on CUDA); since, workers decode
chunks of ⌈batch / workers⌉ samples that the main process joins into batches (images pinned
on CUDA). This times the loader alone, both ways in the same run, alternating:

- ``free``: batches taken as fast as they come (the decode rate);
- ``paced``: each batch then held for ``--model-ms`` milliseconds, as a model on a GPU would
  (the main thread sleeps: it waits for the device), so the columns show what the
  consumer would get: overall img/s, and the time to the first batch, worker start included.

  python benchmarks/dataset_loader.py --workers 2 --per-class 64 --json out.json
  python benchmarks/dataset_loader.py --workers 16 --per-class 256 --px 1024 --model-ms 190
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from throughput import host, make_eval_dataset, save  # same folder
from torch.utils.data import DataLoader

from crane.data import AnomalyDataset, collate_skip_none
from crane.engine.runtime import batch_loader


def _whole_batches(ds, batch: int, workers: int, device: torch.device) -> DataLoader:
    """``runtime.batch_loader`` up to the seventeenth session."""
    return DataLoader(
        ds.uint8_view(),
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_skip_none,
        pin_memory=device.type == "cuda",
    )


LOADERS = {
    "whole": _whole_batches,
    "chunked": lambda ds, batch, workers, device: batch_loader(ds, batch, workers, device),
}


def run(ds, loader: str, batch: int, workers: int, model_ms: float) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    first = None
    n = 0
    for b in LOADERS[loader](ds, batch, workers, device):
        if first is None:
            first = time.perf_counter() - t0
        n += len(b["path"])
        if model_ms:
            time.sleep(model_ms / 1e3)
    dt = time.perf_counter() - t0
    return {
        "loader": loader,
        "workers": workers,
        "batch": batch,
        "model_ms_per_batch": model_ms,
        "n_images": n,
        "first_batch_s": first,
        "img_s": n / dt,
        # What the model could do alone at that pace, for scale.
        "model_only_img_s": batch / (model_ms / 1e3) if model_ms else None,
        "total_s": dt,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=64, help="test images per class (2 classes)")
    ap.add_argument("--px", type=int, default=1024, help="PNG side")
    ap.add_argument("--size", type=int, default=518, help="model input side")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--model-ms",
        type=float,
        nargs="+",
        default=[0.0, 190.0],
        help="ms each batch is held (0: free; 190: Crane+ bf16 at batch 32 on an H100)",
    )
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--data", default=None, help="reuse (or create) the dataset here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results: dict = {
        **host(),
        "torch": torch.__version__,
        "pinned": torch.cuda.is_available(),
        "px": args.px,
        "size": args.size,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        if not (root / "meta.json").exists():
            make_eval_dataset(root, args.per_class, args.px, workers=os.cpu_count() or 1)
        ds = AnomalyDataset(root, "test", image_size=args.size)
        for ms in args.model_ms:
            for _ in range(args.reps):
                for loader in LOADERS:
                    row = run(ds, loader, args.batch, args.workers, ms)
                    results["rows"].append(row)
                    print(row, flush=True)
                    save(results, args.json)
    print(
        f"\n{len(ds)} PNGs of {args.px} px with masks → {args.size}², batch {args.batch}, "
        f"{args.workers} workers, {os.cpu_count()} CPUs ({results['cpu']}), "
        f"pinned: {results['pinned']}"
    )
    print("| loader | model ms per batch | first batch (s) | img/s | model alone img/s |")
    print("|---|---|---|---|---|")
    for r in results["rows"]:
        alone = f"{r['model_only_img_s']:.1f}" if r["model_only_img_s"] else "-"
        print(
            f"| {r['loader']} | {r['model_ms_per_batch']:g} | {r['first_batch_s']:.2f} | "
            f"{r['img_s']:.1f} | {alone} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
