"""``create_model``: presets or checkpoint directories → a ready :class:`CraneModel`."""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any

import torch

from crane.config import PRESETS, CraneConfig, get_config, is_tiny
from crane.errors import CheckpointError, CraneError, WeightsError
from crane.models import checkpoint as ckpt
from crane.models import weights as W
from crane.models.backbones import _dino_hub, build_clip, build_dino, dino_filenames
from crane.models.crane import CraneModel

log = logging.getLogger(__name__)

PACKAGED_OFFICIAL = Path(__file__).resolve().parents[1] / "assets" / "crane-official"


def official_prompts_dir() -> Path:
    """``$CRANE_OFFICIAL_PROMPTS`` if set, else the copies shipped inside the package."""
    env = os.environ.get(ckpt.OFFICIAL_ENV)
    return Path(env).expanduser() if env else PACKAGED_OFFICIAL


def _verify_sha256(path: Path, rel: str, release: bool = False) -> None:
    """Check ``path`` against the ``SHA256SUMS`` of its release folder where that lists
    ``rel``. ``release``: the file is one of the authors' released ones (``official:``), so
    a copy without its sums (the authors' repository ships none) is checked against the
    sums packaged with crane."""
    sums = path.parents[1] / "SHA256SUMS"
    if not sums.is_file() and release:
        sums = PACKAGED_OFFICIAL / "SHA256SUMS"
    if not sums.is_file():
        return
    expected = _read_sums(sums)
    if rel in expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected[rel]:
        hint = (
            " (official: names the authors' released files; give a file of your own as "
            "--prompts PATH)"
            if release
            else ""
        )
        raise CheckpointError(
            f"{path} does not match its SHA256 in {sums}: the file is damaged or altered{hint}"
        )


def _read_sums(sums: Path) -> dict[str, str]:
    """A ``SHA256SUMS`` file as {file name: lower-case digest}."""
    expected = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition(" ")
        if name:  # (`sha256sum` writes "HASH  name", "HASH *name" in binary mode, maybe "./")
            expected[name.strip().lstrip("*").removeprefix("./")] = digest.lower()
    return expected


def _packaged_release_name(path: Path) -> str | None:
    """The release name (``trained_on_visa_cranep/epoch_5.pth``) of a file whose SHA256 the
    sums packaged with crane list, or None."""
    try:
        if path.stat().st_size > 64 << 20:  # (released prompt files are a few MB)
            return None
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        expected = _read_sums(PACKAGED_OFFICIAL / "SHA256SUMS")
    except OSError:
        return None
    return next((name for name, listed in expected.items() if listed == digest), None)


def resolve_official(trained_on: str, preset: str) -> Path:
    """Path of a released prompt file, e.g. ``("mvtec", "crane+")`` (checksum-verified)."""
    base_preset = "crane+" if preset.endswith("+") else "crane"
    try:
        rel = ckpt.OFFICIAL[(trained_on, base_preset)]
    except KeyError:
        known = sorted({k[0] for k in ckpt.OFFICIAL if k[1] == base_preset})
        raise CheckpointError(
            f"no released prompts for {base_preset} trained on {trained_on!r}; known: {known}"
        ) from None
    path = official_prompts_dir() / rel
    if not path.is_file():
        raise CheckpointError(
            f"released Crane prompt file {rel} not found under {official_prompts_dir()}. Set "
            f"{ckpt.OFFICIAL_ENV} to the folder holding trained_on_*/epoch_*.pth (the "
            "'checkpoints' folder of the authors' repository AlirezaSalehy/Crane), or pass "
            "--prompts /path/to/epoch_5.pth."
        )
    _verify_sha256(path, rel, release=True)
    return path


#: Config fields that leave image scores as they are (training-only fields, the maps' own
#: map_combine and sigma, and precision
#: options that move scores in their last bits, which a calibrated threshold tolerates: it
#: sits midway between neighbouring scores). Overriding any other field of a calibrated run
#: drops its threshold.
SCORE_NEUTRAL_FIELDS = frozenset(
    {"dino_fp32", "dino_tf32", "dino_attn_fp16", "dino_fp16", "tail_tf32",
     "train_image_temperature", "image_context_train", "train_set_multiplicity",
     "map_combine", "sigma"}
)  # fmt: skip


