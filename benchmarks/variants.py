"""Which speed options pay off: one model-only batch through Crane+ under each option, all in
one run, each against the same fp32 reference (random weights; CUDA or CPU).

  python benchmarks/variants.py --device cuda --batch 32 --json out.json [--profile] [--compile]

Variants (bf16 autocast unless named): the default optimised path (frozen matmul weights stored
in bf16, DINOv2 in fp32 with TF32 matmuls and fp16 flash attention); cuDNN's fused attention
tried first (``attention="cudnn"``; torch itself already does on sm90/sm100 with a recent
cuDNN, FlashAttention-2 first elsewhere), also
with DINOv2 in bf16; DINOv2 under fp16 autocast (``dino_fp16``: bf16's rate, TF32's mantissa);
the fp32 tail (D-Attn mixing, ln_post/proj) on TF32 (``tail_tf32``); DINOv2's attention
in fp32 (``dino_attn_fp16=False``, the default until an H200 measured
both); DINOv2 under bf16 autocast; open_clip's MLP modules instead of the one-SiLU MLP;
DINOv2 in strict fp32; weights left in fp32 (autocast casts them every call); in fp32 with
only DINOv2's attention in fp16, and with only DINOv2 in bf16 or in fp16 (DINOv2's own share
of the differences); Crane without DINO, for scale; optionally (--compile) torch.compile of
the default and of DINOv2 in bf16 (also with the TF32 tail) and in fp16, the first two also
with cuDNN attention first.
``--select TEXT`` runs only the matching variants. Prints img/s, peak memory and max |Δ| to
fp32. DINOv2's LayerScale is set to 1 (``--timm-layer-scale`` keeps
timm's 1e-5 init, under which DINOv2's precision is invisible in the maps; see
``throughput.random_model``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time

import torch
from throughput import (  # same folder
    layer_scale_label,
    peak_mem_mb,
    random_model,
    reference_mlp,
    reset_peak,
    save,
    time_it,
    to_host,
)

from crane.engine.predict import Detector
from crane.models.vision import half_precision_attention


def timed(det: Detector, x: torch.Tensor, reps: int) -> tuple[float, float]:
    det.predict_tensor(x)  # warm-up (text features, compilation, cuDNN plans)
    reset_peak(x.device)
    dt = time_it(lambda: to_host(det.predict_tensor(x)), x.device, warmup=1, reps=reps)
    peak = peak_mem_mb(x.device)  # (on the CPU: the RSS growth over the timed calls)
    return x.shape[0] / dt, peak


@contextlib.contextmanager
def dino_autocast_only(dino: torch.nn.Module, dtype: torch.dtype):
    """While open, ``dino.forward_features`` runs under autocast ``dtype`` (fp32 out) even
    inside an fp32 predict: DINOv2's share of the bf16 differences, alone."""
    plain = dino.forward_features

    def run(x):
        with torch.autocast(x.device.type, dtype=dtype):
            return plain(x).float()

    dino.forward_features = run
    try:
        yield
    finally:
        del dino.forward_features  # the class's method again


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="top CUDA kernels of the default")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny+/tiny presets (a smoke test)")
    ap.add_argument(
        "--select",
        nargs="+",
        metavar="TEXT",
        help="only the variants whose name contains one of these (the fp32 reference always runs)",
    )
    ap.add_argument(
        "--timm-layer-scale",
        action="store_true",
        help="keep timm's 1e-5 LayerScale init in DINOv2 (default 1: see random_model)",
    )
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    over = {"image_size": args.image_size} if args.image_size else {}
    plus, plain = ("tiny+", "tiny") if args.tiny else ("crane+", "crane")
    base = random_model(plus, args.timm_layer_scale, **over)
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
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    scale = layer_scale_label(args.timm_layer_scale)
    results = {
        "device": device_name,
        "torch": torch.__version__,
        "preset": plus,
        "dino_layer_scale": scale,
        "rows": rows,
    }
    save(results, args.json)  # after every row: a run cut short keeps what it measured

    def variant(
        name, make, cast=True, compile_model=False, ctx=None, precision="bf16", attention="auto"
    ):
        """Times ``make()``'s model under ``ctx(model)``; variants not selected are not built."""
        if args.select and not any(text in name for text in args.select):
            return None
        t = time.perf_counter()
        model = make()
        det = Detector(
            model,
            device=dev,
            precision=precision,
            batch_size=args.batch,
            cast_weights=cast and precision != "fp32",
            compile=compile_model,
            attention=attention,
        )
        row = {"variant": name}
        with ctx(model) if ctx else contextlib.nullcontext():
            row["img_s"], row["peak_mb"] = timed(det, x, args.reps)
            if model.cfg.use_dattn:  # Δ against the fp32 Crane+ reference
                s16, m16 = (t.cpu() for t in det.predict_tensor(x))
                row["max_abs_diff_map"] = float((m16 - m32).abs().max())
                row["max_abs_diff_score"] = float((s16 - s32).abs().max())
        if compile_model:
            row["compile_plus_timing_s"] = time.perf_counter() - t
        rows.append(row)
        print(row, flush=True)
        save(results, args.json)
        return det

    def fresh():
        return copy.deepcopy(base)

    def with_cfg(**changes):
        def make():
            m = fresh()
            m.cfg = m.vision.cfg = base.cfg.replace(**changes)
            return m

        return make

    det = variant("bf16 default (cast weights, DINO fp32+TF32, fp16 attention)", fresh)
    if det is not None and args.profile and dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            det.predict_tensor(x)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    del det
    # Rows in the order of what they decide (a run cut short keeps the rows done so far).
    variant("bf16 default, TF32 tail", with_cfg(tail_tf32=True))
    variant("bf16 default, cuDNN attention first", fresh, attention="cudnn")
    variant("bf16, DINO bf16, cuDNN attention first", with_cfg(dino_fp32=False), attention="cudnn")
    variant("bf16, DINO fp16", with_cfg(dino_fp32=False, dino_fp16=True))
    variant("bf16, DINO fp32+TF32 with fp32 attention", with_cfg(dino_attn_fp16=False))
    variant("bf16, DINO bf16", with_cfg(dino_fp32=False))
    variant("bf16 default, open_clip's MLP modules", fresh, ctx=lambda m: reference_mlp())
    variant("bf16, DINO strict fp32", with_cfg(dino_tf32=False, dino_attn_fp16=False))
    variant("bf16 autocast, weights fp32", fresh, cast=False)
    # DINOv2's own share of the differences: everything else in fp32.
    variant(
        "fp32 except DINO attention fp16",
        fresh,
        ctx=lambda m: half_precision_attention(),
        precision="fp32",
    )
    variant(
        "fp32 except DINO bf16",
        fresh,
        ctx=lambda m: dino_autocast_only(m.vision.dino, torch.bfloat16),
        precision="fp32",
    )
    variant(
        "fp32 except DINO fp16",
        fresh,
        ctx=lambda m: dino_autocast_only(m.vision.dino, torch.float16),
        precision="fp32",
    )
    variant(f"{plain} (no DINO), bf16 default", lambda: random_model(plain, **over))
    if args.compile:
        compiled = {
            "bf16 default + torch.compile": ({}, "auto"),
            "bf16, DINO bf16 + torch.compile": ({"dino_fp32": False}, "auto"),
            "bf16, DINO bf16 + torch.compile, TF32 tail": (
                {"dino_fp32": False, "tail_tf32": True},
                "auto",
            ),
            "bf16, DINO fp16 + torch.compile": ({"dino_fp32": False, "dino_fp16": True}, "auto"),
            "bf16 default + torch.compile, cuDNN attention first": ({}, "cudnn"),
            "bf16, DINO bf16 + torch.compile, cuDNN attention first": (
                {"dino_fp32": False},
                "cudnn",
            ),
        }
        for label, (changes, attention) in compiled.items():
            variant(label, with_cfg(**changes), compile_model=True, attention=attention)

    print(f"\ndevice {device_name}, torch {torch.__version__}, batch {args.batch}, size {s}")
    print("| variant | img/s | peak MB | max abs Δ map | max abs Δ score |")
    print("|---|---|---|---|---|")
    for r in rows:
        d1, d2, peak = r.get("max_abs_diff_map"), r.get("max_abs_diff_score"), r["peak_mb"]
        print(
            f"| {r['variant']} | {r['img_s']:.3g} | {'-' if peak is None else f'{peak:.0f}'} | "
            f"{'-' if d1 is None else f'{d1:.2e}'} | {'-' if d2 is None else f'{d2:.2e}'} |"
        )
    print(f"DINOv2 LayerScale {scale}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
