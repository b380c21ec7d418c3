"""Build the frozen backbones through open_clip and timm, exactly as upstream defines them."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os

import open_clip
import timm
import torch
import torch.nn.functional as F
from torch import nn

from crane.config import PATCH, PRESETS, CraneConfig
from crane.errors import CraneError, WeightsError
from crane.models import weights as W
from crane.models.kernels import attention as kernels_attention
from crane.models.kernels import linear_on_onednn, swap_linears
from crane.models.vision import clip_matmul_weights, dino_attention_dtype

log = logging.getLogger(__name__)


class _DinoAttention(timm.models.vision_transformer.Attention):
    """timm's ``Attention`` (same parameters and state dict); differs only inside
    :func:`~crane.models.vision.half_precision_attention` and where fp32 (or, under CPU bf16
    autocast, bf16) CPU attention runs on oneDNN (:mod:`crane.models.kernels`), in the plain
    case DINOv2 uses (fused attention, no mask, no gate)."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        dtype = dino_attention_dtype()
        plain = self.fused_attn and attn_mask is None and not is_causal and self.gate is None
        if dtype is not None:
            ours = x.dtype == torch.float32
        else:  # fp32 on oneDNN, or under CPU bf16 autocast (--dino-precision bf16) bf16 q/k/v
            ours = linear_on_onednn(x)  # from its products, and bf16 attention on oneDNN
        if not plain or not ours:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        # With a dtype: SDPA on q/k/v cast to it (on oneDNN: fp32 products on the rounded values)
        o = kernels_attention(q, k, v, rounding=dtype)
        o = o.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(o)))


class PatchConv(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that computes a ViT patch embedding —
    kernel = stride, no padding, dilation or groups — as one GEMM over the non-overlapping
    patches: the same sums in another order (equal to the convolution up to rounding, tested).
    With 3 input channels and a 14-px stride, cuDNN ran Crane+'s two patch convolutions at
    15–20 TFLOP/s on an H200 (2.6 ms each per batch of 32 at 518²): as GEMMs they are tens of
    times faster. Any other convolution runs as ``nn.Conv2d`` does. The output is the
    convolution's NCHW shape as a view of the (B, H', W', C) GEMM result, so the usual
    ``flatten(2).transpose(1, 2)`` to tokens is free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        b, c, h, w = x.shape
        plain = (
            self.stride == self.kernel_size
            and self.padding in ((0, 0), "valid")
            and self.dilation == (1, 1)
            and self.groups == 1
            and h % kh == 0
            and w % kw == 0
        )
        if not plain:
            return super().forward(x)
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            x = x.to(torch.get_autocast_dtype(x.device.type))  # the cast autocast would make
        gh, gw = h // kh, w // kw
        patches = x.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b * gh * gw, c * kh * kw)
        weight = self.weight.reshape(self.out_channels, -1).t()
        if self.bias is None:
            y = patches @ weight
        else:
            y = torch.addmm(self.bias, patches, weight)
        return y.reshape(b, gh, gw, self.out_channels).permute(0, 3, 1, 2)


def _swap_patch_conv(conv: nn.Module) -> None:
    """Make a plain ``nn.Conv2d`` a :class:`PatchConv` (in place)."""
    if type(conv) is nn.Conv2d:
        conv.__class__ = PatchConv


def _swap_attention(model: nn.Module) -> None:
    """Make DINOv2's timm ``Attention`` modules :class:`_DinoAttention` (in place; a timm
    version whose Attention lacks what it uses keeps its own)."""
    base = timm.models.vision_transformer.Attention
    needed = ("qkv", "q_norm", "k_norm", "norm", "proj", "proj_drop", "gate", "attn_dim")
    for m in model.modules():
        if type(m) is base and all(hasattr(m, a) for a in needed):
            m.__class__ = _DinoAttention


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns on the root logger when it builds without weights; we do that on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


logging.getLogger().addFilter(_DropRandomInitWarning())


def _clip_hub(cfg: CraneConfig) -> tuple[str, tuple[str, ...]] | None:
    """Where open_clip downloads ``cfg``'s CLIP weights on the hub: (repo id, file names)."""
    if not cfg.clip_pretrained:
        return None
    hf_hub = (open_clip.get_pretrained_cfg(cfg.clip_model, cfg.clip_pretrained) or {}).get("hf_hub")
    if not hf_hub:
        return None
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or "open_clip_pytorch_model.bin"
    # open_clip downloads a .safetensors twin of the file where the hub has one
    # (download_pretrained_from_hf).
    if filename == "open_clip_pytorch_model.bin":
        twin = "open_clip_model.safetensors"
    else:
        twin = os.path.splitext(filename)[0] + ".safetensors"
    return repo_id, tuple(dict.fromkeys((twin, filename)))


def _dino_hub(cfg: CraneConfig) -> tuple[str, tuple[str, ...]] | None:
    """Where timm downloads ``cfg``'s DINOv2 weights on the hub: (repo id, file names)."""
    pretrained = timm.models.get_pretrained_cfg(cfg.dino_model or "")
    if pretrained is None or not pretrained.hf_hub_id:
        return None
    names = (pretrained.hf_hub_filename,) if pretrained.hf_hub_filename else ()
    return pretrained.hf_hub_id, names or ("model.safetensors", "pytorch_model.bin")