def create_model(
    name: str = "crane+",
    *,
    clip_weights: str | os.PathLike | None = None,
    dino_weights: str | os.PathLike | None = None,
    prompts: str | os.PathLike | dict[str, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    pretrained: bool | None = None,
    seed: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    **overrides: Any,
) -> CraneModel:
    """Build a Crane model.

    Args:
        name: a preset (``crane``, ``crane+``, ``tiny``, ``tiny+``; see ``list_models()``) or a
            checkpoint directory written by :func:`crane.save_model` / ``crane train``.
        clip_weights, dino_weights: local weight files (else env vars / cache / download).
        prompts: released ``.pth`` file, ``official:<trained_on>`` (``mvtec``, ``visa``,
            ``mvtec-medical``), a checkpoint directory, a state dict, or None for the
            random N(0, 0.02²) initialisation.
        pretrained: False builds randomly initialised backbones (tests, speed benchmarks);
            None (the default): pretrained weights, except for a run saved from random
            backbones, which rebuilds those (its ``backbone_seed``).
        seed: seeds every random initialisation, so tiny/random models are reproducible
            (default 0; for a checkpoint, the seed its random backbones were built with).
        matmul_dtype: bf16/fp16: the frozen matmul weights stored in that dtype, for inference
            under autocast of it (:meth:`CraneModel.cast_frozen_matmuls`; CLIP's are converted
            as they are read from a local weight file).
        overrides: config fields to change (ablations), e.g. ``attn_type="vv"``.
    """
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise CraneError(f"seed must be an integer, got {seed!r}")
    seed = None if seed is None else int(seed)  # (a NumPy integer: a Python one)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise CraneError(f"unknown device {device!r} (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    meta: dict[str, Any] = {}
    state = None
    if names_a_run(name):
        run_cfg, state, meta = ckpt.read_checkpoint(name)
        cfg = run_cfg.replace(**overrides) if overrides else run_cfg
        base_cfg = run_cfg
    else:
        cfg = run_cfg = get_config(str(name), **overrides)
        base_cfg = get_config(str(name)) if overrides else cfg
    if seed is None:
        seed = meta.get("backbone_seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise CheckpointError(f"{name}: backbone_seed must be an integer, got {seed!r}")
    threshold = meta.get("image_threshold")
    if threshold is not None and (
        not isinstance(threshold, (int, float))
        or isinstance(threshold, bool)
        or not math.isfinite(threshold)
    ):
        raise CheckpointError(
            f"{name}: image_threshold must be a finite number, got {threshold!r} (run crane "
            "calibrate again, or remove it from the run's config.json)"
        )

    dropped = None  # a run's threshold left out: its prompts are replaced
    if prompts is not None:  # (read first: a bad prompt file is reported before the backbones)
        state = load_prompt_state(prompts, cfg)
        if threshold is not None and not _names_the_run(prompts, name):
            # (found for the run's own prompts' scores; a Detector without a threshold of
            # its own says so)
            dropped, threshold = (threshold, "its own prompts, not for these"), None
    if threshold is not None:  # (another image temperature, attention type... moves scores)
        changed = [
            k
            for k in sorted(overrides)
            if k not in SCORE_NEUTRAL_FIELDS and getattr(cfg, k) != getattr(run_cfg, k)
        ]
        if changed:
            dropped, threshold = (threshold, f"the run's own {', '.join(changed)}"), None

    preset = PRESETS.get(cfg.name)
    if (
        pretrained is not False
        and "backbone_seed" not in meta
        and cfg.clip_overrides
        and not (preset is not None and is_tiny(preset))  # (random by design)
    ):
        log.warning(
            "clip_overrides %s: the backbones are built randomly initialised (CLIP%s), not "
            "from pretrained weights; pass pretrained=False to ask for that",
            dict(cfg.clip_overrides),
            " and DINOv2" if cfg.use_dattn else "",
        )
    if pretrained is None:  # (a run trained on random full-size backbones rebuilds them)
        pretrained = "backbone_seed" not in meta or is_tiny(cfg)
    elif pretrained and "backbone_seed" in meta and not is_tiny(cfg):
        log.warning(
            "%s was trained on randomly initialised backbones (seed %s); pretrained=True loads "
            "pretrained ones instead, which its prompts were not trained with",
            name,
            meta["backbone_seed"],
        )
    random_backbones = not pretrained or is_tiny(cfg)
    random_dino = random_backbones or bool(cfg.dino_overrides)  # (build_dino: overrides → random)
    unused = [
        flag
        for flag, value, used in (
            ("--clip-weights", clip_weights, not random_backbones),
            ("--dino-weights", dino_weights, not random_dino and cfg.use_dattn),
        )
        if value is not None and not used
    ]
    if unused:
        log.warning(
            "%s not used: %s", " and ".join(unused),
            "this model's backbones are random (pretrained=False or a test preset)"
            if random_backbones
            else "dino_overrides build a randomly initialised DINOv2"
            if cfg.use_dattn
            else f"{cfg.name} has no DINOv2",
        )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**64)  # (torch's range; negative seeds map as torch maps them)
        try:
            clip = build_clip(cfg, clip_weights, not random_backbones, matmul_dtype)
        except WeightsError as exc:
            if not cfg.use_dattn or random_backbones:
                raise
            said = str(exc) if str(exc).endswith(".") else f"{exc}."
            raise WeightsError(f"{said}{_dino_missing_too(cfg, dino_weights)}") from exc.__cause__
        dino = (
            build_dino(cfg, dino_weights, pretrained=not random_backbones)
            if cfg.use_dattn
            else None
        )
        # The prompts' initialisation from ``seed`` alone: building the backbones draws
        # random numbers or not by where their weights come from (a download runs the
        # libraries' random initialisation first, a local or cached file does not), which
        # gave one --seed two different starting prompts.
        torch.manual_seed(seed % 2**64)
        model = CraneModel(cfg, clip, dino)
        model.backbone_seed = seed if random_backbones else None
        if random_dino and not random_backbones and cfg.use_dattn and dino_weights is None:
            log.warning(
                "dino_overrides %s: DINOv2 is built randomly initialised, not from weights",
                dict(cfg.dino_overrides),
            )

    if state is not None:
        own = model.prompt_learner.state_dict()
        where = (
            "the prompt state dict given"
            if isinstance(prompts, dict)
            else str(prompts if prompts is not None else name)
        )
        ckpt.check_prompt_state(own, state, where)
        # A template asked for in ``overrides`` keeps the buffers the model built from it: the
        # file's (its own template's token ids and embeddings) silently undid it.
        asked = [
            tag
            for tag, key in (("pos", "normal_template"), ("neg", "anomaly_template"))
            if key in overrides and getattr(cfg, key) != getattr(base_cfg, key)
        ]
        if asked:
            kept = {
                f"{buffer}_{tag}": own[f"{buffer}_{tag}"]
                for tag in asked
                for buffer in ("tokenized_prompts", "token_prefix", "token_suffix")
            }
            state = {**state, **kept}
        model.prompt_learner.load_state_dict(state, strict=True)
    model.image_threshold = None if threshold is None else float(threshold)  # (these prompts')
    model.threshold_not_used = dropped
    model.eval()
    if matmul_dtype is not None:
        model.cast_frozen_matmuls(matmul_dtype)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _dino_missing_too(cfg: CraneConfig, dino_weights: str | os.PathLike | None) -> str:
    """For the CLIP weights' error of a Crane+ model: a sentence on the DINOv2 file when it is
    missing as well, so that one run names every file to fetch (the CLIP error means the
    hubs were not reachable either)."""
    names = dino_filenames(cfg)
    try:
        local = W.resolve_local(
            dino_weights, W.DINO_ENV, names, "--dino-weights", "DINOv2", _dino_hub(cfg)
        )
    except WeightsError as exc:  # a path given for it that does not exist
        return f" DINOv2, too: {exc}"
    if local is not None:
        return ""
    name = names[0]
    return (
        f" Crane+ also needs the DINOv2 weights, which are missing too: the file {name} (any "
        f"of: {', '.join(names)}), passed as --dino-weights /path/to/{name}, or set "
        f"as {W.DINO_ENV}=/path/to/{name}, or copied to {W.cache_dir() / name}."
    )


_WARNED: set[str] = set()


def names_a_run(name: Any) -> bool:
    """Whether a ``--model`` name means a run folder (or its prompts file) rather than a
    preset: a ``.safetensors`` path, a folder holding a checkpoint config, or a folder that is
    no preset's name (so that it gets the error saying why it is no checkpoint). A folder
    named like a preset that holds no checkpoint (``src/crane``, an ``--out crane`` of
    predictions) does not hide the preset."""
    text = os.fspath(name) if isinstance(name, (str, os.PathLike)) else str(name)
    path = Path(text)
    if text.endswith(".safetensors"):  # (a run's own prompts file, or the error saying why not)
        return True
    if not path.is_dir():
        return False
    if (path / ckpt.CONFIG).is_file():
        if text in PRESETS and str(path.resolve()) not in _WARNED:
            _WARNED.add(str(path.resolve()))
            log.warning("%s: the run folder %s is used, not the preset of that name", text, path)
        return True
    return text not in PRESETS


def load_prompt_state(source: Any, cfg: CraneConfig) -> dict[str, torch.Tensor]:
    if isinstance(source, dict):
        return source
    text = str(source)
    if text.startswith("official:"):
        return ckpt.load_released_prompts(resolve_official(text.split(":", 1)[1], cfg.name))
    path = Path(text)
    if path.suffix == ".safetensors" and (
        path.name != ckpt.TENSORS or not (path.parent / ckpt.CONFIG).is_file()
    ):
        # This very file: a bare prompts file, or one beside a run's that is not the run's
        # own (that run's prompts are not what was named)
        return ckpt.read_prompt_tensors(path)
    if path.is_dir() or path.suffix == ".safetensors":
        theirs, state, _ = ckpt.read_checkpoint(path)
        _warn_other_model(path, theirs.name, theirs.use_dattn, cfg)
        return state
    # The release's folders say which preset trained the file; a copy of a released file
    # under another name is known by its SHA256 in the sums packaged with crane.
    parts = [p for p in path.parts if p.startswith("trained_on_")]
    if not parts and path.is_file():
        parts = Path(_packaged_release_name(path) or "").parts
    for part in parts:
        if part.startswith("trained_on_") and part.endswith(("_crane", "_cranep")):
            _warn_other_model(path, "crane+" if part.endswith("p") else "crane", None, cfg)
    full = path.resolve()
    if full.is_file() and len(full.parts) >= 3:
        # A release file named by its path: checked as official: does, where the release's
        # SHA256SUMS lists it (its folder's parent holds the sums)
        _verify_sha256(full, f"{full.parent.name}/{full.name}")
    return ckpt.load_released_prompts(path)


def _warn_other_model(path: Path, name: str, use_dattn: bool | None, cfg: CraneConfig) -> None:
    """Prompts trained with another preset fit any model of the same prompt shapes, but they
    learned another model's features: said, not refused (an experiment may want it)."""
    family = {"crane": False, "crane+": True, "tiny": False, "tiny+": True}
    theirs = use_dattn if use_dattn is not None else family.get(name)
    if theirs is not None and theirs != cfg.use_dattn:
        log.warning(
            "the prompts in %s were trained with %s, this model is %s (%s D-Attn): its scores "
            "are not that model's",
            path,
            name,
            cfg.name,
            "with" if cfg.use_dattn else "without",
        )


def _names_the_run(prompts: object, run: str | os.PathLike) -> bool:
    """Whether ``prompts`` are the run's own (its folder or its prompts file)."""
    if not isinstance(prompts, (str, os.PathLike)):
        return False
    own = Path(run).resolve()
    return Path(prompts).resolve() in (own, own / ckpt.TENSORS)


def save_model(
    model: CraneModel, directory: str | os.PathLike, overwrite: bool = False, **provenance
) -> Path:
    """Save a model's prompts, config and threshold in our checkpoint format."""
    return ckpt.save_checkpoint(
        directory,
        model.cfg,
        model.prompt_learner.state_dict(),
        image_threshold=model.image_threshold,
        provenance=provenance,
        overwrite=overwrite,
        backbone_seed=model.backbone_seed,
    )
