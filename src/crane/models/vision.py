"""Vision side (SPEC §3): CLIP's own blocks driven by a loop that adds E-Attn and D-Attn.

The open_clip module is used as it is: its submodules and weights run the normal path,
so the global feature is exactly CLIP's. Beside it runs the E-Attn path (no MLP), and for
Crane+ the DINO-guided D-Attn at one block. Everything here is pure tensor code.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from crane.config import CraneConfig
from crane.constants import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from crane.errors import CraneError
from crane.models import kernels


@dataclass
class VisionOutput:
    """``global_feat`` (B, E) and ``patch_sets`` (S, B, N, E), both L2-normalised."""

    global_feat: torch.Tensor
    patch_sets: torch.Tensor


# TF32 is switched through torch's process-wide flags: one lock for every change, held for as
# long as a setting must hold (re-entrant: the TF32 parts nest inside strict_fp32).
_TF32_LOCK = threading.RLock()


@contextlib.contextmanager
def _tf32_switches(on: bool):
    """cuBLAS matmuls and cuDNN convolutions on fp32 CUDA tensors use TF32 (``on``) or full
    fp32 inside the block; the previous settings come back on exit. The lock is held
    throughout, so a thread that wants the other setting waits instead of seeing this one,
    and overlapping blocks in two threads cannot leave a setting behind.

    Each switch is set through the API the process already uses for it (torch ≥ 2.9 refuses
    reads after the legacy and the new API were mixed): :func:`_matmul_switch`,
    :func:`_conv_switch`."""
    with _TF32_LOCK:
        switches = [_matmul_switch(on), _conv_switch(on)]
        for setter, _, want in switches:
            setter(want)
        try:
            yield
        finally:
            for setter, saved, _ in switches:
                setter(saved)


def _matmul_switch(on: bool) -> tuple:
    """(setter, saved value, wanted value) for cuBLAS's fp32 matmuls. Through
    ``torch.set_float32_matmul_precision`` where the process reads it (its default, or a
    user's "medium"/"high", restored as they were: setting ``allow_tf32`` there would make
    torch refuse the user's later ``get_float32_matmul_precision()``), else through the
    matmul backend's ``fp32_precision``, the API the process then uses."""
    try:
        saved = torch.get_float32_matmul_precision()
    except RuntimeError:  # the process set torch.backends.cuda.matmul.fp32_precision itself
        m = torch.backends.cuda.matmul
        return (
            (lambda v: setattr(m, "fp32_precision", v)),
            m.fp32_precision,
            ("tf32" if on else "ieee"),
        )
    # (that call also sets oneDNN's CPU matmuls: on the way out they get their own value
    # back, which a process that set only cuBLAS's allow_tf32 never gave them; inside the
    # block they follow the call, so that torch can still read one global setting there)
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    cpu = getattr(mkldnn, "fp32_precision", None)

    def setter(value: str) -> None:
        torch.set_float32_matmul_precision(value)
        if value == saved and cpu is not None:
            mkldnn.fp32_precision = cpu

    return setter, saved, ("high" if on else "highest")


def _conv_switch(on: bool) -> tuple:
    """(setter, saved value, wanted value) for cuDNN's fp32 convolutions: the ``allow_tf32``
    flag, or ``conv.fp32_precision`` where the process set that (reading the flag raises)."""
    legacy = torch.backends.cudnn
    try:
        return (lambda v: setattr(legacy, "allow_tf32", v)), legacy.allow_tf32, on
    except RuntimeError:
        conv = legacy.conv
        return (
            (lambda v: setattr(conv, "fp32_precision", v)),
            conv.fp32_precision,
            ("tf32" if on else "ieee"),
        )


def tf32_matmuls(enabled: bool = True):
    """Let fp32 CUDA matmuls/convolutions inside the block use TF32 tensor cores (see
    :func:`_tf32_switches`; a no-op when ``enabled`` is False)."""
    return _tf32_switches(True) if enabled else contextlib.nullcontext()


def strict_fp32(device: torch.device):
    """Full fp32 for the fp32 CUDA matmuls and convolutions inside the block, whatever the
    process set (torch's own default lets cuDNN convolutions use TF32, and
    ``torch.set_float32_matmul_precision("high")`` cuBLAS matmuls): the model's fp32 parts
    (``--precision fp32``, and under autocast D-Attn, the projections, the scoring and its
    Gaussian) compute what they say; the opt-in TF32 parts switch it back on inside. A no-op
    off CUDA, where the flags change nothing."""
    return _tf32_switches(False) if device.type == "cuda" else contextlib.nullcontext()


# dtype for the q/k/v of DINOv2's fused attention while set (see half_precision_attention).
_ATTN_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar(
    "crane_dino_attn_dtype", default=None
)


def dino_attention_dtype() -> torch.dtype | None:
    """The dtype :func:`half_precision_attention` currently asks for (None outside)."""
    return _ATTN_DTYPE.get()


@contextlib.contextmanager
def half_precision_attention(dtype: torch.dtype | None = torch.float16):
    """Inside, DINOv2's fused attention (fp32 activations) takes q/k/v in ``dtype``: on CUDA
    fp16 inputs reach the flash/cuDNN kernels (fp32 has only a slower kernel without tensor
    cores). fp16 keeps a 10-bit mantissa, the rounding TF32 matmuls already apply to their
    inputs; softmax and accumulation stay fp32 in those kernels, the output goes back to fp32
    before the projection. ``None`` leaves attention as timm computes it."""
    token = _ATTN_DTYPE.set(dtype)
    try:
        yield
    finally:
        _ATTN_DTYPE.reset(token)


@torch.compiler.disable
def _dino_features_tf32(dino: nn.Module, x: torch.Tensor, attn_fp16: bool = False) -> torch.Tensor:
    """DINOv2 in fp32 with TF32 matmuls (and with ``attn_fp16`` fp16 flash attention, see
    :func:`half_precision_attention`), kept out of ``torch.compile``.
    On an H100 the compiled default Crane+ (this part included) ran at 88 img/s against 120
    eager, while compiling a bf16 DINOv2 paid off (cause of the fp32 slowdown not
    established), so this part always runs as it does eagerly."""
    half = half_precision_attention(torch.float16 if attn_fp16 else None)
    with torch.autocast(x.device.type, enabled=False), tf32_matmuls(True), half:
        return dino.forward_features(x)


def _project_fp32(
    tokens: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, proj: torch.Tensor
) -> torch.Tensor:
    """ln_post (weight ``w``, bias ``b``) → ``proj`` → L2-normalise, in fp32 whatever the
    autocast (explicit fp32 copies, so a bf16-cast model scores in fp32 too)."""
    with torch.autocast(tokens.device.type, enabled=False):
        y = F.layer_norm(tokens.float(), tuple(w.shape), w.float(), b.float(), eps)
        return F.normalize(y @ proj.float(), dim=-1)


def _dattn_mix(
    weights: torch.Tensor, values: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """D-Attn's output: one N×N weight matrix shared by all heads applied to the concatenated
    heads' values, then out_proj (``w``, ``b``), in fp32 whatever the autocast (a few GFLOP
    per image, and it keeps the D-Attn set within bf16 noise)."""
    with torch.autocast(values.device.type, enabled=False):
        return kernels.linear(torch.bmm(weights, values.float()), w.float(), b.float())


@torch.compiler.disable
def _in_tf32(fn, *args):
    """``fn(*args)`` with TF32 matmuls, kept out of ``torch.compile`` as DINOv2's TF32 part
    is (:func:`_dino_features_tf32`): the global switch then holds exactly where it is set."""
    with tf32_matmuls(True):
        return fn(*args)


def clip_matmul_weights(visual: nn.Module) -> list[nn.Parameter]:
    """The vision tower's big matmul weights that run under autocast: the patch embedding,
    each block's qkv projection and MLP (not ``out_proj``, which D-Attn uses in fp32)."""
    weights = [visual.conv1.weight]
    for blk in visual.transformer.resblocks:
        weights += [blk.attn.in_proj_weight, blk.mlp.c_fc.weight, blk.mlp.c_proj.weight]
    return weights


_QUICK_GELU = 1.702


def clip_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIP's MLP ``c_proj(QuickGELU(c_fc(x)))`` with QuickGELU as one SiLU.

    ``h·σ(1.702h) = SiLU(1.702h)/1.702``: the factor 1.702 goes into ``c_fc``'s GEMM (alpha
    and the bias) and 1/1.702 into ``c_proj``'s alpha, so the activation is one in-place
    elementwise pass instead of three (multiply, sigmoid, multiply): 37 → 5 ms per block at
    1370 tokens on two CPU cores. Equal to open_clip's MLP up to fp32 rounding (tested).
    Other MLPs (nn.GELU, NormFormer's extra LayerNorm, no bias) run as their module defines
    them.
    """
    fc, act, proj = (getattr(mlp, name, None) for name in ("c_fc", "gelu", "c_proj"))
    if (
        not isinstance(mlp, nn.Sequential)
        or len(mlp) != 3
        or not isinstance(act, QuickGELU)
        or not isinstance(fc, nn.Linear)
        or not isinstance(proj, nn.Linear)
        or fc.bias is None
        or proj.bias is None
    ):
        return mlp(x)
    flat = x.reshape(-1, x.shape[-1])
    if kernels.linear_on_onednn(flat, fc.weight):  # no alpha there: the scale goes on the inputs
        h = kernels.linear(flat * _QUICK_GELU, fc.weight, fc.bias * _QUICK_GELU)
        h = F.silu(h, inplace=True)
        y = kernels.linear(h, proj.weight)  # (bf16 under CPU bf16 autocast, as addmm's)
        out = torch.add(proj.bias.to(y.dtype), y, alpha=1.0 / _QUICK_GELU)
        return out.view(*x.shape[:-1], out.shape[-1])
    # beta stays 1 (a pre-scaled bias): cuBLASLt fuses the bias only for beta == 1.
    h = torch.addmm(fc.bias * _QUICK_GELU, flat, fc.weight.t(), alpha=_QUICK_GELU)
    h = F.silu(h, inplace=not h.requires_grad)
    out = torch.addmm(proj.bias, h, proj.weight.t(), alpha=1.0 / _QUICK_GELU)
    return out.view(*x.shape[:-1], out.shape[-1])


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, n_heads, d // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def eattn_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_type: str) -> torch.Tensor:
    """Σ_t softmax(t tᵀ/√d) v over the chosen self-correlations t ∈ {q, k, v}, per head.

    Each term is scaled-dot-product attention with (query, key) = (t, t): a fused kernel
    computes it without materialising the N×N matrix (fp32 on the CPU: oneDNN products over
    blocks of queries, the terms' probabilities summed before one product with v,
    :func:`crane.models.kernels.attention_sum`).
    """
    sources = {"qq": q, "kk": k, "vv": v}
    return kernels.attention_sum([(sources[p], sources[p]) for p in attn_type.split("+")], v)


def dattn_weights(dino_tokens: torch.Tensor, gamma: float, beta: float, scope: str) -> torch.Tensor:
    """Row-stochastic D-Attn weights (B, N, N) from DINO patch tokens (B, N, C).

    ``S' = γ(S − β·mean(S))`` with S the cosine similarity, entries with ``S' < 0`` dropped.
    ``mean(S) = ‖Σ_i F_i‖²/N²`` needs no N×N pass. ``scope="image"`` takes the mean per image
    (results independent of the batch); ``"batch"`` reproduces the reference, which averages
    over the whole batch tensor. The diagonal (S_ii = 1, each row's maximum) is never dropped:
    the reference would produce a NaN row there, which only happens when mean(S) > 1/β.
    """
    with torch.autocast(dino_tokens.device.type, enabled=False):
        return _dattn_weights_fp32(F.normalize(dino_tokens.float(), dim=-1), gamma, beta, scope)


def _dattn_weights_fp32(f: torch.Tensor, gamma: float, beta: float, scope: str) -> torch.Tensor:
    # fp32 even under autocast: the cut at S' = 0 and the γ = 3 sharpened softmax are
    # sensitive to bf16 rounding of the cosine similarities.
    n = f.shape[1]
    mean = f.sum(dim=1).pow(2).sum(dim=-1) / (n * n)  # (B,)
    if scope == "batch":
        mean = mean.mean().expand_as(mean)
    s = torch.bmm(f, f.transpose(1, 2))
    s = gamma * (s - beta * mean.view(-1, 1, 1))
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    s = s.masked_fill((s < 0) & ~eye, float("-inf"))
    return torch.softmax(s, dim=-1)


class CraneVisionEncoder(nn.Module):
    """Wraps an open_clip ``VisionTransformer`` (and optionally a timm DINOv2)."""

    def __init__(self, visual: nn.Module, cfg: CraneConfig, dino: nn.Module | None = None):
        super().__init__()
        self.visual = visual
        self.dino = dino
        self.cfg = cfg
        self.n_layers = len(visual.transformer.resblocks)
        self.n_heads = visual.transformer.resblocks[0].attn.num_heads
        used = (*cfg.feature_layers, *((cfg.dattn_layer,) if cfg.use_dattn else ()))
        bad = [lay for lay in used if not 1 <= lay <= self.n_layers]
        if bad or not 1 <= cfg.eattn_start <= self.n_layers:
            raise CraneError(
                f"config layers {bad or cfg.eattn_start} (feature_layers, dattn_layer, "
                f"eattn_start) outside 1..{self.n_layers}, the layers of {cfg.clip_model}"
            )
        if cfg.use_dattn and dino is None:
            raise ValueError("config asks for D-Attn but no DINO model was given")
        # Pixels arrive CLIP-normalised; DINO wants the same pixels ImageNet-normalised:
        # x_in = (x * s_clip + m_clip - m_in) / s_in = x * a + b.
        clip_m, clip_s = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
        in_m, in_s = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("_dino_a", (clip_s / in_s).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_dino_b", ((clip_m - in_m) / in_s).view(1, 3, 1, 1), persistent=False)

    # -- pieces ----------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def tail_tf32(self, x: torch.Tensor) -> bool:
        """Whether the fp32 tail's products (D-Attn mixing and out_proj, ln_post/proj) run on
        TF32 tensor cores: with ``cfg.tail_tf32``, under autocast, on CUDA."""
        return self.cfg.tail_tf32 and x.device.type == "cuda" and torch.is_autocast_enabled("cuda")

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post → proj → L2-normalise (used for the global feature and every patch set).

        Always in fp32, also under autocast: these unit vectors feed logits scaled by 1/0.07,
        where bf16 rounding would move the maps by more than 1e-2 (TF32 with
        ``cfg.tail_tf32``: see :meth:`tail_tf32`).
        """
        ln = self.visual.ln_post
        args = (tokens, ln.weight, ln.bias, ln.eps, self.visual.proj)
        return _in_tf32(_project_fp32, *args) if self.tail_tf32(tokens) else _project_fp32(*args)

    def dino_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self._dino_a + self._dino_b
        dtype = next(self.dino.parameters()).dtype
        amp = torch.is_autocast_enabled(x.device.type)
        keep_fp32 = amp and self.cfg.dino_fp32  # DINOv2 out of autocast
        attn_fp16 = keep_fp32 and self.cfg.dino_attn_fp16
        if keep_fp32 and self.cfg.dino_tf32 and x.device.type == "cuda":
            feats = _dino_features_tf32(self.dino, x.to(dtype), attn_fp16)
        else:  # CPU (fp16 attention too, when asked: q/k/v rounded as on CUDA), or no TF32
            # (no context otherwise: the compiled bf16-DINOv2 graph stays as it was measured)
            half = half_precision_attention() if attn_fp16 else contextlib.nullcontext()
            if amp and self.cfg.dino_fp16 and not self.cfg.dino_fp32:
                cast = torch.autocast(x.device.type, dtype=torch.float16)
            else:
                cast = torch.autocast(x.device.type, enabled=amp and not self.cfg.dino_fp32)
            with cast, half:
                feats = self.dino.forward_features(x.to(dtype))
        return feats[:, self.dino.num_prefix_tokens :]

    # -- forward ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> VisionOutput:
        cfg = self.cfg
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, cfg.image_size, cfg.image_size):
            # (a patch convolution would drop the pixels past the last whole patch silently)
            raise ValueError(
                f"{cfg.name} takes (B, 3, {cfg.image_size}, {cfg.image_size}) images "
                f"(cfg.image_size), got {tuple(images.shape)}"
            )
        h = self.n_heads
        want = set(cfg.feature_layers)
        sets: dict[str, torch.Tensor] = {}
        dattn_w = None
        if cfg.use_dattn:
            dattn_w = dattn_weights(
                self.dino_tokens(images), cfg.dattn_gamma, cfg.dattn_beta, cfg.dattn_threshold_scope
            )

        x = self.embed(images)
        z = None  # E-Attn path state
        for idx, blk in enumerate(self.visual.transformer.resblocks, start=1):
            attn = blk.attn
            y = blk.ln_1(x)
            q, k, v = (
                _heads(t, h)
                for t in kernels.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
            )
            # After the last block only the class token of the normal path is used (for g),
            # unless D-Attn reads this block's post-attention state of every token.
            last = idx == self.n_layers
            cls_only = last and not (dattn_w is not None and idx == cfg.dattn_layer)
            w_o, b_o = attn.out_proj.weight, attn.out_proj.bias
            a = kernels.attention(q[:, :, :1] if cls_only else q, k, v)
            a = kernels.linear(_merge(a), w_o, b_o)
            if idx >= cfg.eattn_start:
                e = kernels.linear(_merge(eattn_mix(q, k, v, cfg.attn_type)), w_o, b_o)
                z = (x if z is None else z) + e
                if idx in want:
                    sets[f"e{idx}"] = z[:, 1:]
            x = (x[:, :1] if cls_only else x) + blk.ls_1(a)
            if dattn_w is not None and idx == cfg.dattn_layer:
                # Values from ln_1 of the state after this block's attention residual (before
                # its MLP): what the released checkpoints were trained with (SPEC §3).
                w_v = attn.in_proj_weight.chunk(3, 0)[2]
                b_v = attn.in_proj_bias.chunk(3, 0)[2]
                val = kernels.linear(blk.ln_1(x), w_v, b_v)[:, 1:]
                # One N×N weight matrix shared by all heads: W·v on the concatenated heads
                # (fp32: a few GFLOP per image, and it keeps the D-Attn set within bf16 noise).
                mix = (dattn_w, val, attn.out_proj.weight, attn.out_proj.bias)
                sets["d"] = _in_tf32(_dattn_mix, *mix) if self.tail_tf32(x) else _dattn_mix(*mix)
            if last:
                x = x[:, :1]
            x = x + blk.ls_2(clip_mlp(blk.mlp, blk.ln_2(x)))

        order = (["d"] if cfg.use_dattn else []) + [f"e{lay}" for lay in cfg.feature_layers]
        patch_sets = torch.stack([self.project(sets[key]) for key in order])
        return VisionOutput(global_feat=self.project(x[:, 0]), patch_sets=patch_sets)