def clip_filenames(cfg: CraneConfig) -> tuple[str, ...]:
    """The names a local copy of ``cfg``'s CLIP weights goes by in the cache folder (and in
    the offline error): the published ones for the presets' OpenAI ViT-L/14-336; for another
    ``clip_model`` / ``clip_pretrained``, names of its own (the presets' would pick, or ask
    for, another model's weights)."""
    preset = PRESETS["crane"]
    if (cfg.clip_model, cfg.clip_pretrained) == (preset.clip_model, preset.clip_pretrained):
        return W.CLIP_FILENAMES
    stem = f"{cfg.clip_model}-{cfg.clip_pretrained}"
    return (f"{stem}.safetensors", f"{stem}.pt", f"{stem}.bin")


def dino_filenames(cfg: CraneConfig) -> tuple[str, ...]:
    """:func:`clip_filenames` for DINOv2: the published names for the presets' ViT-B/14-reg4,
    names of its own for another ``dino_model``."""
    if cfg.dino_model == PRESETS["crane+"].dino_model:
        return W.DINO_FILENAMES
    return tuple(f"{cfg.dino_model}.{ext}" for ext in ("safetensors", "pth", "bin"))


def build_clip(
    cfg: CraneConfig,
    clip_weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    matmul_dtype: torch.dtype | None = None,
) -> nn.Module:
    """open_clip ``CLIP`` for ``cfg.clip_model``; weights per :mod:`crane.models.weights`.

    ``pretrained=False`` (or a tiny preset) gives the randomly initialised architecture, used
    by tests and speed benchmarks. ``matmul_dtype``: where the weights come from a local file,
    the vision tower's big matmul weights (:func:`~crane.models.vision.clip_matmul_weights`)
    are made in that dtype before it is read, so the file's values are converted as they are
    copied in (the values ``CraneModel.cast_frozen_matmuls`` would give, without first
    filling fp32 weights: on the 2-core dev box that cast took 0.8 s for CLIP ViT-L, most of it
    faulting in new memory).
    """
    overrides = copy.deepcopy(cfg.clip_overrides)
    want_weights = pretrained and cfg.clip_pretrained is not None and not overrides
    names = clip_filenames(cfg)
    local = None
    if want_weights:
        local = W.resolve_local(
            clip_weights, W.CLIP_ENV, names, "--clip-weights", "CLIP", _clip_hub(cfg)
        )
    if want_weights and local is None:
        if W.hub_unreachable():
            raise W.offline_error(
                "CLIP",
                names,
                "--clip-weights",
                W.CLIP_ENV,
                "no local file and no network",
                _clip_hub(cfg),
            )
        try:
            model = open_clip.create_model(
                cfg.clip_model, pretrained=cfg.clip_pretrained, cache_dir=str(W.cache_dir())
            )
        except Exception as exc:  # network/hub failures come in many types
            raise W.offline_error(
                "CLIP",
                names,
                "--clip-weights",
                W.CLIP_ENV,
                f"download failed: {exc}",
                _clip_hub(cfg),
            ) from exc
    else:
        # Weights loaded right after need no random initialisation first.
        with W.no_random_init() if local is not None else contextlib.nullcontext():
            model = open_clip.create_model(cfg.clip_model, pretrained=None, **overrides)
        if local is not None and matmul_dtype is not None:
            for w in clip_matmul_weights(model.visual):  # uninitialised: nothing to convert
                w.data = torch.empty(w.shape, dtype=matmul_dtype)
        if local is not None:
            sd = W.load_state_dict_file(local)
            W.load_into(model, sd, local, f"CLIP {cfg.clip_model}")
            log.info("loaded CLIP weights from %s", local)
    model.eval().requires_grad_(False)
    _check_patch(cfg.clip_model, model.visual.patch_size)
    resize_clip_pos_embed(model.visual, cfg.grid)
    _swap_patch_conv(model.visual.conv1)
    swap_linears(model.visual)
    return model


def _check_patch(name: str, patch: int | tuple[int, int]) -> None:
    """Crane's token grid is ``image_size // 14`` for both backbones (SPEC: 37×37 at 518 px),
    so a backbone with other patches would fail later with a bare shape error."""
    size = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if size != (PATCH, PATCH):
        raise CraneError(
            f"{name} has {size[0]}×{size[1]}-px patches; crane runs backbones with "
            f"{PATCH}-px patches only (CLIP ViT-L/14-336 and DINOv2 ViT-B/14 for the presets)"
        )


