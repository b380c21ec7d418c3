"""fp32 matrix products and attention on the CPU through oneDNN.

On x86 CPUs torch runs an fp32 ``linear`` as MKL's sgemm and ``scaled_dot_product_attention``
as its own fused ("flash") CPU kernel. oneDNN, which torch ships and which its inductor uses for
CPU linear layers, has faster fp32 kernels on the CPU this was measured on (2-vCPU AMD EPYC,
Zen 5 with AVX-512, torch 2.14.1; ``benchmarks/cpu_kernels.py``): 380–440 GFLOP/s against MKL's
180–205 at Crane's GEMM shapes, and attention as two oneDNN products around an in-place
softmax (the scores of 512 queries at a time materialised) at 1.2–1.6x the fused kernel's
speed. The arithmetic is fp32 in both: results differ by summation order only (≈ 1e-6
relative; Crane+ maps moved by up to 2e-4 where rounding moved a D-Attn similarity across
its threshold, as any other GEMM would).

:func:`linear` and :func:`attention` use oneDNN where all of this holds, and otherwise are
exactly ``F.linear`` / ``F.scaled_dot_product_attention``:

- the switch is on (the default; :func:`cpu_kernels` ``("torch")`` or the environment variable
  ``CRANE_CPU_KERNELS=torch`` turns it off),
- the CPU is x86 with AVX2 or AVX-512 (attention: AVX-512 only),
- every tensor is an fp32 CPU tensor and CPU autocast is off,
- no autograd graph is being recorded for them (oneDNN's op has no backward),
- not inside ``torch.compile`` (its graphs keep torch's ops: inductor picks its own kernels),
- for attention: torch's fused CPU kernel is not switched off (under
  ``sdpa_kernel([SDPBackend.MATH])`` — ``--attention math`` — torch's reference runs), and
  the problem is large enough for oneDNN to pay off (see :func:`attention`).

Everything else (CUDA, bf16, training the prompts) is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crane.errors import CraneError

log = logging.getLogger(__name__)

CPU_KERNELS = ("onednn", "torch")
ENV_VAR = "CRANE_CPU_KERNELS"

_setting: str | None = None  # None: from the environment variable (read when first needed)


def _check(name: str, where: str) -> str:
    if name not in CPU_KERNELS:
        raise CraneError(f"{where} must be one of {', '.join(CPU_KERNELS)}, got {name!r}")
    return name


def get_cpu_kernels() -> str:
    """The current choice: ``"onednn"`` (default) or ``"torch"``."""
    if _setting is not None:
        return _setting
    return _check(os.environ.get(ENV_VAR, "onednn").strip().lower(), f"${ENV_VAR}")


def set_cpu_kernels(name: str | None) -> None:
    """Process-wide choice of the fp32 CPU kernels (``None``: back to ``$CRANE_CPU_KERNELS``).
    A global, not a context variable: the pipelines may run the model in another thread."""
    global _setting
    _setting = None if name is None else _check(name, "cpu_kernels")


@contextlib.contextmanager
def cpu_kernels(name: str):
    """Inside, fp32 CPU matrix products and attention run on ``name``'s kernels (``"onednn"``
    or ``"torch"``); the previous setting comes back on exit."""
    global _setting
    previous = _setting
    set_cpu_kernels(name)
    try:
        yield
    finally:
        _setting = previous


@functools.cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op, it computes a small product right, and the
    CPU is an x86 one with AVX2 or AVX-512 (where it was measured; elsewhere torch's kernels)."""
    if not torch.backends.mkldnn.is_available() or _cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((5, 7), (3, 7), (3,)))
        ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
    except Exception as exc:  # an op missing or failing on this build/CPU: torch's kernels
        log.info("oneDNN linear unavailable (%s): fp32 CPU products stay on torch's kernels", exc)
        return False
    if not ok:
        log.warning("oneDNN linear gave wrong results here: fp32 CPU products stay on torch's")
    return ok


def _cpu_capability() -> str:
    """The vector ISA torch's CPU kernels use here: ``AVX2``, ``AVX512``, ``DEFAULT``…"""
    return torch.backends.cpu.get_cpu_capability()


