"""Prompt weights on disk: the authors' released files and our own format.

Our format is a directory holding ``prompts.safetensors`` (the prompt learner's tensors) and
``config.json`` (preset, full config, image threshold, training provenance). Loading never
unpickles anything. The released ``.pth`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from crane.config import CraneConfig
from crane.errors import CheckpointError, CraneError
from crane.files import atomic_write_bytes
from crane.models.weights import all_finite, describe_file, is_torchscript

FORMAT = "crane-checkpoint"
FORMAT_VERSION = 1
TENSORS = "prompts.safetensors"
CONFIG = "config.json"

#: Released prompt files by (training dataset, preset) — SPEC §7. Relative to the
#: ``checkpoints/crane-official`` folder of the authors' repository.
OFFICIAL = {
    ("mvtec", "crane"): "trained_on_mvtec_crane/epoch_5.pth",
    ("visa", "crane"): "trained_on_visa_crane/epoch_5.pth",
    ("mvtec", "crane+"): "trained_on_mvtec_cranep/epoch_5.pth",
    ("visa", "crane+"): "trained_on_visa_cranep/epoch_5.pth",
    # Medical sets use this file (really the epoch-4 save, despite its name).
    ("mvtec-medical", "crane+"): "trained_on_mvtec_cranep/epoch_1.pth",
}
OFFICIAL_ENV = "CRANE_OFFICIAL_PROMPTS"


def check_prompt_state(model_sd: dict[str, torch.Tensor], sd: dict[str, Any], source: str) -> None:
    """Clear error on any missing key, unexpected key or shape mismatch."""
    problems = []
    for k, v in model_sd.items():
        if k not in sd:
            problems.append(f"missing {k}")
        elif not isinstance(sd[k], torch.Tensor):
            problems.append(f"{k} is a {type(sd[k]).__name__}, not a tensor")
        elif tuple(sd[k].shape) != tuple(v.shape):
            problems.append(f"{k} has shape {tuple(sd[k].shape)}, model expects {tuple(v.shape)}")
        elif sd[k].is_floating_point() != v.is_floating_point():
            problems.append(f"{k} holds {sd[k].dtype} values, the model {v.dtype} ones")
        elif not all_finite(sd[k]):
            problems.append(f"{k} holds NaN or infinite values")
    problems += [f"unexpected {k}" for k in sd if k not in model_sd]
    if problems:
        raise CheckpointError(
            f"prompt weights in {source} do not fit this model ({len(problems)} problems: "
            + "; ".join(problems[:5])
            + "). Is it for another backbone or preset?"
        )


def read_prompt_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A bare prompts ``.safetensors`` file (our ``prompts.safetensors`` without its run)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"prompt file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def load_released_prompts(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``prompt_learner`` state dict of an authors' release file (no code executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"prompt file {path} does not exist")
    if is_torchscript(path):  # (before torch.load, which would hand it to torch.jit.load)
        raise CheckpointError(
            f"{path} is a TorchScript archive (OpenAI's CLIP weights are one: they go to "
            "--clip-weights), not a Crane prompt file"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # (torch's own text advises weights_only=False: no help here)
        raise CheckpointError(
            f"cannot read prompt file {path}{describe_file(path)}; crane reads the "
            "prompts.safetensors of its runs and the authors' epoch_K.pth release files"
        ) from exc
    if not isinstance(obj, dict) or "prompt_learner" not in obj:
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a Crane prompt file (no 'prompt_learner'; found {keys})"
        )
    state = obj["prompt_learner"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its 'prompt_learner' is not a mapping of tensors")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def finite_threshold(value: Any, name: str, error: type[Exception] = CraneError) -> float:
    """``value`` as a plain float (a NumPy scalar, a number in a string), or ``error`` unless
    it is a finite number."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise error(f"{name} must be a finite number, got {out}")
    return out


def save_checkpoint(
    directory: str | os.PathLike,
    cfg: CraneConfig,
    prompt_state: dict[str, torch.Tensor],
    image_threshold: float | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    backbone_seed: int | None = None,
) -> Path:
    """Write ``directory/{prompts.safetensors, config.json}`` atomically. ``backbone_seed``:
    the seed of randomly initialised backbones (tiny presets), stored so the run reloads
    them."""
    from safetensors.torch import save

    directory = Path(directory)
    if not overwrite and (directory / CONFIG).exists():
        raise CheckpointError(
            f"{directory} already holds a checkpoint; pass overwrite=True to replace it"
        )
    if image_threshold is not None:  # (a NumPy scalar is not JSON; NaN would not reload)
        image_threshold = finite_threshold(image_threshold, "image_threshold", CheckpointError)
    tensors = {k: v.detach().cpu().contiguous() for k, v in prompt_state.items()}
    data = save(tensors)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "preset": cfg.name,
        "config": cfg.to_dict(),
        "image_threshold": image_threshold,
        "provenance": provenance or {},
        # (which prompts file this config goes with: a save stopped between the two files
        # is reported on reading, not loaded as new prompts beside an old threshold)
        "prompts_sha256": hashlib.sha256(data).hexdigest(),
    }
    if backbone_seed is not None:
        meta["backbone_seed"] = int(backbone_seed)
    text = _dumps(meta)  # (before any file is written: an unwritable value stops here)
    atomic_write_bytes(directory / TENSORS, data)
    atomic_write_bytes(directory / CONFIG, text.encode())
    return directory


