"""Throughput and memory of predict (model only / end to end from files) and training epochs.

Compares, in the same run, an fp32 eager *baseline* path (reference-style: text features
recomputed per batch, Gaussian smoothing with scipy on the CPU, one image at a time through
post-processing) with the *optimised* path (cached text features, smoothing/fusion on the
device, autocast bf16 where the device supports it, optional torch.compile). Weights are random:
speed does not depend on their values.

  python benchmarks/throughput.py --device cpu --quick          # tiny presets + 1 full-size image
  python benchmarks/throughput.py --device cuda --json out.json        # full-size presets

Prints a table; --json writes every figure. Accuracy guard: max |bf16 − fp32| of maps and scores.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from crane.engine.predict import Detector
from crane.models import create_model, scoring


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def baseline_forward(model, images: torch.Tensor):
    """Reference-style inference: fp32, text recomputed per batch, scipy Gaussian per map on CPU."""
    cfg = model.cfg
    vis = model.encode_images(images)
    text = model.text_features()
    logits = scoring.patch_logits(vis.patch_sets, text, cfg.pixel_temperature)
    maps = scoring.anomaly_map(logits, images.shape[-1], cfg.map_combine).cpu().numpy()
    maps = np.stack([gaussian_filter(m, sigma=cfg.sigma) for m in maps])
    fused = scoring.fused_image_feature(vis.patch_sets, logits, vis.global_feat, cfg.fusion_alpha)
    scores = torch.softmax(scoring.image_logits(fused, text, cfg.image_temperature), -1)[:, 1].cpu()
    return scores, maps


def time_it(fn, device, warmup=1, reps=3) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def bench_model(
    preset: str,
    device: torch.device,
    batch: int,
    size: int | None,
    amp: str,
    reps: int,
    compile_model: bool,
) -> dict:
    overrides = {"image_size": size} if size else {}
    model = create_model(preset, pretrained=False, **overrides).to(device).eval()
    s = model.cfg.image_size
    x = torch.randn(batch, 3, s, s, device=device)
    out: dict = {"preset": preset, "image_size": s, "batch": batch, "device": str(device)}

    reset_peak(device)
    t = time_it(lambda: baseline_forward(model, x), device, reps=reps)
    out["baseline_fp32_img_s"] = batch / t
    out["baseline_peak_mb"] = peak_mem_mb(device)

    det = Detector(model, device=device, precision="fp32", batch_size=batch)
    reset_peak(device)
    t = time_it(lambda: det.predict_tensor(x), device, reps=reps)
    out["opt_fp32_img_s"] = batch / t
    out["opt_fp32_peak_mb"] = peak_mem_mb(device)
    s32, m32 = det.predict_tensor(x)

    if amp != "fp32":
        det_amp = Detector(model, device=device, precision=amp, batch_size=batch)
        if compile_model:
            det_amp.model = torch.compile(model)  # type: ignore[assignment]
        reset_peak(device)
        t = time_it(
            lambda: det_amp.predict_tensor(x), device, warmup=2 if compile_model else 1, reps=reps
        )
        out[f"opt_{amp}_img_s"] = batch / t
        out[f"opt_{amp}_peak_mb"] = peak_mem_mb(device)
        s16, m16 = det_amp.predict_tensor(x)
        out["max_abs_diff_map"] = float((m16 - m32).abs().max())
        out["max_abs_diff_score"] = float((s16 - s32).abs().max())
    b_scores, b_maps = baseline_forward(model, x)
    out["baseline_vs_opt_fp32_max_abs_diff_map"] = float(np.abs(b_maps - m32.cpu().numpy()).max())
    out["speedup_fp32"] = out["opt_fp32_img_s"] / out["baseline_fp32_img_s"]
    if amp != "fp32":
        out[f"speedup_{amp}"] = out[f"opt_{amp}_img_s"] / out["baseline_fp32_img_s"]
    return out


def bench_end_to_end(
    preset: str,
    device: torch.device,
    n: int,
    batch: int,
    workers: int,
    size: int | None,
    amp: str,
    src_px: int,
    fast_decode: bool = False,
) -> dict:
    overrides = {"image_size": size} if size else {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):
            arr = rng.integers(0, 255, (src_px, src_px, 3), dtype=np.uint8)
            p = Path(tmp) / f"{i:05d}.jpg"
            Image.fromarray(arr).save(p, quality=90)
            paths.append(str(p))
        det = Detector(
            create_model(preset, pretrained=False, **overrides),
            device=device,
            precision=amp,
            batch_size=batch,
            workers=workers,
            fast_decode=fast_decode,
        )
        list(det.predict_iter(paths[: min(n, batch)]))  # warm-up
        reset_peak(device)
        t = time.perf_counter()
        k = sum(1 for _ in det.predict_iter(paths))
        sync(device)
        dt = time.perf_counter() - t
    return {
        "preset": preset,
        "n_files": k,
        "jpeg_px": src_px,
        "workers": workers,
        "batch": batch,
        "precision": amp,
        "fast_decode": fast_decode,
        "end_to_end_img_s": k / dt,
        "peak_mb": peak_mem_mb(device),
    }


def bench_train(preset: str, device: torch.device, n: int, size: int | None, epochs: int) -> dict:
    from crane.engine.features import FeatureCache
    from crane.engine.losses import crane_loss

    overrides = {"image_size": size} if size else {}
    model = create_model(preset, pretrained=False, **overrides).to(device)
    s = model.cfg.image_size
    g = torch.Generator().manual_seed(0)

    class _Random(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            gi = torch.Generator().manual_seed(i)
            mask = torch.zeros(1, s, s)
            if i % 2:
                mask[:, s // 4 : s // 2, s // 4 : s // 2] = 1
            return {
                "image": torch.randn(3, s, s, generator=gi),
                "mask": mask,
                "label": i % 2,
                "path": f"img{i}",
            }

    t = time.perf_counter()
    cache = FeatureCache.build(model, _Random(), device, batch_size=8, progress=False)
    sync(device)
    encode_s = time.perf_counter() - t
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, betas=(0.6, 0.999))
    model.train()
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        order = torch.randperm(n, generator=g)
        for i in range(0, n, 8):
            vis, masks, labels = cache.batch(order[i : i + 8], device)
            loss, _ = crane_loss(
                model.forward_train(vis), masks, labels, s, model.cfg.train_set_multiplicity
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
    return {
        "preset": preset,
        "n_images": n,
        "image_size": s,
        "encode_once_s": encode_s,
        "cached_epoch_s": float(np.median(times)),
        "cache": cache.location,
    }


def table(rows: list[dict], keys: list[str]) -> None:
    keys = list(dict.fromkeys(keys))  # fp32 runs name the same column twice

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
        return "-" if v is None else str(v)

    print("\n| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(cell(r.get(k)) for k in keys) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--quick", action="store_true", help="CPU-sized: tiny presets plus one full-size image"
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--amp", default=None, help="bf16 or fp16 for the optimised path (default: bf16 on CUDA)"
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile the optimised path")
    ap.add_argument("--train-images", type=int, default=1725)
    ap.add_argument("--presets", nargs="+", default=["crane", "crane+"], help="full mode only")
    ap.add_argument("--files", type=int, default=512, help="JPEG files for the end-to-end run")
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers end to end")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    amp = args.amp or ("bf16" if device.type == "cuda" else "fp32")
    results: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": [],
        "end_to_end": [],
        "train": [],
    }
    try:
        results["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if args.quick:
        for preset in ("tiny", "tiny+"):
            results["model"].append(bench_model(preset, device, 8, None, amp, 3, args.compile))
            for fast in (False, True):
                results["end_to_end"].append(
                    bench_end_to_end(preset, device, 32, 8, 2, None, amp, 2048, fast)
                )
            results["train"].append(bench_train(preset, device, 64, None, 3))
        for preset in ("crane", "crane+"):
            results["model"].append(bench_model(preset, device, 1, None, amp, 1, False))
    else:
        for preset in args.presets:
            for batch in (args.batch, 1):
                results["model"].append(
                    bench_model(preset, device, batch, None, amp, 5, args.compile)
                )
            for fast in (False, True):
                results["end_to_end"].append(
                    bench_end_to_end(
                        preset, device, args.files, args.batch, args.workers, None, amp, 2048, fast
                    )
                )
            results["train"].append(bench_train(preset, device, args.train_images, None, 3))

    print(
        f"device: {results['device']} ({results.get('cpu', '')}), threads {results['threads']}, "
        f"torch {results['torch']}, optimised precision {amp}"
    )
    table(
        results["model"],
        [
            "preset",
            "image_size",
            "batch",
            "baseline_fp32_img_s",
            "opt_fp32_img_s",
            f"opt_{amp}_img_s",
            "speedup_fp32",
            f"speedup_{amp}",
            "baseline_peak_mb",
            f"opt_{amp}_peak_mb",
            "max_abs_diff_map",
            "max_abs_diff_score",
        ],
    )
    table(
        results["end_to_end"],
        [
            "preset",
            "n_files",
            "jpeg_px",
            "workers",
            "batch",
            "precision",
            "fast_decode",
            "end_to_end_img_s",
            "peak_mb",
        ],
    )
    table(
        results["train"],
        ["preset", "n_images", "image_size", "encode_once_s", "cached_epoch_s", "cache"],
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
