"""The Crane / Crane+ module: frozen backbones + trainable prompts → maps and scores."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from crane.config import CraneConfig
from crane.errors import CraneError
from crane.models import scoring
from crane.models.checkpoint import finite_threshold
from crane.models.text import PromptLearner, PromptTextEncoder
from crane.models.vision import (
    CraneVisionEncoder,
    VisionOutput,
    clip_matmul_weights,
    strict_fp32,
)

log = logging.getLogger(__name__)


@dataclass
class CraneOutput:
    """Inference result: ``image_scores`` (B,) and smoothed ``anomaly_maps`` (B, H, W) in [0,1]."""

    image_scores: torch.Tensor
    anomaly_maps: torch.Tensor


@dataclass
class TrainOutput:
    """What the training losses need: per-set patch logits and image logits (SPEC §6)."""

    patch_logits: torch.Tensor  # (S, B, N, 2) at the pixel temperature
    image_logits: torch.Tensor  # (B, 2) at the training image temperature


def _strict_fp32(method):
    """Run a CraneModel method under :func:`~crane.models.vision.strict_fp32` on the model's
    device (inside a ``torch.compile`` trace the caller holds it: see
    :func:`crane.engine.runtime.scoring_forward`)."""

    @functools.wraps(method)
    def run(self: CraneModel, *args, **kwargs):
        if torch.compiler.is_compiling():
            return method(self, *args, **kwargs)
        with strict_fp32(self.prompt_learner.ctx_pos.device):
            return method(self, *args, **kwargs)

    return run


def _still_holds(snapshot: list[torch.Tensor | None], tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` still hold their snapshot's values (after a move or a cast, as
    cast; entries None: not compared)."""
    return len(snapshot) == len(tensors) and all(
        old is None or (old.shape == t.shape and torch.equal(old.to(t.device, t.dtype), t))
        for old, t in zip(snapshot, tensors, strict=True)
    )


