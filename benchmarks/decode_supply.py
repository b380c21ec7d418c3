"""How fast predict's decode workers supply images, with and without ``device_resize``.

``Detector(device_resize=True)`` (``crane predict --device-resize``) has the workers decode
large photos exactly as the reference does but leave the resize (PIL's bicubic, reproduced bit
for bit) to the GPU; the workers then ship full-size pixels instead of 518² ones. This times
predict's loader alone — workers decoding chunks, the main process joining them into batches
(pinned where CUDA exists), no model and no resize — so the rate is what the workers can
supply to a GPU that resizes for free. Rows alternate between the routes; every rep starts
its own workers (their start is included). Columns: img/s, the main process's CPU seconds per
second (all its threads). A third route is ``device_resize`` as the 20th session built it:
torch's new shared-memory segment for every photo instead of the workers' reused buffers
(``crane.data.handover``). ``--no-heap-reuse`` adds a fourth: ``device_resize`` with the
workers' malloc left as it is (``predict.reuse_freed_memory`` off). ``--main-copy`` has the
main process copy every image once (where CUDA pins them, the pinning thread does), so the
rate includes that cost on a machine without a GPU.

  python benchmarks/decode_supply.py --workers 2 --files 96 --reps 3 --json out.json
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from throughput import host, make_jpegs, save  # same folder

from crane.engine import predict as predict_module
from crane.engine.predict import _rebatch, decode_loader

ROUTES = {  # name → (device_resize, heap reuse in the workers, reused hand-over buffers)
    "reference (decode + resize)": (False, True, True),
    "device_resize (decode only)": (True, True, True),
    "device_resize, a new segment per photo": (True, True, False),
    "device_resize, no heap reuse": (True, False, True),
}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def supply(
    paths: list[str],
    size: int,
    batch: int,
    workers: int,
    device_resize: bool,
    heap: bool = True,
    pool: bool = True,
    main_copy: bool = False,
) -> dict:
    reuse, pool_class = predict_module.reuse_freed_memory, predict_module.HandoverPool
    if not heap:
        predict_module.reuse_freed_memory = lambda worker_id: None
    if not pool:  # as before the 21st session: torch's fresh segment for every photo
        predict_module.HandoverPool = lambda: None
    try:
        loader, jobs = decode_loader(
            size, None, batch, workers, device_resize=device_resize,
            pin_memory=device_resize and torch.cuda.is_available(),  # as Detector's loader
        )  # fmt: skip
    finally:
        predict_module.reuse_freed_memory, predict_module.HandoverPool = reuse, pool_class
    jobs.keys = list(enumerate(paths))
    cpu0, t = _cpu_s(), time.perf_counter()
    n = raw = 0
    sink = torch.empty(0, dtype=torch.uint8)  # main_copy: one reused destination
    for b in _rebatch(loader, batch, pin=torch.cuda.is_available()):
        n += len(b["ok"])
        raw += sum("raw" in item for item in b["ok"])
        if main_copy:  # read every photo once in the main process, as pinning would
            for px in [item["raw"] for item in b["ok"] if "raw" in item] + [b["images"]]:
                if px is not None:
                    sink.resize_(px.numel()).view(px.shape).copy_(px)
    dt = time.perf_counter() - t
    return {
        "device_resize": device_resize,
        "heap_reuse": heap,
        "handover_pool": pool,
        "main_copy": main_copy,
        "workers": workers,
        "n_files": n,
        "n_unresized": raw,
        "img_s": n / dt,
        "main_cpu_per_s": (_cpu_s() - cpu0) / dt,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=96)
    ap.add_argument("--px", type=int, default=2048, help="JPEG side")
    ap.add_argument("--size", type=int, default=518, help="model input side")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-heap-reuse", action="store_true", help="also without heap reuse")
    ap.add_argument(
        "--main-copy",
        action="store_true",
        help="copy every image once in the main process (where no GPU pins them: its cost)",
    )
    args = ap.parse_args(argv)
    results = {**host(), "args": vars(args), "rows": [], "summary": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.files, args.px, max(1, args.workers))
        routes = list(ROUTES)[: 4 if args.no_heap_reuse else 3]
        for rep in range(args.reps):
            for name in routes:
                row = supply(
                    paths, args.size, args.batch, args.workers, *ROUTES[name],
                    main_copy=args.main_copy,
                )  # fmt: skip
                results["rows"].append({"route": name, **row, "rep": rep})
                print(results["rows"][-1], flush=True)
                save(results, args.json)
    print(f"\n{args.files} JPEGs of {args.px} px, {args.workers} workers, {results['cpu']}")
    print("\n| route | img/s (median) | range | main-process CPU per s |\n|---|---|---|---|")
    for name in routes:
        rows = [r for r in results["rows"] if r["route"] == name]
        rates = [r["img_s"] for r in rows]
        summary = {
            "route": name,
            "device_resize": ROUTES[name][0],
            "img_s_median": statistics.median(rates),
            "img_s_min": min(rates),
            "img_s_max": max(rates),
            "main_cpu_per_s": statistics.median(r["main_cpu_per_s"] for r in rows),
        }
        results["summary"].append(summary)
        print(
            f"| {name} | {summary['img_s_median']:.1f} | {summary['img_s_min']:.1f}–"
            f"{summary['img_s_max']:.1f} | {summary['main_cpu_per_s']:.2f} |"
        )
    save(results, args.json)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main())
