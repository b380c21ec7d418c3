"""Which speed options pay off: one model-only batch through Crane+ under each option, all in
one run, each against the same fp32 reference (random weights; CUDA or CPU).

  python benchmarks/variants.py --device cuda --batch 32 --json out.json [--profile] [--compile]

Variants (bf16 autocast unless named): the default optimised path (frozen matmul weights stored
in bf16, DINOv2 in fp32 with TF32 matmuls); DINOv2 in strict fp32; DINOv2's attention in fp16
(``dino_attn_fp16``); DINOv2 under bf16 autocast;
weights left in fp32 (autocast casts them every call); open_clip's MLP modules instead of the
one-SiLU MLP; Crane without DINO, for scale;
optionally (--compile) torch.compile of the default, of DINOv2-in-bf16 and of the default with
fp16 DINO attention. Prints img/s, peak memory and max |Δ| to fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
from throughput import peak_mem_mb, reference_mlp, reset_peak, time_it  # same folder

from crane.engine.predict import Detector
from crane.models import create_model


def timed(det: Detector, x: torch.Tensor, reps: int) -> tuple[float, float]:
    det.predict_tensor(x)  # warm-up (text features, compilation, cuDNN plans)
    reset_peak(x.device)
    dt = time_it(lambda: det.predict_tensor(x), x.device, warmup=1, reps=reps)
    peak = peak_mem_mb(x.device) if x.is_cuda else float("nan")
    return x.shape[0] / dt, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="top CUDA kernels of the default")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    over = {"image_size": args.image_size} if args.image_size else {}
    base = create_model("crane+", pretrained=False, **over)
    s = base.cfg.image_size
    x = torch.randn(args.batch, 3, s, s, generator=torch.Generator().manual_seed(0)).to(dev)

    ref = Detector(base, device=dev, batch_size=args.batch)
    ips32, peak32 = timed(ref, x, max(1, args.reps // 2))
    s32, m32 = (t.cpu() for t in ref.predict_tensor(x))
    base.to("cpu")
    del ref
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    rows = [{"variant": "fp32 (reference)", "img_s": ips32, "peak_mb": peak32}]

    def variant(name, model, cast=True, compile_model=False, ctx=contextlib.nullcontext):
        det = Detector(
            model,
            device=dev,
            precision="bf16",
            batch_size=args.batch,
            cast_weights=cast and dev.type == "cuda",
            compile=compile_model,
        )
        row = {"variant": name}
        with ctx():
            row["img_s"], row["peak_mb"] = timed(det, x, args.reps)
            if model.cfg.use_dattn:  # Δ against the fp32 Crane+ reference
                s16, m16 = (t.cpu() for t in det.predict_tensor(x))
                row["max_abs_diff_map"] = float((m16 - m32).abs().max())
                row["max_abs_diff_score"] = float((s16 - s32).abs().max())
        rows.append(row)
        print(row, flush=True)
        return det

    def with_cfg(**changes):
        m = copy.deepcopy(base)
        m.cfg = m.vision.cfg = base.cfg.replace(**changes)
        return m

    det = variant("bf16 default (cast weights, DINO fp32+TF32)", copy.deepcopy(base))
    if args.profile and dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            det.predict_tensor(x)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    del det
    variant("bf16 default, open_clip's MLP modules", copy.deepcopy(base), ctx=reference_mlp)
    variant("bf16, DINO strict fp32", with_cfg(dino_tf32=False))
    variant("bf16, DINO fp32+TF32 with fp16 flash attention", with_cfg(dino_attn_fp16=True))
    variant("bf16, DINO bf16", with_cfg(dino_fp32=False))
    variant("bf16 autocast, weights fp32", copy.deepcopy(base), cast=False)
    crane = create_model("crane", pretrained=False, **over)
    variant("crane (no DINO), bf16 default", crane)
    if args.compile:
        compiled = {
            "bf16 default + torch.compile": {},
            "bf16, DINO bf16 + torch.compile": {"dino_fp32": False},
            "bf16 default, DINO fp16 flash attention + torch.compile": {"dino_attn_fp16": True},
        }
        for label, changes in compiled.items():
            t = time.perf_counter()
            variant(label, with_cfg(**changes), compile_model=True)
            rows[-1]["compile_plus_timing_s"] = time.perf_counter() - t

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\ndevice {name}, torch {torch.__version__}, batch {args.batch}, size {s}")
    print("| variant | img/s | peak MB | max abs Δ map | max abs Δ score |")
    print("|---|---|---|---|---|")
    for r in rows:
        d1, d2 = r.get("max_abs_diff_map"), r.get("max_abs_diff_score")
        print(
            f"| {r['variant']} | {r['img_s']:.1f} | {r['peak_mb']:.0f} | "
            f"{'-' if d1 is None else f'{d1:.2e}'} | {'-' if d2 is None else f'{d2:.2e}'} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
