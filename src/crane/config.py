"""Model presets as data (SPEC §7).

A preset is a frozen :class:`CraneConfig`; ablations are ``dataclasses.replace`` on it
(or keyword overrides to :func:`crane.create_model`), never ``if`` chains in model code.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from crane.errors import CraneError

AttnType = Literal["qq", "kk", "vv", "qq+kk", "qq+kk+vv"]
MapCombine = Literal["soft_mean", "logit_mean"]
ThresholdScope = Literal["image", "batch"]

ATTN_TYPES: tuple[str, ...] = ("qq", "kk", "vv", "qq+kk", "qq+kk+vv")

#: Both backbones' patch size in pixels: the token grid is ``image_size // PATCH``.
PATCH = 14

#: open_clip overrides that shrink ViT-L/14-336 into the ``tiny`` test backbone. Built by the
#: same ``open_clip.create_model`` call as the real one; only the sizes differ.
TINY_CLIP = {
    "embed_dim": 64,  # = text width: the image context token is inserted unprojected
    "vision_cfg": {"image_size": 112, "layers": 4, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
}
#: timm overrides for the ``tiny+`` DINOv2 stand-in (same architecture family, registers kept).
TINY_DINO = {"embed_dim": 48, "depth": 2, "num_heads": 2}


@dataclass(frozen=True)
class CraneConfig:
    """Everything that defines a Crane model. Defaults are the reference ``crane+`` values."""

    name: str = "crane+"
    # --- backbones -------------------------------------------------------------------------
    clip_model: str = "ViT-L-14-336-quickgelu"
    clip_pretrained: str | None = "openai"
    clip_overrides: dict[str, Any] = field(default_factory=dict)
    dino_model: str | None = "vit_base_patch14_reg4_dinov2.lvd142m"
    dino_overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int = 518
    # --- vision side (SPEC §3) -------------------------------------------------------------
    eattn_start: int = 6  # first block (1-indexed) of the E-Attn path; the path starts from h_5
    attn_type: AttnType = "qq+kk+vv"
    feature_layers: tuple[int, ...] = (24,)  # E-Attn layers whose tokens form patch sets
    use_dattn: bool = True
    dattn_layer: int = 24
    dattn_gamma: float = 3.0
    dattn_beta: float = 1.2
    dattn_threshold_scope: ThresholdScope = "image"
    # DINOv2 in fp32 even under bf16/fp16 autocast: the D-Attn cut at S' = 0 flips entries
    # when the similarities are rounded to bf16 (measured on tiny+: maps move 1.0e-2 with a
    # bf16 DINO, 4e-3 with an fp32 one). Costs ~20% of Crane+'s FLOPs at full precision.
    dino_fp32: bool = True
    # With ``dino_fp32`` under autocast on CUDA, let DINOv2's fp32 matmuls use TF32 tensor
    # cores (10-bit mantissa, bf16 has 7): most of the speed of a bf16 DINO, little of its
    # error. Plain fp32 runs (no autocast) are never affected.
    dino_tf32: bool = True
    # With ``dino_fp32`` under autocast, run DINOv2's attention as fp16 flash attention (q/k/v
    # rounded to the same 10-bit mantissa TF32 gives matmul inputs; softmax and sums in fp32),
    # on any device. fp32 attention has no tensor-core kernel: it was 26% of Crane+'s H100
    # time. On an H200 (batch 32, bf16) this took Crane+ from 133 to 173 img/s with maps
    # within 2.1e-3 of fp32 (1.9e-3 without it). Plain fp32 runs are never affected.
    dino_attn_fp16: bool = True
    # With ``dino_fp32=False`` under autocast, run DINOv2 under fp16 autocast (whatever the
    # outer dtype) instead of the outer one: its matmul inputs keep fp16's 10-bit mantissa,
    # as TF32 does, at the tensor cores' bf16 rate (bf16 keeps 7 bits). Its residual stream
    # stays fp32 (LayerScale's fp32 gamma promotes each branch); fp16's ±65504 range applies
    # to the matmul outputs, and an overflow surfaces as a NaN score (reported, never scored).
    dino_fp16: bool = False
    # Under autocast on CUDA, let the fp32 tail of the vision side — D-Attn's N×N mixing of
    # the values, its out_proj, and every ln_post/proj projection — use TF32 tensor cores.
    # D-Attn's similarity (cut at S' = 0) stays strict fp32. These products ran at ≈ 43
    # TFLOP/s, 8.1 ms of a 188-ms batch of 32 on an H100; emulated on the CPU, TF32 moved
    # Crane+'s maps by 6.6e-5 (random weights). Speed not yet measured: off by default.
    # Plain fp32 runs (no autocast) are never affected.
    tail_tf32: bool = False
    # --- text side (SPEC §4) ---------------------------------------------------------------
    n_ctx: int = 12
    n_deep: int = 8
    deep_len: int = 4
    normal_template: str = "object."
    anomaly_template: str = "damaged object."
    image_context_train: bool = True
    image_context_inference: bool = False
    # --- scores (SPEC §5) and training (SPEC §6) --------------------------------------------
    map_combine: MapCombine = "logit_mean"
    pixel_temperature: float = 0.07
    image_temperature: float = 0.07
    train_image_temperature: float = 0.01
    fusion_alpha: float = 0.5
    sigma: float = 4.0
    # The reference returns its single layer-24 set this many times; training counts it so.
    train_set_multiplicity: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # (types: CraneConfig(image_size="224") as replace)
            value = getattr(self, f.name)
            checked = _checked_field(f.name, value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        if self.attn_type not in ATTN_TYPES:
            raise CraneError(f"attn_type must be one of {ATTN_TYPES}, got {self.attn_type!r}")
        if self.map_combine not in ("soft_mean", "logit_mean"):
            raise CraneError(
                f"map_combine must be soft_mean or logit_mean, got {self.map_combine!r}"
            )
        if self.dattn_threshold_scope not in ("image", "batch"):
            raise CraneError("dattn_threshold_scope must be 'image' or 'batch'")
        if self.dino_fp16 and self.dino_fp32:
            raise CraneError(
                "dino_fp16=True runs DINOv2 under fp16 autocast and needs dino_fp32=False"
            )
        if self.use_dattn and not self.dino_model:
            raise CraneError("use_dattn=True needs a dino_model")
        if not self.feature_layers and not self.use_dattn:
            raise CraneError("a model needs at least one patch set (feature_layers or D-Attn)")
        if any(layer < self.eattn_start for layer in self.feature_layers):
            raise CraneError(
                f"feature_layers {self.feature_layers} must be >= eattn_start {self.eattn_start}"
            )
        if self.train_set_multiplicity < 1:  # (0 would drop the pixel losses, < 0 invert them)
            raise CraneError(
                f"train_set_multiplicity counts each patch set in the local loss and must be "
                f">= 1, got {self.train_set_multiplicity}"
            )
        if self.image_size % PATCH or self.image_size < PATCH:
            raise CraneError(
                f"image_size must be a positive multiple of the patch size {PATCH}, got "
                f"{self.image_size}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // PATCH

    @property
    def n_sets(self) -> int:
        return len(self.feature_layers) + int(self.use_dattn)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["feature_layers"] = list(self.feature_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CraneConfig:
        """A saved config. Fields it lacks (a file written before they existed, or edited)
        come from the preset its ``name`` names, never from another preset's defaults; a
        config that lacks fields and names no preset is refused."""
        base = PRESETS.get(d.get("name")) if isinstance(d.get("name"), str) else None
        if base is None:
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in d]
            if missing:
                raise CraneError(
                    f"the config lacks {', '.join(missing)} and names no preset to take them "
                    f"from (name {d.get('name')!r}; presets: {', '.join(PRESETS)})"
                )
            base = cls()
        return base.replace(**d)  # (unknown fields, wrong types: a CraneError naming them)

    def replace(self, **changes: Any) -> CraneConfig:
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise CraneError(
                f"unknown config field{'s' * (len(unknown) > 1)} {', '.join(unknown)}; the "
                f"fields are {', '.join(fields)}"
            )
        changes = {k: _checked_field(k, v) for k, v in changes.items()}
        return dataclasses.replace(self, **changes)


def _checked_field(name: str, value: Any) -> Any:
    """``value`` for the config field ``name``, of the field's type (ints taken for floats,
    lists for tuples), or a CraneError saying what the field takes: a config read from a
    file must not crash deep inside the model or mean something else (``"false"`` is true)."""
    hint = _HINTS[name]
    wanted = None
    if hint is bool:
        # (numpy's bool scalars too: not a bool subclass)
        if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
            value = bool(value)
        ok, wanted = isinstance(value, bool), "true or false"
    elif hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        wanted, value = "an integer", int(value) if ok else value
    elif hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        wanted, value = "a number", float(value) if ok else value
    elif hint is str:
        ok, wanted = isinstance(value, str), "a string"
    elif name == "feature_layers":
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
        )
        wanted, value = "a list of block numbers", tuple(int(v) for v in value) if ok else value
    elif name in ("clip_overrides", "dino_overrides"):
        ok, wanted = isinstance(value, dict), "a mapping of overrides"
    elif name in ("clip_pretrained", "dino_model"):
        ok, wanted = value is None or isinstance(value, str), "a name or null"
    else:  # Literal fields: checked with their values in __post_init__
        ok = isinstance(value, str)
        wanted = "a string"
    if not ok:
        raise CraneError(f"config field {name} must be {wanted}, got {value!r}")
    return value


_HINTS = {
    f.name: {"bool": bool, "int": int, "float": float, "str": str}.get(str(f.type), f.type)
    for f in dataclasses.fields(CraneConfig)
}
_CRANE_PLUS = CraneConfig()
_CRANE = _CRANE_PLUS.replace(
    name="crane",
    dino_model=None,
    use_dattn=False,
    map_combine="soft_mean",
    train_set_multiplicity=4,
)
_TINY_COMMON = dict(
    clip_pretrained=None,
    clip_overrides=TINY_CLIP,
    image_size=224,
    eattn_start=2,
    feature_layers=(4,),
    dattn_layer=4,
    n_deep=2,
)
_TINY = _CRANE.replace(name="tiny", **_TINY_COMMON)
_TINY_PLUS = _CRANE_PLUS.replace(name="tiny+", dino_overrides=TINY_DINO, **_TINY_COMMON)

PRESETS: dict[str, CraneConfig] = {c.name: c for c in (_CRANE, _CRANE_PLUS, _TINY, _TINY_PLUS)}


def list_models() -> list[str]:
    """Names accepted by :func:`crane.create_model`."""
    return list(PRESETS)


def get_config(name: str, **overrides: Any) -> CraneConfig:
    """The preset ``name`` with ``overrides`` applied (unknown name -> clear error)."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise CraneError(f"a model preset is named by a string, got {name!r}")
    try:
        cfg = PRESETS[name]
    except KeyError:
        looks_like_path = "/" in name or "\\" in name or name.startswith(".")
        hint = " (as a run directory: no such folder)" if looks_like_path else ""
        if os.path.isfile(name):
            hint = " (a file: --model takes a run's folder; prompt files go to --prompts)"
        raise CraneError(
            f"unknown model preset {name!r}{hint}; presets: {', '.join(PRESETS)}, or a run "
            "directory written by crane train"
        ) from None
    return cfg.replace(**overrides) if overrides else cfg


def is_tiny(cfg: CraneConfig) -> bool:
    """Tiny presets are built with random backbones (no pretrained weights exist for them)."""
    return bool(cfg.clip_overrides)
