"""How much of one predict call is its matrix products and attention, at this machine's rates.

Records every matrix product, attention and convolution of one ``Detector.predict_tensor``
call (op, shapes, strides, dtype: a ``TorchDispatchMode``) and counts their FLOPs. It then
replays that sequence of calls, in order, on random tensors of the same layouts, timing each
call, alternating with whole predict calls (so that a machine whose speed drifts slows both
alike). The replayed sequence — the *floor* — is what the calls cost with the kernels this
torch build runs here: removing all other work (norms, elementwise passes, copies, dispatch)
would leave about that much, so a target below it needs fewer FLOPs, other kernels or other
hardware. whole − floor is what the other work costs (negative values: noise, or calls that
run faster inside the model than on fresh tensors).

  python benchmarks/floor.py                                 # crane+ at 518², 1 image, CPU
  python benchmarks/floor.py --preset crane --target-s 10 --json out.json
  python benchmarks/floor.py --device cuda --batch 32 --amp bf16 [--attention cudnn]

On CUDA each call is timed with a synchronisation around it, which adds launch latency to
small calls. Optional ``--peak-gflops P`` adds the bound at P GFLOP/s for every FLOP (e.g. the
FMA peak of the cores). Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from throughput import save, sync  # same folder
from torch.utils._python_dispatch import TorchDispatchMode

from crane.engine.predict import Detector
from crane.engine.runtime import ATTENTION_KERNELS, attention_kernel_used, attention_kernels
from crane.models import create_model, kernels

aten = torch.ops.aten

#: op → category; only these are replayed (everything else is "rest").
CATEGORIES = {
    aten.addmm.default: "gemm",
    aten.mm.default: "gemm",
    aten.bmm.default: "gemm",
    aten.baddbmm.default: "gemm",
    aten.addbmm.default: "gemm",
    aten._addmm_activation.default: "gemm",
    aten.scaled_dot_product_attention.default: "attention",
    aten._scaled_dot_product_flash_attention_for_cpu.default: "attention",
    aten._scaled_dot_product_flash_attention.default: "attention",
    aten._scaled_dot_product_efficient_attention.default: "attention",
    aten._scaled_dot_product_cudnn_attention.default: "attention",
    aten.convolution.default: "conv",
}
# oneDNN's fp32 CPU product (crane.models.kernels, the default there): linear layers, and
# the attentions' products (scores per term, one with v; their softmaxes count as "rest").
ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
if ONEDNN_LINEAR is not None:
    CATEGORIES[ONEDNN_LINEAR.default] = "gemm"


def op_flops(func, args: tuple, out) -> int:
    """Multiply-adds × 2 of one recorded call (bias adds and softmax not counted)."""
    if func in (
        aten.addmm.default,
        aten.baddbmm.default,
        aten.addbmm.default,
        aten._addmm_activation.default,
    ):
        a, b = args[1], args[2]
    elif func in (aten.mm.default, aten.bmm.default):
        a, b = args[0], args[1]
    elif ONEDNN_LINEAR is not None and func == ONEDNN_LINEAR.default:  # x (…, K), w (N, K)
        x, w = args[0], args[1]
        return 2 * math.prod(x.shape[:-1]) * w.shape[1] * w.shape[0]
    elif func == aten.convolution.default:
        w = args[1]  # (Cout, Cin/groups, kh, kw)
        return 2 * math.prod(out.shape) * (w.shape[1] * math.prod(w.shape[2:]))  # Cin/groups·kh·kw
    elif CATEGORIES.get(func) == "attention":
        q, k, v = args[:3]
        batch = math.prod(q.shape[:-2])
        lq, lk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        return 2 * batch * lq * lk * d + 2 * batch * lq * lk * dv
    else:
        return 0
    batch = math.prod(a.shape[:-2])
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self, device: torch.device) -> torch.Tensor:
        """Random values in the recorded layout (also overlapping ones, e.g. expanded)."""
        span = 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride, strict=True))
        span = span if all(self.shape) else 0
        if self.dtype.is_floating_point:
            base = torch.randn(span, device=device).to(self.dtype)
        else:
            base = torch.zeros(span, dtype=self.dtype, device=device)
        return base.as_strided(self.shape, self.stride)


def _spec(x):
    if isinstance(x, torch.Tensor):
        return TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_spec(y) for y in x)
    return x


def _build(x, device):
    if isinstance(x, TensorSpec):
        return x.make(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_build(y, device) for y in x)
    return x


@dataclass
class Call:
    """One distinct (op, argument layout) and how often the forward ran it."""

    func: object
    args: tuple
    kwargs: dict
    flops: int
    tf32: tuple[bool, bool] = (False, False)  # CUDA matmul / cuDNN TF32 switches at the call
    kernel: str | None = None  # the kernel the public SDPA op dispatched to (flash, cudnn...)
    count: int = 0
    samples: list = field(default_factory=list)  # seconds of each replayed call

    @property
    def seconds(self) -> float:
        """Median replayed time of one call (NaN before any replay)."""
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def category(self) -> str:
        return CATEGORIES[self.func]

    def describe(self) -> str:
        shapes = [list(a.shape) for a in self.args if isinstance(a, TensorSpec)]
        kernel = f" ({self.kernel})" if self.kernel else ""
        return f"{self.func.__name__}{kernel} {shapes}"


class OpRecorder(TorchDispatchMode):
    """Records the GEMM/attention/convolution calls run inside it, grouped by layout.

    Composite ops are decomposed down to these; attention is recorded at the highest level
    the dispatcher shows (the public SDPA op when it arrives whole, else the backend op).
    """

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, Call] = {}
        self.sequence: list[Call] = []  # in the order the forward ran them

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in CATEGORIES:
            # Under inference_mode composite ops (linear, matmul, conv2d, einsum) arrive
            # whole: run their decomposition so the products inside reach this mode (as
            # torch.utils.flop_counter does). Attention is never decomposed.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if func in CATEGORIES:
            tf32 = _tf32_flags()
            kernel = _sdpa_kernel(func, args, kwargs)
            key = (func, repr(_spec(args)), repr(_spec(kwargs)), tf32, kernel)
            call = self.calls.get(key)
            if call is None:
                first = out[0] if isinstance(out, (tuple, list)) else out
                flops = op_flops(func, args, first)
                call = Call(func, _spec(args), _spec(kwargs), flops, tf32, kernel)
                self.calls[key] = call
            call.count += 1
            self.sequence.append(call)
        return out

    def by_category(self) -> dict[str, dict]:
        cats: dict[str, dict] = {}
        for c in self.calls.values():
            row = cats.setdefault(c.category, {"calls": 0, "distinct": 0, "flops": 0, "s": 0.0})
            row["calls"] += c.count
            row["distinct"] += 1
            row["flops"] += c.flops * c.count
            row["s"] += c.seconds * c.count
        return cats


def _sdpa_kernel(func, args: tuple, kwargs: dict) -> str | None:
    """The kernel the public SDPA op picks for these arguments under the current settings."""
    if func != aten.scaled_dot_product_attention.default:
        return None
    q, k, v, *rest = args
    return attention_kernel_used(q, k, v, *rest, **kwargs)


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _with_tf32(flags: tuple[bool, bool], fn):
    """Runs ``fn`` under the TF32 switches a call was recorded with (DINOv2 runs its fp32
    matmuls with TF32 on CUDA inside the forward only)."""
    saved = _tf32_flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    try:
        return fn()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class Replayer:
    """Runs a recorded sequence of calls again, in order, on random tensors of the recorded
    layouts (one set per distinct call, made once), timing each call."""

    def __init__(self, sequence: list[Call], device: torch.device):
        self.sequence, self.device = sequence, device
        self._fns: dict[int, functools.partial] = {}
        with torch.inference_mode():
            for c in sequence:
                if id(c) not in self._fns:
                    args, kwargs = _build(c.args, device), _build(c.kwargs, device)
                    now = _sdpa_kernel(c.func, args, kwargs)
                    if now != c.kernel:
                        raise RuntimeError(
                            f"the replay of {c.describe()} would run the {now} kernel: replay "
                            "under the attention settings the forward ran with"
                        )
                    call = functools.partial(c.func, *args, **kwargs)
                    self._fns[id(c)] = functools.partial(_with_tf32, c.tf32, call)
        self.run(record=False)  # warm-up

    def run(self, record: bool = True) -> float:
        """One pass over the sequence; returns its seconds (each call's go to its samples)."""
        total = 0.0
        with torch.inference_mode():
            for c in self.sequence:
                dt = timed(self._fns[id(c)], self.device)
                total += dt
                if record:
                    c.samples.append(dt)
        return total


def run(
    preset: str, device: torch.device, batch: int, amp: str, reps: int, image_size: int | None
) -> dict:
    over = {"image_size": image_size} if image_size else {}
    model = create_model(preset, pretrained=False, **over)
    s = model.cfg.image_size
    # As throughput.py's optimised path: with autocast, frozen matmul weights in bf16.
    cast = amp != "fp32"
    det = Detector(model, device=device, precision=amp, batch_size=batch, cast_weights=cast)
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device)
    det.predict_tensor(x)  # warm-up: text features (computed once per run), kernel choices
    rec = OpRecorder()
    with torch.inference_mode(), rec:
        det.predict_tensor(x)
    replayer = Replayer(rec.sequence, device)
    # Whole calls and replays alternate, so that a machine whose speed drifts (shared CPUs,
    # clocks) affects both alike.
    whole, replays = [], []
    for _ in range(reps):
        with torch.inference_mode():
            whole.append(timed(lambda: det.predict_tensor(x), device))
        replays.append(replayer.run())
    cats = rec.by_category()
    floor = statistics.median(replays)
    flops = sum(row["flops"] for row in cats.values())
    whole_s = statistics.median(whole)
    rest = [w - f for w, f in zip(whole, replays, strict=True)]
    return {
        "preset": preset,
        "image_size": s,
        "batch": batch,
        "amp": amp,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "categories": cats,
        "gflop": flops / 1e9,
        "floor_s": floor,
        "whole_s": whole_s,
        "whole_runs_s": whole,
        "floor_runs_s": replays,
        # Paired per round (whole call and replay measured back to back), then the median.
        "rest_s": statistics.median(rest),
        "rest_runs_s": rest,
        "calls": [
            {
                "op": c.describe(),
                "category": c.category,
                "count": c.count,
                "gflop": c.flops / 1e9,
                "ms": c.seconds * 1e3,
                "gflop_s": c.flops / c.seconds / 1e9 if c.seconds > 0 else None,
            }
            for c in sorted(rec.calls.values(), key=lambda c: -c.seconds * c.count)
        ],
    }