def _dumps(meta: dict[str, Any]) -> str:
    """``meta`` as a config.json's text; paths as strings, NumPy scalars as numbers."""

    def plain(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            return value.item()
        raise CheckpointError(
            f"cannot store {type(value).__name__} {value!r} in a checkpoint's {CONFIG} "
            "(provenance values must be JSON: numbers, strings, lists, dicts, paths)"
        )

    return json.dumps(meta, indent=2, sort_keys=True, default=plain) + "\n"


def read_checkpoint(
    path: str | os.PathLike, *, check_pair: bool = True, _retry: bool = True
) -> tuple[CraneConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, prompt tensors, metadata) of a checkpoint directory (or its safetensors file).

    ``check_pair``: refuse a prompts file other than the one config.json was saved with (its
    recorded SHA256); False where only the config or the files' origin matter (a training
    stopped between its top-level model's two files resumes from its epoch folder)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if path.suffix == ".safetensors" and path.name != TENSORS:
        raise CheckpointError(
            f"{path} is not a run's {TENSORS}: name the run folder (it holds {CONFIG} and "
            f"{TENSORS}); a bare prompts file goes to --prompts"
        )
    directory = path.parent if path.suffix == ".safetensors" else path
    cfg_file, tensor_file = directory / CONFIG, directory / TENSORS
    if not cfg_file.is_file() or not tensor_file.is_file():
        raise CheckpointError(
            f"{directory} is not a crane checkpoint (needs {CONFIG} and {TENSORS})"
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_file} is not a crane checkpoint config (not a JSON object)")
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        newer = (
            meta.get("format") == FORMAT
            and isinstance(meta.get("version"), int)
            and meta["version"] > FORMAT_VERSION
        )
        raise CheckpointError(
            f"{cfg_file} was written by a newer crane (checkpoint format v{meta['version']}; "
            f"this one reads v{FORMAT_VERSION}): upgrade crane"
            if newer
            else f"{cfg_file}: not a crane checkpoint config (format {meta.get('format')!r} "
            f"v{meta.get('version')})"
        )
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{cfg_file} holds no model config")
    try:
        cfg = CraneConfig.from_dict(meta["config"])
    except CraneError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from exc
    digest = meta.get("prompts_sha256")  # (None: a run saved before it was recorded)
    try:
        data = tensor_file.read_bytes()
        tensors = load(data)
    except (SafetensorError, OSError) as exc:  # (a truncated or damaged file)
        raise CheckpointError(f"{tensor_file} is not a readable safetensors file: {exc}") from exc
    if check_pair and digest is not None and hashlib.sha256(data).hexdigest() != digest:
        if _retry:  # (a training saving now writes the prompts, then the config: read again)
            time.sleep(0.5)
            return read_checkpoint(path, check_pair=True, _retry=False)
        fix = _unpaired_run_fix(directory)
        raise CheckpointError(
            f"{tensor_file} is not the prompts file {cfg_file} was saved with (a save stopped "
            f"between the two files, or a file copied in): {fix}"
        )
    return cfg, tensors, meta


def _unpaired_run_fix(directory: Path) -> str:
    """What to do with a run whose prompts and config.json do not pair: a training stopped
    while saving an epoch completes it with --resume; a finished one (its resume.json says all
    its epochs are done: a resume trains nothing) keeps each epoch in epoch_K."""
    try:
        state = json.loads((directory / "resume.json").read_text())
        unfinished = state["epochs_done"] < state["settings"]["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return "save the run again"
    epochs = f"its epoch_K folders hold each complete epoch (--model {directory}/epoch_K)"
    if unfinished:
        return (
            f"it is a training run stopped while saving an epoch (or saving now): `crane "
            f"train --out {directory} --resume` completes it, and {epochs}"
        )
    return f"the training finished, so a resume would not rewrite it: {epochs}"


def update_threshold(path: str | os.PathLike, threshold: float, how: dict[str, Any]) -> None:
    """Store a calibrated image threshold in an existing checkpoint (atomic rewrite of its JSON)."""
    directory = Path(path)
    cfg_file = directory / CONFIG
    meta = json.loads(cfg_file.read_text())
    meta["image_threshold"] = float(threshold)
    meta.setdefault("provenance", {})["calibration"] = how
    atomic_write_bytes(cfg_file, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
