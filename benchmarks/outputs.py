"""What writing `crane predict`'s files costs, apart from the model.

For each JPEG an overlay is drawn at the photo's own size and saved as PNG (what
``run_predict`` does per image, from a smooth S×S anomaly map), and optionally the map is saved
as .npy at that size. Rows: the way it first ran (in the loop, Pillow's default zlib level 6);
then at each thread count (0: in the loop; else beside it on ``OutputWriter`` threads) Pillow
at zlib level 1 with the run-length strategy (the default of the 12th-16th sessions) and
``crane.viz.png_bytes`` (the same zlib settings, every row filtered Up instead of Pillow's
per-row adaptive choice: the default since); and as JPEG (``--overlay-format jpg``) on the
most threads.

  python benchmarks/outputs.py --files 48 --px 2048 --threads 0 2 --json results/outputs.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from throughput import host, make_jpegs, save  # same folder

from crane.data.imageio import load_image
from crane.engine.predict import _write_map
from crane.engine.writer import OutputWriter, default_write_threads
from crane.viz import overlay, resize_map, save_png, write_overlay


def smooth_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """A model-like S×S map: a few smooth blobs in [0, 1]."""
    return resize_map(rng.random((37, 37), dtype=np.float32) ** 4, size, size)


# Row kinds: how an overlay is saved.
KINDS = {
    "png-pillow": "Pillow default (level 6)",  # the first default
    "png-pillow-fast": "Pillow, level 1, RLE",  # the 12th-16th sessions' default
    "png": "Up filter, level 1, RLE",
    "jpg": "JPEG q90",
}


def run(
    paths: list[str], maps: list[np.ndarray], out: Path, threads: int, kind: str, npy: bool
) -> float:
    suffix = "jpg" if kind == "jpg" else "png"

    def job(path: str, amap: np.ndarray, name: str) -> None:
        if kind == "png-pillow":
            save_png(overlay(load_image(path), amap), out / f"{name}.png", fast=False)
        elif kind == "png-pillow-fast":
            overlay(load_image(path), amap).save(
                out / f"{name}.png", format="PNG", compress_level=1, compress_type=zlib.Z_RLE
            )
        else:
            write_overlay(out / f"{name}.{suffix}", path, amap)
        if npy:
            with Image.open(path) as im:
                w, h = im.size
            _write_map(out / f"{name}.npy", resize_map(amap, h, w))

    t = time.perf_counter()
    with OutputWriter(threads) as writer:
        for i, (path, amap) in enumerate(zip(paths, maps, strict=True)):
            writer.submit(job, path, amap, f"{i:05d}")
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--px", type=int, default=2048, help="JPEG side in pixels")
    ap.add_argument("--size", type=int, default=518, help="anomaly map side (model input)")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0, default_write_threads()],
        help="writer threads per row (0: in the loop); Pillow's defaults run in the loop only, "
        "JPEG at the last count only",
    )
    ap.add_argument("--maps", action="store_true", help="also save each map as .npy")
    ap.add_argument(
        "--skip-baseline", action="store_true", help="no row with Pillow's defaults in the loop"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    results: dict = {
        **host(),
        "files": args.files,
        "px": args.px,
        "maps": args.maps,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp) / "in", args.files, args.px, os.cpu_count() or 1)
        maps = [smooth_map(rng, args.size) for _ in paths]
        plan = [] if args.skip_baseline else [(0, "png-pillow")]
        plan += [(t, kind) for t in args.threads for kind in ("png-pillow-fast", "png")]
        plan += [(args.threads[-1], "jpg")]
        for k, (threads, kind) in enumerate(plan):
            out = Path(tmp) / f"out{k}"
            out.mkdir()
            dt = run(paths, maps, out, threads, kind, args.maps)
            files = sorted(out.glob("*.jpg" if kind == "jpg" else "*.png"))
            row = {
                "threads": threads,
                "format": KINDS[kind],
                "img_s": len(paths) / dt,
                "ms_per_image": 1e3 * dt / len(paths),
                "overlay_mb": sum(p.stat().st_size for p in files) / len(files) / 2**20,
            }
            results["rows"].append(row)
            print(row, flush=True)
            save(results, args.json)
    print(f"\n{args.files} JPEGs of {args.px} px, {os.cpu_count()} CPUs, maps: {args.maps}")
    print("| writer threads | overlay file | img/s | ms per image | MB per overlay |")
    print("|---|---|---|---|---|")
    for r in results["rows"]:
        print(
            f"| {r['threads']} | {r['format']} | {r['img_s']:.2f} | "
            f"{r['ms_per_image']:.0f} | {r['overlay_mb']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
