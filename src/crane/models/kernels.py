"""fp32 matrix products, and fp32 and bf16 attention, on the CPU through oneDNN.

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

- the switch is on (the default on AVX-512 CPUs, :func:`default_cpu_kernels`: on an AVX2 Zen 3
  MKL's sgemm was the faster, 11.8 s a Crane+ image against oneDNN's 13.1; :func:`cpu_kernels`
  or the environment variable ``CRANE_CPU_KERNELS`` chooses either),
- the CPU is x86 with AVX2 or AVX-512 (attention: AVX-512 only),
- every tensor is an fp32 CPU tensor and CPU autocast is off — or, under CPU bf16 autocast
  (``--precision bf16``) on a CPU that multiplies bf16 natively (:func:`native_bf16`), a
  linear layer's operands (cast to bf16 as autocast casts them) or an attention's bf16 q/k/v
  (the output of those products): there torch's fused kernel ran bf16 attention no faster
  than fp32 (150–170 GFLOP/s), and oneDNN's bf16 products run at twice its fp32 rate; fp32
  attention can also be asked for on fp16- or bf16-rounded q/k/v (``rounding``, DINOv2's fp16
  attention),
- no autograd graph is being recorded for them (oneDNN's op has no backward),
- not inside ``torch.compile`` (its graphs keep torch's ops: inductor picks its own kernels),
- for attention: torch's fused CPU kernel is not switched off (under
  ``sdpa_kernel([SDPBackend.MATH])`` — ``--attention math`` — torch's reference runs), and
  the problem is large enough for oneDNN to pay off (see :func:`attention`).

Everything else (CUDA, fp16, training the prompts) is untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
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
    """The current choice: ``"onednn"`` or ``"torch"`` (default: :func:`default_cpu_kernels`)."""
    block = _block.get()
    if block is not None:
        return block
    if _setting is not None:
        return _setting
    # (set but empty: the default, as the CLI's up-front check reads it)
    name = (os.environ.get(ENV_VAR) or default_cpu_kernels()).strip().lower()
    return _check(name, f"${ENV_VAR}")


#: The CPUs whose fp32 products are faster on oneDNN than on MKL's sgemm (measured): on an
#: AVX-512 Zen 5, 380–440 against 180–205 GFLOP/s; on an AVX2 Zen 3 (28th session) 131–160
#: against 177–188, a whole Crane+ image 13.1 s against 11.8 s.
ONEDNN_DEFAULT_ISA = ("AVX512",)


def default_cpu_kernels() -> str:
    """``"onednn"`` on CPUs with AVX-512 (``ONEDNN_DEFAULT_ISA``), else ``"torch"``."""
    return "onednn" if _cpu_capability() in ONEDNN_DEFAULT_ISA else "torch"


def set_cpu_kernels(name: str | None) -> None:
    """Process-wide choice of the fp32 CPU kernels (``None``: back to ``$CRANE_CPU_KERNELS``):
    every thread's, also of threads started later; a :func:`cpu_kernels` block overrides it in
    its own thread."""
    global _setting
    _setting = None if name is None else _check(name, "cpu_kernels")


#: The choice of a :func:`cpu_kernels` block: this thread's (and context's), above the
#: process-wide :func:`set_cpu_kernels`.
_block: contextvars.ContextVar[str | None] = contextvars.ContextVar("cpu_kernels", default=None)


@contextlib.contextmanager
def cpu_kernels(name: str):
    """Inside, fp32 CPU matrix products and attention run on ``name``'s kernels (``"onednn"``
    or ``"torch"``) in this thread; the previous choice comes back on exit. A context
    variable: blocks in several threads overlap without a lock (which deadlocked a block
    waiting on a worker thread that opened its own) and without restoring each other's
    choice; threads started inside keep the process-wide choice (:func:`set_cpu_kernels`).
    crane runs its models in the calling thread."""
    token = _block.set(_check(name, "cpu_kernels"))
    try:
        yield
    finally:
        try:
            _block.reset(token)
        except ValueError:  # (a generator suspended in the block, closed in another context)
            pass


@functools.cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op, it computes a small product right, and the
    CPU is an x86 one with AVX2 or AVX-512 (where it was measured; elsewhere torch's kernels)."""
    if not torch.backends.mkldnn.is_available() or _cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:  # (in fp32 whatever the first caller runs under: the answer is kept for good)
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            x, w, b = (
                torch.randn(*s, generator=g, dtype=torch.float32) for s in ((5, 7), (3, 7), (3,))
            )
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


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there oneDNN's bf16
    products ran at twice its fp32 rate (775–880 against 400–440 GFLOP/s at Crane's shapes on
    the Zen 5 dev box); elsewhere oneDNN emulates them, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:  # torch's own check for its oneDNN bf16 ops, which refuse to run where it fails
        usable = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return usable and any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def use_onednn(*tensors: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`linear`/:func:`attention` on these tensors take the oneDNN path.
    (``is_compiling`` first: torch.compile resolves it while tracing and never reaches the
    checks it would have to break its graph for.)

    ``dtype``: the arithmetic. fp32 (the default): every tensor fp32, CPU autocast off. bf16
    (``--precision bf16``: the products CPU bf16 autocast would make, and attention on the bf16
    q/k/v they give): every tensor bf16 or fp32 (converted), a CPU with :func:`native_bf16`."""
    if torch.compiler.is_compiling():
        return False
    allowed = (torch.float32, torch.bfloat16) if dtype == torch.bfloat16 else (dtype,)
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in allowed:
            return False
    if dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        return False
    if dtype not in (torch.float32, torch.bfloat16) or get_cpu_kernels() != "onednn":
        return False
    if dtype == torch.bfloat16 and not native_bf16():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return onednn_available()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on oneDNN where :func:`use_onednn` says so (and the
    weight is contiguous: a strided weight falls to oneDNN's slow reference kernel).

    Under CPU bf16 autocast (on a CPU with :func:`native_bf16`): the bf16 product autocast
    makes — every operand cast to bf16, fp32 accumulation, a bf16 result — as one oneDNN
    product with the bias fused, where torch's bf16 ``addmm`` first copies the bias into its
    output (CLIP's qkv product on the dev box: 860 against 685 GFLOP/s)."""
    args = (x, weight) if bias is None else (x, weight, bias)
    # (oneDNN's op reads the weight and bias as dense: strided ones go to torch)
    dense = weight.is_contiguous() and (
        bias is None or (bias.is_contiguous() and bias.shape == weight.shape[:1])
    )
    if x.dim() >= 2 and x.numel() and dense:
        if use_onednn(*args):
            return _onednn_linear(x, weight, bias)
        if _autocast_bf16(args):
            x, weight, *b = (t.to(torch.bfloat16) for t in args)
            return _onednn_linear(x, weight, b[0] if b else None)
    return F.linear(x, weight, bias)


def linear_on_onednn(*tensors: torch.Tensor) -> bool:
    """Whether :func:`linear` on these operands runs a oneDNN product (fp32, or bf16 under CPU
    bf16 autocast)."""
    return use_onednn(*tensors) or _autocast_bf16(tensors)


def _autocast_bf16(tensors: Sequence[torch.Tensor]) -> bool:
    return (
        not torch.compiler.is_compiling()  # (first: nothing else for torch.compile to trace)
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and use_onednn(*tensors, dtype=torch.bfloat16)
    )


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


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rounding: torch.dtype | None = None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` (no mask, no dropout, scale 1/√d) for
    (B, H, N, d) tensors; on oneDNN under the conditions of :func:`attention_sum`, which also
    says what ``rounding`` does."""
    return attention_sum([(q, k)], v, rounding=rounding)


def attention_sum(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    v: torch.Tensor,
    *,
    rounding: torch.dtype | None = None,
) -> torch.Tensor:
    """``Σ_i F.scaled_dot_product_attention(q_i, k_i, v)`` over the (query, key) ``pairs``, all
    with the same values ``v`` (E-Attn's three self-correlations; one pair is plain attention),
    summed in order. On oneDNN where :func:`use_onednn` says so for fp32 tensors, or for bf16
    ones on a CPU with native bf16; torch's fused CPU kernel must not be switched off, and
    oneDNN measured faster there: an AVX-512 CPU (``ATTENTION_ISA``),
    ``ATTENTION_MIN_TOKENS`` keys, ``ATTENTION_MIN_HEAD_DIM``-dim heads.

    The oneDNN path loops over images, heads and blocks of ``ATTENTION_BLOCK_ROWS`` queries:
    per pair the scores ``(q/√d) kᵀ`` as one product and softmax in place, the pairs'
    probabilities summed, then one product with ``v`` (the sum is linear in them: for E-Attn's
    three terms 8·N²·d FLOPs per head instead of 12). The result is a (B, H, N, d) view of a
    (B, N, H, d) buffer, so merging the heads back into (B, N, H·d) needs no copy.

    bf16 tensors are computed as fused bf16 attention kernels on a GPU (FlashAttention, cuDNN)
    compute them: scores and softmax in fp32 (here from the bf16 values made fp32, an exact
    conversion), the probabilities rounded to bf16 for the product with ``v`` (a bf16 oneDNN
    product, fp32 accumulation: what makes it twice as fast), the result in bf16. torch's fused
    CPU kernel keeps the probabilities in fp32 (a plain attention's error was 1.45× smaller
    there). E-Attn's terms are summed as fp32 probabilities and rounded once, where the fused
    kernels round each term's output.

    ``rounding`` (fp16 or bf16, for fp32 tensors): SDPA on q, k, v cast to that dtype, the
    result returned in fp32 — DINOv2's fp16 attention (:func:`crane.models.vision.
    half_precision_attention`). torch's kernels run SDPA on the cast tensors; oneDNN runs fp32
    products on the rounded values (exact: a product of two fp16 or bf16 values fits fp32's
    mantissa) with fp32 softmax and accumulation, and rounds the result, as torch's fused CPU
    kernel does (CUDA's flash kernels also round the probabilities before the product with v).
    """
    tensors = [t for pair in pairs for t in pair]
    q0, k0 = pairs[0]
    dtype = v.dtype
    rounding = None if rounding == dtype else rounding
    if rounding is not None and (dtype != torch.float32 or rounding not in _ROUNDINGS):
        raise ValueError(f"rounding to {rounding} needs fp32 tensors and fp16 or bf16")
    if (
        not use_onednn(*tensors, v, dtype=dtype)
        or any(t.dtype != dtype for t in tensors)
        or q0.dim() != 4
        or k0.shape[-2] < ATTENTION_MIN_TOKENS
        or q0.shape[-1] < ATTENTION_MIN_HEAD_DIM
        or _cpu_capability() not in ATTENTION_ISA
        or not torch.backends.cuda.flash_sdp_enabled()
        or any(q.shape != q0.shape or k.shape != k0.shape for q, k in pairs)
        # (one batch and head count, no broadcasting; as many values as keys)
        or q0.shape[:2] != k0.shape[:2]
        or q0.shape[-1] != k0.shape[-1]
        or v.dim() != 4
        or v.shape[:3] != k0.shape[:3]
    ):
        out = None
        for q, k in pairs:
            if rounding is None:
                term = F.scaled_dot_product_attention(q, k, v)
            else:
                cast = (t.to(rounding) for t in (q, k, v))
                term = F.scaled_dot_product_attention(*cast).to(dtype)
            out = term if out is None else out + term
        return out
    with torch.autocast("cpu", enabled=False):
        return _onednn_attention_sum(pairs, v, rounding)


_ROUNDINGS = (torch.float16, torch.bfloat16)


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of ``t`` in ``dtype``, in one pass."""
    return torch.empty(t.shape, dtype=dtype).copy_(t)


def _onednn_attention_sum(pairs, v: torch.Tensor, rounding: torch.dtype | None) -> torch.Tensor:
    q0, k0 = pairs[0]
    b, h, n, d = q0.shape
    scale = d**-0.5
    # Each copied to a dense fp32 (B, H, N, d) tensor first (rounded first where asked), once
    # per distinct tensor (E-Attn's pairs are (t, t)): ops on the models' strided head views
    # (and the transpose straight from them) ran ~10x slower, 9.6 of an attention's 35 ms at
    # 1370 tokens.
    dense: dict[int, torch.Tensor] = {}
    for t in (*(t for pair in pairs for t in pair), v):
        if id(t) not in dense:
            dense[id(t)] = _dense(t.to(rounding) if rounding is not None else t, torch.float32)
    scaled = {id(q): dense[id(q)] * scale for q, _ in pairs}  # never in place: may be q itself
    terms = [(scaled[id(q)], dense[id(k)]) for q, k in pairs]
    # oneDNN's weight layout (d_v, N); for bf16 tensors the product with v runs in bf16.
    vt = _dense(dense[id(v)].transpose(-1, -2), v.dtype)
    # The result in the dtype it is rounded to (bf16 tensors: the bf16 product's own result).
    out = q0.new_empty(b, n, h, v.shape[-1], dtype=rounding or v.dtype).transpose(1, 2)
    rows = ATTENTION_BLOCK_ROWS
    for i in range(b):
        for j in range(h):
            for r in range(0, n, rows):
                p = None
                for qs, kc in terms:
                    s = _onednn_linear(qs[i, j, r : r + rows], kc[i, j], None)
                    torch.softmax(s, dim=-1, out=s)
                    p = s if p is None else p.add_(s)
                if v.dtype == torch.bfloat16:  # the bf16 product with v takes them in bf16
                    p = p.to(torch.bfloat16)
                out[i, j, r : r + rows] = _onednn_linear(p, vt[i, j], None)
    return out if out.dtype == v.dtype else out.to(v.dtype)


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
