"""CPU kernels: torch's (MKL sgemm, fused CPU attention) against oneDNN's
(``crane.models.kernels``; the default on AVX-512 CPUs, torch's elsewhere), per op at
Crane+'s shapes and for a whole image, in fp32 or (``--precision bf16``) as a bf16 Detector
runs them.

Ops: every GEMM shape of a Crane+ forward at 518² (CLIP ViT-L/14 over 1370 tokens, DINOv2-B/14
over 1374) and its two attention shapes, inputs laid out as the model passes them; median ms
of ``--reps`` calls, GFLOP/s, max |Δ| to an fp64 computation, and the time per image from the
calls an image makes. Whole: ``Detector.predict_tensor`` on one image, the two kernel sets
alternating for ``--rounds`` rounds (this machine's drift then slows both alike), medians,
and the largest map/score difference between them; with ``--precision bf16`` the fp32
default takes its turn in the same rounds (its speed and the bf16 maps' distance from it).

bf16: CLIP's products under CPU bf16 autocast with bf16-stored weights (``cast_frozen_matmuls``,
what a Detector does), its attention on the bf16 q/k/v they give; DINOv2 stays fp32 (the
default ``dino_fp32``) with fp16-rounded attention (``dino_attn_fp16``). Errors are against
fp64 on the unrounded inputs: each kernel set's whole error.

  python benchmarks/cpu_kernels.py --json results/cpu_kernels.json
  python benchmarks/cpu_kernels.py --only ops --reps 9
  python benchmarks/cpu_kernels.py --precision bf16 --json results/cpu_kernels_bf16.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import sys
import time

import torch
import torch.nn.functional as F
from eattn_cpu import median_ms  # same folder
from throughput import host, random_model, save, table

from crane.engine.predict import Detector
from crane.models import kernels

CLIP_TOKENS, DINO_TOKENS = 1370, 1374
#: name -> (tokens, in, out, calls per Crane+ image at 518²)
GEMMS = {
    "CLIP qkv": (CLIP_TOKENS, 1024, 3072, 24),
    "CLIP out_proj": (CLIP_TOKENS, 1024, 1024, 24 + 19),  # normal path + E-Attn path
    "CLIP mlp fc": (CLIP_TOKENS, 1024, 4096, 23),  # block 24: the class token only
    "CLIP mlp proj": (CLIP_TOKENS, 4096, 1024, 23),
    "DINOv2 qkv": (DINO_TOKENS, 768, 2304, 12),
    "DINOv2 proj": (DINO_TOKENS, 768, 768, 12),
    "DINOv2 mlp fc1": (DINO_TOKENS, 768, 3072, 12),
    "DINOv2 mlp fc2": (DINO_TOKENS, 3072, 768, 12),
}
#: name -> (heads, tokens, terms, calls per image): CLIP's normal path in 23 blocks (the
#: class-token-only query of block 24 left out), E-Attn's three terms (q,q), (k,k), (v,v)
#: sharing v in 19 blocks, DINOv2's 12 blocks. FLOPs count every term's attention in full
#: (what torch computes); oneDNN's shared product with v does 2/3 of E-Attn's.
ATTENTIONS = {
    "CLIP attention": (16, CLIP_TOKENS, 1, 23),
    "CLIP E-Attn (3 terms)": (16, CLIP_TOKENS, 3, 19),
    "DINOv2 attention": (12, DINO_TOKENS, 1, 12),
}


def op_rows(reps: int, precision: str = "fp32") -> list[dict]:
    g = torch.Generator().manual_seed(0)
    bf16 = precision == "bf16"
    rows = []
    for name, (n, d_in, d_out, calls) in GEMMS.items():
        x = torch.randn(n, d_in, generator=g)
        w = torch.randn(d_out, d_in, generator=g) * d_in**-0.5
        b = torch.randn(d_out, generator=g)
        ref = F.linear(x.double(), w.double(), b.double())
        flops = 2 * n * d_in * d_out
        clip = bf16 and name.startswith("CLIP")  # under autocast, weights stored in bf16
        fn = functools.partial(kernels.linear, x, w.bfloat16() if clip else w, b)
        rows.append(_op_row(name, flops, calls, reps, fn, ref, autocast=clip))
    for name, (heads, n, terms, calls) in ATTENTIONS.items():
        qkv = torch.randn(1, n, 3 * heads * 64, generator=g)  # views of one projection
        clip = bf16 and name.startswith("CLIP")
        if clip:  # the bf16 output of the qkv product
            qkv = qkv.bfloat16()
        q, k, v = (t.view(1, n, heads, 64).transpose(1, 2) for t in qkv.chunk(3, -1))
        pairs = [(q, k)] if terms == 1 else [(q, q), (k, k), (v, v)][:terms]
        ref = sum(
            F.scaled_dot_product_attention(a.double(), b.double(), v.double()) for a, b in pairs
        )
        flops = terms * 4 * heads * n * n * 64
        rounding = torch.float16 if bf16 and not clip else None  # DINOv2's fp16 attention
        fn = functools.partial(kernels.attention_sum, pairs, v, rounding=rounding)
        rows.append(_op_row(name, flops, calls, reps, fn, ref, autocast=clip))
    return rows


def _op_row(name, flops, calls, reps, fn, ref, autocast: bool = False) -> dict:
    row = {"op": name, "gflop": flops / 1e9, "calls_per_image": calls, "bf16_autocast": autocast}
    for kind in kernels.CPU_KERNELS:
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with kernels.cpu_kernels(kind), amp:
            ms = median_ms(fn, reps)
            err = float((fn().double() - ref).abs().max())
        row[f"{kind}_ms"] = ms
        row[f"{kind}_gflop_s"] = flops / ms / 1e6
        row[f"{kind}_max_abs_err"] = err
        row[f"{kind}_s_per_image"] = ms * calls / 1e3
    row["speedup"] = row["torch_ms"] / row["onednn_ms"]
    print(f"  {name}: torch {row['torch_ms']:.2f} ms, onednn {row['onednn_ms']:.2f} ms", flush=True)
    return row


def whole_rows(preset: str, size: int, rounds: int, precision: str = "fp32") -> dict:
    """One image through ``Detector.predict_tensor`` with torch's and oneDNN's kernels in
    ``precision``, alternating; for bf16 also the fp32 default (oneDNN) in the same rounds."""
    model = random_model(preset, image_size=size)
    dets = {}
    if precision != "fp32":  # the fp32 default beside it: same weights, uncast
        dets["fp32 onednn"] = (Detector(copy.deepcopy(model), device="cpu"), "onednn")
    det = Detector(model, device="cpu", precision=precision, cast_weights=precision != "fp32")
    dets |= {kind: (det, kind) for kind in kernels.CPU_KERNELS}
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    for d, _ in dets.values():
        d.predict_tensor(x)  # text features: computed once
    times: dict[str, list[float]] = {name: [] for name in dets}
    outs = {}
    for r in range(rounds):
        order = list(dets) if r % 2 == 0 else list(dets)[::-1]
        for name in order:
            d, kind = dets[name]
            with kernels.cpu_kernels(kind):
                t = time.perf_counter()
                outs[name] = d.predict_tensor(x)
                times[name].append(time.perf_counter() - t)
            print(f"  round {r + 1}, {name}: {times[name][-1]:.2f} s", flush=True)
    (s_t, m_t), (s_o, m_o) = outs["torch"], outs["onednn"]
    row = {"preset": preset, "image_size": size, "batch": 1, "rounds": rounds}
    row["precision"] = precision
    for name, ts in times.items():
        key = name.replace(" ", "_")
        row[f"{key}_s"] = sorted(ts)[len(ts) // 2]
        row[f"{key}_s_all"] = [round(t, 3) for t in ts]
    row["speedup"] = row["torch_s"] / row["onednn_s"]
    row["max_abs_diff_map"] = float((m_t - m_o).abs().max())
    row["max_abs_diff_score"] = float((s_t - s_o).abs().max())
    if "fp32 onednn" in outs:  # the accuracy guard: this precision against the fp32 default
        s_f, m_f = outs["fp32 onednn"]
        row["vs_fp32_speedup"] = row["fp32_onednn_s"] / row["onednn_s"]
        row["vs_fp32_max_abs_diff_map"] = float((m_o - m_f).abs().max())
        row["vs_fp32_max_abs_diff_score"] = float((s_o - s_f).abs().max())
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", choices=("ops", "whole"), default=None)
    ap.add_argument("--reps", type=int, default=7, help="calls per op and kernel set")
    ap.add_argument("--rounds", type=int, default=3, help="whole-image rounds")
    ap.add_argument("--preset", default="crane+")
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument(
        "--attention-any-isa",
        action="store_true",
        help="let oneDNN's attention run on this CPU's ISA too (by default only on AVX-512 "
        "CPUs, where it was measured faster): to measure it elsewhere",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.attention_any_isa:
        kernels.ATTENTION_ISA = (*kernels.ATTENTION_ISA, kernels._cpu_capability())
    if not kernels.onednn_available():
        print("this torch build has no usable oneDNN linear op: nothing to compare")
        return 1
    results: dict = {
        "host": host(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "native_bf16": kernels.native_bf16(),
        "cpu_capability": kernels._cpu_capability(),
        "attention_isa": list(kernels.ATTENTION_ISA),
    }
    if args.precision == "bf16" and not kernels.native_bf16():
        print("note: no native bf16 on this CPU: oneDNN's bf16 paths stay off (torch's run)")
    print(f"{results['host']}, torch {torch.__version__}, {results['threads']} threads")
    if args.only in (None, "ops"):
        print(f"ops ({args.precision}, one image's shapes):")
        rows = results["ops"] = op_rows(args.reps, args.precision)
        save(results, args.json)
        table(
            rows,
            [
                "op",
                "gflop",
                "calls_per_image",
                "torch_ms",
                "onednn_ms",
                "torch_gflop_s",
                "onednn_gflop_s",
                "speedup",
                "torch_max_abs_err",
                "onednn_max_abs_err",
            ],
        )
        per_image = {k: sum(r[f"{k}_s_per_image"] for r in rows) for k in kernels.CPU_KERNELS}
        results["ops_s_per_image"] = per_image
        print(
            f"these ops per image: torch {per_image['torch']:.2f} s, "
            f"onednn {per_image['onednn']:.2f} s"
        )
        save(results, args.json)
    if args.only in (None, "whole"):
        print(f"whole image ({args.preset}, {args.image_size}², {args.precision}, batch 1):")
        whole = whole_rows(args.preset, args.image_size, args.rounds, args.precision)
        results["whole"] = whole
        keys = ["preset", "image_size", "precision", "rounds", "torch_s", "onednn_s", "speedup"]
        keys += ["max_abs_diff_map", "max_abs_diff_score"]
        if "fp32_onednn_s" in whole:
            keys += ["fp32_onednn_s", "vs_fp32_speedup", "vs_fp32_max_abs_diff_map"]
            keys += ["vs_fp32_max_abs_diff_score"]
        table([whole], keys)
        save(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
