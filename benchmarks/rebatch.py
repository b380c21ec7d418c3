"""What the predict decode loader's main process spends joining the workers' chunks into batches.

``Detector`` workers decode chunks of ⌈batch / workers⌉ images; the main process joins them
into model batches (pinned on CUDA). This times that loop alone — no model — over small JPEGs
(decoded and enlarged to the model size: cheap for the workers, so the main process's share
shows), for each chunk size and main-process torch thread count, two ways in the same run:

- ``cat+pin`` (up to the sixteenth session): ``torch.cat`` of the chunks into fresh memory,
  then a copy into a pinned buffer (CUDA only);
- ``direct`` (``predict._take_rows``): the chunks copied once, by numpy on the main thread,
  straight into the pinned buffer (CUDA) or a fresh one (CPU).

Columns: img/s through the loop, the main process's CPU seconds (all its threads) per second
and per chunk, and the time spent joining per batch. Rows alternate between the two ways.

  python benchmarks/rebatch.py --workers 2 --chunks 4 1 --threads 1 2 --json out.json
  python benchmarks/rebatch.py --workers 16 --batch 32 --files 1024 --chunks 2 --threads 0 2
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from throughput import host, make_jpegs, save  # same folder

from crane.engine import predict as predict_module


def _cat_then_pin(
    chunks: list[torch.Tensor], n: int, pin: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The sixteenth session's join, for comparison: torch.cat, then pin."""
    joined = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    rows, rest = joined[:n], joined[n:]
    if pin:
        rows = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True).copy_(rows)
    return rows, [rest] if len(rest) else []


JOINS = {"cat+pin": _cat_then_pin, "direct": predict_module._take_rows}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_loop(paths: list[str], size: int, batch: int, workers: int, chunk: int, join: str) -> dict:
    pin = torch.cuda.is_available()
    spent = [0.0]
    inner = JOINS[join]

    def timed(chunks, n, pin):
        t0 = time.perf_counter()
        out = inner(chunks, n, pin)
        spent[0] += time.perf_counter() - t0
        return out

    loader, jobs = predict_module.decode_loader(size, None, batch, workers, chunk=chunk)
    jobs.keys = list(enumerate(paths))
    n = 0
    with mock.patch.object(predict_module, "_take_rows", timed):
        t0, c0 = time.perf_counter(), _cpu_s()
        batches = 0
        for b in predict_module._rebatch(loader, batch, pin=pin):
            n += len(b["ok"])
            batches += 1
        dt, cpu = time.perf_counter() - t0, _cpu_s() - c0
    n_chunks = -(-len(paths) // chunk)
    return {
        "join": join,
        "workers": workers,
        "chunk": chunk,
        "main_threads": torch.get_num_threads(),
        "img_s": n / dt,
        "main_cpu_per_s": cpu / dt,
        "main_cpu_ms_per_chunk": 1e3 * cpu / n_chunks,
        "join_ms_per_batch": 1e3 * spent[0] / max(batches, 1),
        "pinned": pin,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=256)
    ap.add_argument("--px", type=int, default=256, help="JPEG side (small: cheap to decode)")
    ap.add_argument("--size", type=int, default=518, help="model input side")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunks", type=int, nargs="+", default=[4, 1])
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[0], help="main-process torch threads (0: as is)"
    )
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    before = torch.get_num_threads()
    results: dict = {
        **host(),
        "torch": torch.__version__,
        "files": args.files,
        "px": args.px,
        "size": args.size,
        "batch": args.batch,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.files, args.px, os.cpu_count() or 1)
        try:
            for threads in args.threads:
                torch.set_num_threads(threads or before)
                for chunk in args.chunks:
                    for _ in range(args.reps):
                        for join in JOINS:
                            row = run_loop(paths, args.size, args.batch, args.workers, chunk, join)
                            results["rows"].append(row)
                            print(row, flush=True)
                            save(results, args.json)
        finally:
            torch.set_num_threads(before)
    print(
        f"\n{args.files} JPEGs of {args.px} px → {args.size}², batch {args.batch}, "
        f"{args.workers} workers, {os.cpu_count()} CPUs, pinned: {torch.cuda.is_available()}"
    )
    head = ("join", "chunk", "main threads", "img/s", "main CPU per s", "ms CPU per chunk")
    print("| " + " | ".join((*head, "join ms per batch")) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(
            f"| {r['join']} | {r['chunk']} | {r['main_threads']} | {r['img_s']:.1f} | "
            f"{r['main_cpu_per_s']:.2f} | {r['main_cpu_ms_per_chunk']:.2f} | "
            f"{r['join_ms_per_batch']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