def _span(values: list[float], batch: int) -> str:
    return f"{min(values) / batch:.3g}–{max(values) / batch:.3g}"


def report(res: dict, target_s: float | None, peak_gflops: float | None, verbose: bool) -> str:
    b = res["batch"]
    lines = [
        f"{res['preset']} at {res['image_size']}², batch {b}, {res['amp']}, {res['device']}, "
        f"{res['threads']} threads — GFLOP and seconds per image:",
        "| part | calls per batch | distinct | GFLOP | replayed s | GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in sorted(res["categories"].items()):
        rate = row["flops"] / row["s"] / 1e9 if row["s"] > 0 else float("nan")
        lines.append(
            f"| {name} | {row['calls']} | {row['distinct']} | {row['flops'] / b / 1e9:.1f} "
            f"| {row['s'] / b:.3g} | {rate:.0f} |"
        )
    lines += [
        f"| **floor** (the calls replayed in order) | | | {res['gflop'] / b:.1f} "
        f"| **{res['floor_s'] / b:.3g}** | {res['gflop'] / res['floor_s']:.0f} |",
        f"| whole call | | | | {res['whole_s'] / b:.3g} | {res['gflop'] / res['whole_s']:.0f} |",
        f"| rest (norms, elementwise, copies, overhead) | | | | {res['rest_s'] / b:.3g} | |",
        "",
        f"Medians of {len(res['whole_runs_s'])} alternating runs (whole call "
        f"{_span(res['whole_runs_s'], b)} s, floor {_span(res['floor_runs_s'], b)} s, rest "
        f"{_span(res['rest_runs_s'], b)} s per "
        "image); rest is the median of each round's whole − floor; a part's time is its calls × "
        "the median replayed call.",
    ]
    if peak_gflops:
        lines.append(
            f"At {peak_gflops:g} GFLOP/s for every FLOP: {res['gflop'] / b / peak_gflops:.2f} s."
        )
    if target_s is not None:
        floor = res["floor_s"] / b
        verdict = (
            "below the floor: not reachable with these kernels on this machine"
            if target_s < floor
            else f"above the floor: {res['rest_s'] / b:.3g} s of other work to remove"
            if target_s < res["whole_s"] / b
            else "met"
        )
        lines.append(f"Target {target_s:g} s per image: {verdict}.")
    if verbose:
        lines += [
            "",
            "| call | × per batch | GFLOP per call | ms per call | GFLOP/s |",
            "|---|---|---|---|---|",
        ]
        for c in res["calls"]:
            rate = f"{c['gflop_s']:.0f}" if c["gflop_s"] else "-"
            lines.append(
                f"| {c['op']} | {c['count']} | {c['gflop']:.2f} | {c['ms']:.2f} | {rate} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="crane+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--amp", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3, help="samples per timing (median)")
    ap.add_argument("--target-s", type=float, default=None, help="seconds per image to check")
    ap.add_argument("--peak-gflops", type=float, default=None)
    ap.add_argument("--verbose", action="store_true", help="one row per distinct call")
    ap.add_argument(
        "--attention",
        default="auto",
        choices=list(ATTENTION_KERNELS),
        help="fused attention kernel tried first, in the predict calls and their replays",
    )
    ap.add_argument(
        "--cpu-kernels",
        default=kernels.get_cpu_kernels(),
        choices=list(kernels.CPU_KERNELS),
        help="fp32 CPU products and attention (crane.models.kernels): oneDNN's (each head's "
        "attention is then recorded as products and a softmax; E-Attn's three terms share one "
        "product with v) or torch's; default: what crane uses on this CPU "
        f"({kernels.get_cpu_kernels()} here: oneDNN with AVX-512, else torch's)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.batch < 1:
        ap.error("--reps and --batch must be at least 1")
    device = torch.device(args.device)
    # The replayed attentions pick their kernel too.
    with attention_kernels(args.attention), kernels.cpu_kernels(args.cpu_kernels):
        res = run(args.preset, device, args.batch, args.amp, args.reps, args.image_size)
    res["attention"] = args.attention
    res["cpu_kernels"] = args.cpu_kernels
    res["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    print(report(res, args.target_s, args.peak_gflops, args.verbose))
    save(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