class CraneModel(nn.Module):
    def __init__(self, cfg: CraneConfig, clip: nn.Module, dino: nn.Module | None = None):
        super().__init__()
        clip.requires_grad_(False)
        if dino is not None:
            dino.requires_grad_(False)
        self.cfg = cfg
        self.vision = CraneVisionEncoder(clip.visual, cfg, dino)
        self.text_encoder = PromptTextEncoder(clip)
        self.prompt_learner = PromptLearner(clip, cfg)
        # The image threshold and the prompts it was set for (see image_threshold).
        self._threshold: tuple[float, list[torch.Tensor]] | None = None
        #: (value, why) of a run's threshold that create_model left out, for the Detector to say.
        self.threshold_not_used: tuple[float, str] | None = None
        self._text_cache: tuple[tuple, torch.Tensor, list] | None = None
        #: Set by :meth:`cast_frozen_matmuls`: the vision tower then needs autocast.
        self.matmul_dtype: torch.dtype | None = None
        #: The seed of randomly initialised backbones (tiny presets, ``pretrained=False``), which
        #: checkpoints store so that a saved run reloads the backbones it was trained with;
        #: None for pretrained weights.
        self.backbone_seed: int | None = None

    def __setstate__(self, state: dict) -> None:
        # A model pickled by an earlier crane: its threshold was a plain attribute (then the
        # prompts it holds are taken as the threshold's), its text cache another tuple.
        old = state.pop("image_threshold", None)
        state["_text_cache"] = None
        state.setdefault("_threshold", None)
        dropped = state.get("threshold_not_used")
        if dropped is not None and not isinstance(dropped, tuple):
            state["threshold_not_used"] = (dropped, "its own prompts, not for these")
        state.setdefault("threshold_not_used", None)
        for name in ("backbone_seed", "matmul_dtype"):  # (added in earlier sessions)
            state.setdefault(name, None)
        super().__setstate__(state)
        if old is not None and self._threshold is None:
            self.image_threshold = old

    @property
    def image_threshold(self) -> float | None:
        """Image-level decision threshold (set by calibration / stored in checkpoints).

        It belongs to the prompts it was set for: once they change (loaded from elsewhere,
        trained further), this is None, with a warning the first time.
        """
        if self._threshold is None:
            return None
        value, snapshot = self._threshold
        if _still_holds(snapshot, self._prompt_tensors()):
            return value
        log.warning(
            "the image threshold %s was set for other prompts than this model now holds, "
            "and is dropped (calibrate again for these prompts)",
            value,
        )
        self._threshold = None
        return None

    @image_threshold.setter
    def image_threshold(self, value: float | None) -> None:
        if value is None:
            self._threshold = None
            return
        value = finite_threshold(value, "image_threshold")  # (np.percentile's NumPy scalar)
        self._threshold = (value, [t.detach().clone() for t in self._prompt_tensors()])

    def _prompt_tensors(self) -> list[torch.Tensor]:
        pl = self.prompt_learner
        return [*pl.parameters(), *pl.buffers()]

    # -- training mode only touches the prompts; backbones stay in eval (no dropout etc.) ---
    def train(self, mode: bool = True) -> CraneModel:
        if mode != self.training:
            # (A switch of mode also ends the text cache: an optimizer that writes the
            # prompts without bumping their version counters, as torch's fused Adam, may
            # have run in between. eval() on an eval model keeps it.)
            self._text_cache = None
        super().train(mode)
        self.vision.eval()
        self.text_encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.prompt_learner.parameters())

    # -- text ------------------------------------------------------------------------------
    @_strict_fp32
    def text_features(self, context: torch.Tensor | None = None) -> torch.Tensor:
        """Static (2, E) features, or per-image (B, 2, E) when an image context is given."""
        pl = self.prompt_learner
        deep = list(pl.compound_prompts_text)
        embeds, eot = pl.prompts(context)
        if context is None:
            return self.text_encoder(embeds, eot, deep, pl.deep_len)
        b = context.shape[0]
        feats = self.text_encoder(embeds.flatten(0, 1), eot.flatten(), deep, pl.deep_len)
        return feats.view(b, 2, -1)

    def static_text_features(self) -> torch.Tensor:
        """Static text features, computed once and reused until a prompt tensor changes.

        A change is seen through the prompt tensors' version counters (any in-place op, an
        optimizer step, ``load_state_dict``), a switch between train and eval mode, and, for
        prompts on the CPU, their values. Writes that bypass the version counter on a GPU
        (through ``.data``, or torch's fused optimizers in eval mode) need
        :meth:`clear_text_cache` (comparing values there would wait for the GPU every batch).
        """
        if torch.is_grad_enabled() and self.training:
            return self.text_features()
        tensors = self._prompt_tensors()
        if any(t.is_inference() for t in tensors):  # (built under torch.inference_mode: no
            with torch.no_grad():  # version counter tells a change; two prompts, cheap)
                return self.text_features()
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        cache = self._text_cache
        if cache is None or cache[0] != key or not _still_holds(cache[2], tensors):
            with torch.no_grad():
                snapshot = [t.detach().clone() if t.device.type == "cpu" else None for t in tensors]
                self._text_cache = cache = (key, self.text_features(), snapshot)
        return cache[1]

    def clear_text_cache(self) -> None:
        """Forget the cached static text features (after writing prompts through ``.data``)."""
        self._text_cache = None

    # -- vision ----------------------------------------------------------------------------
    @torch.no_grad()
    @_strict_fp32
    def encode_images(self, images: torch.Tensor) -> VisionOutput:
        """Frozen vision features; the only expensive part, cacheable across epochs."""
        kind = images.device.type
        now = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else "fp32"
        if self.matmul_dtype is not None and now != self.matmul_dtype:
            raise CraneError(
                f"this model's frozen matmul weights are stored in {self.matmul_dtype} "
                f"(cast_frozen_matmuls) but it runs in {now}; run it under torch.autocast "
                "with that dtype (e.g. Detector(precision='bf16') for bfloat16), or rebuild it"
            )
        return self.vision(images)

    @torch.no_grad()
    def cast_frozen_matmuls(self, dtype: torch.dtype) -> CraneModel:
        """Store the vision backbones' big matmul weights in ``dtype`` (bf16/fp16), in place.

        For inference under autocast of the same dtype this changes no result: autocast casts
        exactly these weights to ``dtype`` before every matmul anyway. It halves their memory
        and removes the per-forward casts. Kept in fp32: norms, embeddings, ``ln_post``/``proj``
        and ``out_proj`` (D-Attn uses it in fp32), the text tower (run once for static
        prompts), and DINOv2 when ``cfg.dino_fp32``; with ``cfg.dino_fp16`` DINOv2's weights
        are stored in fp16, the dtype its autocast casts them to. Afterwards the vision tower
        refuses to run without autocast.
        """
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"cast_frozen_matmuls takes bfloat16 or float16, got {dtype}")
        for w in clip_matmul_weights(self.vision.visual):
            w.data = w.data.to(dtype)  # (a no-op for weights built in dtype, see create_model)
        dino = self.vision.dino
        if dino is not None and not self.cfg.dino_fp32:
            dino_dtype = torch.float16 if self.cfg.dino_fp16 else dtype
            for m in dino.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.weight.data = m.weight.data.to(dino_dtype)
        self.matmul_dtype = dtype
        return self

    # -- heads -----------------------------------------------------------------------------
    @_strict_fp32
    def predict_from_features(self, vis: VisionOutput, size: int) -> CraneOutput:
        with torch.autocast(vis.patch_sets.device.type, enabled=False):
            return self._scores(vis, size)

    def _scores(self, vis: VisionOutput, size: int) -> CraneOutput:
        """Scoring in fp32 whatever the backbone precision (logits are scaled by 1/0.07)."""
        cfg = self.cfg
        vis = VisionOutput(vis.global_feat.float(), vis.patch_sets.float())
        if cfg.image_context_inference:
            text = self.text_features(context=vis.global_feat)
        else:
            text = self.static_text_features()
        text = text.float()
        logits = scoring.patch_logits(vis.patch_sets, text, cfg.pixel_temperature)
        maps = scoring.anomaly_map(logits, size, cfg.map_combine)
        maps = scoring.gaussian_blur(maps, cfg.sigma)
        fused = scoring.fused_image_feature(
            vis.patch_sets, logits, vis.global_feat, cfg.fusion_alpha
        )
        img = scoring.image_logits(fused, text, cfg.image_temperature)
        return CraneOutput(image_scores=torch.softmax(img.float(), -1)[:, 1], anomaly_maps=maps)

    def forward(self, images: torch.Tensor) -> CraneOutput:
        """CLIP-normalised images (B, 3, S, S) → scores (B,) and maps (B, S, S)."""
        return self.predict_from_features(self.encode_images(images), images.shape[-1])

    @_strict_fp32
    def forward_train(self, vis: VisionOutput) -> TrainOutput:
        """Differentiable w.r.t. the prompts only; ``vis`` may come from a feature cache."""
        cfg = self.cfg
        context = vis.global_feat if cfg.image_context_train else None
        text = self.text_features(context)
        logits = scoring.patch_logits(vis.patch_sets.float(), text, cfg.pixel_temperature)
        fused = scoring.fused_image_feature(
            vis.patch_sets.float(), logits, vis.global_feat.float(), cfg.fusion_alpha
        )
        img = scoring.image_logits(fused, text, cfg.train_image_temperature)
        return TrainOutput(patch_logits=logits, image_logits=img)