@torch.no_grad()
def resize_clip_pos_embed(visual: nn.Module, grid: int) -> None:
    """Resize the patch part of CLIP's positional embedding to ``grid x grid`` in place.

    SPEC §2: bilinear, align_corners=False, no antialias; the class position is kept. The
    module then runs natively at ``grid * patch`` pixels, so open_clip's own ``encode_image``
    and our block loop see the same embedding.
    """
    pos = visual.positional_embedding
    n, dim = pos.shape
    old = int(round((n - 1) ** 0.5))
    if old == grid:
        return
    patch = pos[1:].reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, size=(grid, grid), mode="bilinear", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(grid * grid, dim).to(pos.dtype)
    visual.positional_embedding = nn.Parameter(torch.cat([pos[:1], patch]), requires_grad=False)
    ps = visual.patch_size if isinstance(visual.patch_size, tuple) else (visual.patch_size,) * 2
    visual.grid_size = (grid, grid)
    visual.image_size = (grid * ps[0], grid * ps[1])


#: DINOv2's published weights have positions for 518-px inputs: 37x37 patches of 14 px.
_DINO_PUBLISHED_GRID = 37


def _warn_resampled_positions(sd: dict, path: os.PathLike, model: nn.Module) -> None:
    """Warn when a DINOv2 file's position embeddings are not the published 37x37 grid: timm's
    converter resamples them to the model's grid without a word (logged at INFO), so a file
    saved from a model built for another image size (its positions already resampled once)
    gives other features (0.16 apart in a review's repro). Resampling the published grid to
    another ``image_size`` is what DINOv2 itself does, and passes silently."""
    pos = sd.get("pos_embed")
    if not isinstance(pos, torch.Tensor) or pos.ndim != 3:
        return
    n = pos.shape[1]
    side = next((s for s in (math.isqrt(n), math.isqrt(n - 1)) if s * s in (n, n - 1)), None)
    grid = tuple(model.patch_embed.grid_size)
    if side is None or side == _DINO_PUBLISHED_GRID or (side, side) == grid:
        return  # (the published grid, or the model's own: nothing resampled)
    log.warning(
        "%s: DINOv2 position embeddings for a %dx%d patch grid (%d-px inputs), not the "
        "published 37x37 (518 px): resampled to this model's %dx%d; a file saved from a model "
        "built for another image size gives other features than DINOv2's own weights",
        path,
        side,
        side,
        side * model.patch_embed.patch_size[0],
        *grid,
    )


def build_dino(
    cfg: CraneConfig, dino_weights: str | os.PathLike | None = None, pretrained: bool = True
) -> nn.Module:
    """timm DINOv2 ViT-B/14-reg4 at ``cfg.image_size``; original or timm state dicts load."""
    assert cfg.dino_model is not None
    arch, _, tag = cfg.dino_model.partition(".")
    overrides = dict(cfg.dino_overrides)
    want_weights = pretrained and not overrides
    names = dino_filenames(cfg)
    local = None
    if want_weights:
        local = W.resolve_local(
            dino_weights, W.DINO_ENV, names, "--dino-weights", "DINOv2", _dino_hub(cfg)
        )
    kwargs = dict(img_size=cfg.image_size, num_classes=0, **overrides)
    if want_weights and local is None:
        if W.hub_unreachable():
            raise W.offline_error(
                "DINOv2",
                names,
                "--dino-weights",
                W.DINO_ENV,
                "no local file and no network",
                _dino_hub(cfg),
            )
        try:
            model = timm.create_model(
                cfg.dino_model, pretrained=True, cache_dir=str(W.cache_dir()), **kwargs
            )
        except Exception as exc:
            raise W.offline_error(
                "DINOv2",
                names,
                "--dino-weights",
                W.DINO_ENV,
                f"download failed: {exc}",
                _dino_hub(cfg),
            ) from exc
    else:
        with W.no_random_init() if local is not None else contextlib.nullcontext():
            model = timm.create_model(arch, pretrained=False, **kwargs)
        if local is not None:
            from timm.models.vision_transformer import checkpoint_filter_fn

            sd = W.load_state_dict_file(local)
            if "register_tokens" in sd and "mask_token" not in sd:
                # An original-layout file saved without the masking token (unused at inference):
                # timm's converter recognises the layout by that token; it drops it again.
                sd["mask_token"] = torch.zeros(1, sd["register_tokens"].shape[-1])
            _warn_resampled_positions(sd, local, model)
            # timm's own converter maps the original DINOv2 layout (register_tokens, mask_token,
            # 37x37 pos_embed ...) to timm names; timm-format dicts pass through unchanged.
            try:
                sd = checkpoint_filter_fn(sd, model)
            except (RuntimeError, ValueError, KeyError) as exc:  # e.g. a file without registers
                raise WeightsError(
                    f"{local} does not fit the DINOv2 {arch} architecture (timm could not "
                    f"convert it: {exc}); it needs the weights of timm's {cfg.dino_model} "
                    "(for crane+, DINOv2's dinov2_vitb14_reg4_pretrain.pth: with registers)"
                ) from exc
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
            W.load_into(model, sd, local, f"DINOv2 {arch}")
            log.info("loaded DINOv2 weights from %s", local)
    model.eval().requires_grad_(False)
    _check_patch(cfg.dino_model, model.patch_embed.patch_size)
    _swap_attention(model)
    _swap_patch_conv(model.patch_embed.proj)
    swap_linears(model)
    return model
