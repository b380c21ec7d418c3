"""Crane+'s attentions under each fused-attention kernel (``--attention``): the kernel torch
really runs, ms per call, TFLOP/s and max |Δ| to an fp32 reference, at 518².

The inputs are laid out as the model passes them (views of one qkv projection: the strides
decide which kernels accept a call). Per image Crane+ runs 81 CLIP attentions (24 blocks + 3
E-Attn terms in each of 19 blocks; 16 heads × 1370 tokens × 64, bf16 under autocast; the
E-Attn terms use q = k) and 12 DINOv2 ones (12 heads × 1374 tokens × 64; fp16 with the default
``--dino-precision fp16-attention``, fp32 with ``fp32``). In an H200 profile these calls were
61 % of the time a batch needed (3.99 of 6.54 ms per image of GEMM and attention time),
CLIP's at 340 TFLOP/s.
The summary estimates each setting's attention time per image from the rows.

  python benchmarks/attention.py --device cuda --batch 32 --json out.json
  python benchmarks/attention.py --device cpu --batch 1     # one fused kernel and math only

On the CPU torch keeps its one fused kernel whatever the order says, so the named CUDA
kernels show "same as auto" there.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch
import torch.nn.functional as F
from throughput import save  # same folder

from crane.engine.runtime import ATTENTION_KERNELS, attention_kernel_used, attention_kernels
from crane.models.vision import _heads

#: name -> (heads, tokens, dtype on CUDA, calls per Crane+ image)
SHAPES = {
    "CLIP ViT-L/14 (E-Attn q=k)": (16, 1370, torch.bfloat16, 81),
    "DINOv2-B/14, fp16 attention": (12, 1374, torch.float16, 12),
    "DINOv2-B/14, fp32 attention": (12, 1374, torch.float32, 12),
}
HEAD_DIM = 64


def timed_ms(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (kernel selection, cuDNN plans)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def model_layout(
    shape: str, batch: int, heads: int, tokens: int, dtype, dev, g
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the model hands them to the kernel — views of one qkv projection, whose
    strides decide which kernels accept them: CLIP's through the vision loop's ``_heads``,
    DINOv2's as timm's Attention permutes them."""
    width = heads * HEAD_DIM
    qkv = torch.randn(batch, tokens, 3 * width, device=dev, generator=g).to(dtype)
    if shape.startswith("CLIP"):
        return tuple(_heads(t, heads) for t in qkv.chunk(3, -1))
    qkv = qkv.reshape(batch, tokens, 3, heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
    return tuple(qkv.unbind(0))


def reference(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q qᵀ/√d) v in fp32 without TF32, materialised (first image only)."""
    q, v = q[:1].float(), v[:1].float()
    with _no_tf32():
        s = (q @ q.transpose(-1, -2)) / HEAD_DIM**0.5
        return torch.softmax(s, dim=-1) @ v


class _no_tf32:
    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per call (default 32; CPU 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls (median; default 20/3)")
    ap.add_argument("--tokens", type=int, default=None, help="override the token counts")
    ap.add_argument(
        "--kernels", nargs="+", default=list(ATTENTION_KERNELS), choices=list(ATTENTION_KERNELS)
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    on_cuda = dev.type == "cuda"
    batch = args.batch or (32 if on_cuda else 1)
    reps = args.reps or (20 if on_cuda else 3)
    rows: list[dict] = []
    results = {
        "device": torch.cuda.get_device_name(dev) if on_cuda else "cpu",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if on_cuda else None,
        "batch": batch,
        "rows": rows,
    }
    g = torch.Generator(device=dev).manual_seed(0)
    # The CPU path runs its attentions in fp32 (CLIP's included); no fp16 DINOv2 there.
    shapes = {
        s: (h, n, dt if on_cuda else torch.float32, c)
        for s, (h, n, dt, c) in SHAPES.items()
        if on_cuda or not s.endswith("fp16 attention")
    }
    for shape, (heads, tokens, dtype, calls) in shapes.items():
        n = args.tokens or tokens
        # Activation-like scale: unit-variance entries give logits of O(√d)/√d = O(1).
        q, _, v = model_layout(shape, batch, heads, n, dtype, dev, g)
        ref = reference(q, v)
        timed: dict[str, str] = {}  # kernel run -> the setting that timed it
        gflop = 4 * batch * heads * n * n * HEAD_DIM / 1e9
        for name in args.kernels:
            with attention_kernels(name):
                used = attention_kernel_used(q, q, v)
                row = {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "setting": name}
                row.update(kernel=used, calls_per_image=calls, gflop_per_call=gflop)
                if used in timed:
                    row["same_as"] = timed[used]
                else:
                    call = functools.partial(F.scaled_dot_product_attention, q, q, v)
                    row["max_abs_diff"] = float((call()[:1].float() - ref).abs().max())
                    ms = timed_ms(call, dev, reps)
                    row.update(ms_per_call=ms, tflop_s=gflop / ms)
                    timed[used] = name
            rows.append(row)
            print(row, flush=True)
            save(results, args.json)
        del q, v, ref
    # Per image: every CLIP call plus the DINOv2 calls of one precision, per setting.
    by = {(r["shape"], r["kernel"]): r for r in rows if "ms_per_call" in r}
    summary = []
    for dino in [s for s in shapes if s.startswith("DINOv2")]:
        for name in args.kernels:
            total, kernels = 0.0, []
            for shape in (next(iter(SHAPES)), dino):
                row = next((r for r in rows if r["shape"] == shape and r["setting"] == name), None)
                if row is None:
                    break
                timed_row = by[(shape, row["kernel"])]
                total += row["calls_per_image"] * timed_row["ms_per_call"] / batch
                kernels.append(row["kernel"])
            else:
                summary.append(
                    {"dino": dino, "setting": name, "kernels": "/".join(kernels), "ms": total}
                )
    results["per_image"] = summary
    save(results, args.json)

    print(f"\n{results['device']}, torch {results['torch']}, cuDNN {results['cudnn']}, "
          f"batch {batch}, median of {reps}")  # fmt: skip
    print("| shape | dtype | setting | kernel run | ms per call | TFLOP/s | max abs Δ |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['shape']} | {r['dtype']} | {r['setting']} | {r['kernel']} "
        if "same_as" in r:
            print(head + f"| same as {r['same_as']} | | |")
        else:
            ms, tf, d = r["ms_per_call"], r["tflop_s"], r["max_abs_diff"]
            print(head + f"| {ms:.3f} | {tf:.3g} | {d:.1e} |")
    print("\nattention per Crane+ image (81 CLIP calls + 12 DINOv2 calls):")
    print("| DINOv2 attention | setting | kernels (CLIP/DINOv2) | ms per image |")
    print("|---|---|---|---|")
    for s in summary:
        print(f"| {s['dino']} | {s['setting']} | {s['kernels']} | {s['ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
