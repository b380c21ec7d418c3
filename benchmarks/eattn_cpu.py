"""E-Attn on CPU: three fused attentions against one shared P·V (why the code keeps SDPA).

E-Attn sums softmax(t tᵀ/√d)·v over t ∈ {q, k, v}. Summing the three softmax matrices before
a single product with v needs 8·N²·d FLOPs per head instead of 12 for three fused attentions,
but the matrices must then be materialised: here in row chunks of R queries, all heads at
once, or one head at a time into preallocated buffers. This prints each, with the max |Δ|
from the three SDPAs, for one ViT-L/14 block at 518² (16 heads, 1370 tokens, head dim 64).
All use torch's kernels (MKL products, the fused CPU attention), the fp32 default on AVX2
CPUs; on AVX-512 CPUs the model runs oneDNN's products instead (``crane.models.kernels``,
``cpu_kernels.py``), which this script does not compare.

  python benchmarks/eattn_cpu.py [--tokens 1370] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def three_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return sum(F.scaled_dot_product_attention(t, t, v) for t in (q, k, v))


def shared_pv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    b, h, n, d = q.shape
    ts = [t.reshape(b * h, n, d) for t in (q, k, v)]
    keys = [t.transpose(1, 2) / math.sqrt(d) for t in ts]
    out = torch.empty(b * h, n, d, dtype=q.dtype)
    for s in range(0, n, rows):
        acc = None
        for t, kt in zip(ts, keys, strict=True):
            p = torch.softmax(torch.bmm(t[:, s : s + rows], kt), dim=-1)
            acc = p if acc is None else acc.add_(p)
        torch.bmm(acc, ts[2], out=out[:, s : s + rows])
    return out.view(b, h, n, d)


def shared_pv_per_head(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int
) -> torch.Tensor:
    """:func:`shared_pv` one head at a time into preallocated score buffers (``out=`` products
    and softmax in place): a chunk's three score blocks stay in the L2/L3 caches."""
    b, h, n, d = q.shape
    ts = [t.reshape(b * h, n, d).contiguous() for t in (q, k, v)]
    scaled = [t / math.sqrt(d) for t in ts]
    out = torch.empty(b * h, n, d, dtype=q.dtype)
    buf = torch.empty(3, rows, n, dtype=q.dtype)
    for j in range(b * h):
        for s in range(0, n, rows):
            m = min(rows, n - s)
            for i in range(3):
                torch.mm(scaled[i][j, s : s + m], ts[i][j].T, out=buf[i, :m])
                torch.softmax(buf[i, :m], dim=-1, out=buf[i, :m])
            p = buf[0, :m].add_(buf[1, :m]).add_(buf[2, :m])
            torch.mm(p, ts[2][j], out=out[j, s : s + m])
    return out.view(b, h, n, d)


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=1370)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.tokens, 64, generator=g) for _ in range(3))
    rows = []
    with torch.inference_mode():
        ref = three_sdpa(q, k, v)
        ms = median_ms(lambda: three_sdpa(q, k, v), args.reps)
        flops = 3 * 4 * args.heads * args.tokens**2 * 64
        rows.append({"method": "3 × SDPA", "ms": ms, "gflop": flops / 1e9, "max_abs_diff": 0.0})
        variants = [("shared P·V", shared_pv, r) for r in (64, 128, 256, 512, args.tokens)]
        variants += [("shared P·V per head", shared_pv_per_head, r) for r in (256, 512)]
        for name, fn, r in variants:
            out = fn(q, k, v, r)
            ms = median_ms(lambda fn=fn, r=r: fn(q, k, v, r), args.reps)
            rows.append(
                {
                    "method": f"{name}, {r}-row chunks",
                    "ms": ms,
                    "gflop": 8 * args.heads * args.tokens**2 * 64 / 1e9,
                    "max_abs_diff": float((out - ref).abs().max()),
                }
            )
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, N={args.tokens}")
    print("| method | ms | GFLOP | GFLOP/s | max abs Δ |")
    print("|---|---|---|---|---|")
    for row in rows:
        rate = row["gflop"] / row["ms"] * 1e3
        print(
            f"| {row['method']} | {row['ms']:.1f} | {row['gflop']:.1f} | {rate:.0f} | "
            f"{row['max_abs_diff']:.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