def use_onednn(*tensors: torch.Tensor) -> bool:
    """Whether :func:`linear`/:func:`attention` on these tensors take the oneDNN path.
    (``is_compiling`` first: torch.compile resolves it while tracing and never reaches the
    checks it would have to break its graph for.)"""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return False
    if torch.is_autocast_enabled("cpu") or get_cpu_kernels() != "onednn":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return onednn_available()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on oneDNN where :func:`use_onednn` says so (and the
    weight is contiguous: a strided weight falls to oneDNN's slow reference kernel)."""
    args = (x, weight) if bias is None else (x, weight, bias)
    if x.dim() >= 2 and x.numel() and weight.is_contiguous() and use_onednn(*args):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# Where the oneDNN attention pays off on the CPU it was measured on (``benchmarks/cpu_kernels.py``
# and RESULTS.md): with AVX-512, from 512 keys with heads of 32+ dims (1.2–1.6x torch's fused
# kernel at Crane's 1370 tokens); with fewer keys or 16-dim heads per-call overhead made it
# 0.5–0.95x, and with oneDNN held to AVX2 it was 0.95x.
ATTENTION_ISA = ("AVX512",)
ATTENTION_MIN_TOKENS = 512
ATTENTION_MIN_HEAD_DIM = 32
# Query rows per product: a 512 × N block of scores (2.8 MB at 1370 keys) instead of a head's
# whole N × N matrix (7.5 MB), which allocating per head made 1.3–2x slower and erratic.
ATTENTION_BLOCK_ROWS = 512


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` (no mask, no dropout, scale 1/√d) for
    (B, H, N, d) tensors; on oneDNN under the conditions of :func:`attention_sum`."""
    return attention_sum([(q, k)], v)


def attention_sum(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], v: torch.Tensor):
    """``Σ_i F.scaled_dot_product_attention(q_i, k_i, v)`` over the (query, key) ``pairs``, all
    with the same values ``v`` (E-Attn's three self-correlations; one pair is plain attention),
    summed in order. On oneDNN where :func:`use_onednn` says so, torch's fused CPU kernel is not
    switched off, and oneDNN measured faster there: an AVX-512 CPU (``ATTENTION_ISA``),
    ``ATTENTION_MIN_TOKENS`` keys, ``ATTENTION_MIN_HEAD_DIM``-dim heads.

    The oneDNN path loops over images, heads and blocks of ``ATTENTION_BLOCK_ROWS`` queries:
    per pair the scores ``(q/√d) kᵀ`` as one product and softmax in place, the pairs'
    probabilities summed, then one product with ``v`` (the sum is linear in them: for E-Attn's
    three terms 8·N²·d FLOPs per head instead of 12). The result is a (B, H, N, d) view of a
    (B, N, H, d) buffer, so merging the heads back into (B, N, H·d) needs no copy.
    """
    tensors = [t for pair in pairs for t in pair]
    q0, k0 = pairs[0]
    if (
        not use_onednn(*tensors, v)
        or q0.dim() != 4
        or k0.shape[-2] < ATTENTION_MIN_TOKENS
        or q0.shape[-1] < ATTENTION_MIN_HEAD_DIM
        or _cpu_capability() not in ATTENTION_ISA
        or not torch.backends.cuda.flash_sdp_enabled()
        or any(q.shape != q0.shape or k.shape != k0.shape for q, k in pairs)
    ):
        out = None
        for q, k in pairs:
            term = F.scaled_dot_product_attention(q, k, v)
            out = term if out is None else out + term
        return out
    b, h, n, d = q0.shape
    scale = d**-0.5
    # Each copied to (B, H, N, d) first, once per distinct tensor (E-Attn's pairs are (t, t)):
    # ops on the models' strided head views (and the transpose straight from them) ran ~10x
    # slower, 9.6 of an attention's 35 ms at 1370 tokens.
    dense: dict[int, torch.Tensor] = {}
    for t in (*tensors, v):
        if id(t) not in dense:
            dense[id(t)] = t.contiguous()
    scaled = {id(q): dense[id(q)] * scale for q, _ in pairs}  # never in place: may be q itself
    terms = [(scaled[id(q)], dense[id(k)]) for q, k in pairs]
    vt = dense[id(v)].transpose(-1, -2).contiguous()  # oneDNN's weight layout: (d_v, N)
    out = q0.new_empty(b, n, h, v.shape[-1]).transpose(1, 2)
    rows = ATTENTION_BLOCK_ROWS
    for i in range(b):
        for j in range(h):
            for r in range(0, n, rows):
                p = None
                for qs, kc in terms:
                    s = _onednn_linear(qs[i, j, r : r + rows], kc[i, j], None)
                    torch.softmax(s, dim=-1, out=s)
                    p = s if p is None else p.add_(s)
                out[i, j, r : r + rows] = _onednn_linear(p, vt[i, j], None)
    return out


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def swap_linears(model: nn.Module) -> None:
    """Make every plain ``nn.Linear`` in ``model`` a :class:`Linear` (in place). Also runs
    :func:`onednn_available`'s one-time check now, not inside the model's first forward."""
    onednn_available()
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
