"""Prompt training (SPEC §6) with a frozen-feature cache, per-epoch checkpoints and exact resume.

Run directory layout::

    RUN_DIR/config.json, prompts.safetensors    latest model (load with create_model(RUN_DIR))
    RUN_DIR/epoch_K/...                         the model after epoch K, and its optimizer
                                                state (optimizer.safetensors)
    RUN_DIR/resume.json                         epochs done, settings, losses: for --resume
    RUN_DIR/train_log.jsonl                     one line of mean losses per epoch

Exact resume: batch order of epoch e is drawn from a generator seeded with (seed, e), and
the optimizer state is saved in full, so an interrupted-and-resumed run ends with exactly the
weights of an uninterrupted one. An epoch's files are all written before ``resume.json``
names it: a run stopped at any moment resumes from the last epoch whose files are complete
(the prompts and optimizer state of one epoch, never a mix of two).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from crane.engine import progress as progress_log
from crane.engine.common import check_image_size
from crane.engine.features import FeatureCache, release_memmap
from crane.engine.losses import crane_loss
from crane.engine.runtime import pick_device
from crane.errors import CheckpointError, CraneError
from crane.files import strict_json
from crane.models import checkpoint as ckpt
from crane.models.crane import CraneModel
from crane.models.factory import save_model
from crane.models.vision import strict_fp32

log = logging.getLogger(__name__)

RESUME_JSON = "resume.json"
RESUME_TENSORS = "resume.safetensors"
FEATURE_CACHE = ".feature_cache.npy"  # the memory-mapped cache, while a run encodes


class TrainingDiverged(CraneError):
    """The loss became NaN or infinite: nothing after the last saved epoch is kept."""


@dataclass
class TrainSettings:
    """SPEC §6's recipe. ``seed`` draws each epoch's batch order; the prompts start from the
    model's own initialisation (``create_model(..., seed=...)``, which ``crane train`` calls
    with the same seed)."""

    epochs: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.6, 0.999)
    seed: int = 111
    dataset: dict[str, Any] = field(default_factory=dict)  # provenance: name, root, split
    weights: dict[str, Any] = field(default_factory=dict)  # provenance: local weight files


@dataclass
class TrainResult:
    run_dir: Path
    epoch_losses: list[dict[str, float]]
    seconds_per_epoch: list[float]
    encode_seconds: float
    cache_location: str


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # (torch takes seeds below 2**64; any int seed, a timestamp's say, maps into that range)
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    return torch.randperm(n, generator=g)


OPTIMIZER = "optimizer.safetensors"  # in each epoch_K folder


def _epoch_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"epoch_{epoch}"


def _save_optimizer(directory: Path, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's tensors into ``directory``; returns the rest of its state (JSON)."""
    from safetensors.torch import save

    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{name}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = val
    ckpt.atomic_write_bytes(directory / OPTIMIZER, save(tensors))
    return {"param_groups": state["param_groups"], "scalars": scalars}


def _save_resume(
    run_dir: Path,
    epoch: int,
    settings: TrainSettings,
    history: list,
    optimizer: dict[str, Any],
    n_images: int,
    fingerprint: dict[str, Any],
) -> None:
    """``resume.json``: written last, once every file of ``epoch`` is complete."""
    meta = {
        "epochs_done": epoch,
        "settings": {**asdict(settings), "betas": list(settings.betas)},
        "n_images": n_images,
        "fingerprint": fingerprint,
        **optimizer,
        "history": history,
    }
    text = json.dumps(strict_json(meta), indent=2, allow_nan=False) + "\n"
    ckpt.atomic_write_bytes(run_dir / RESUME_JSON, text.encode())


def _fingerprint(
    model: CraneModel,
    dataset: Any,
    amp: torch.dtype | None,
    attention: str = "auto",
    device: torch.device | None = None,
) -> dict[str, Any]:
    """What an exact resume must find unchanged beyond the settings: the frozen backbones,
    the precision and attention kernel the features are encoded with (and the device type:
    another one is said, not refused), the images (their paths under the root, in order,
    with labels and masks), the images' file sizes and the masks' contents. Not the root
    itself nor modification times: a byte-identical copy elsewhere (data staged to a node's
    local disk) resumes."""
    out = {
        "backbone_sha256": progress_log.backbone_digest(model),
        "backbone_sample_sha256": progress_log.backbone_sample_digest(model, amp),
        "precision": progress_log.precision_name(amp),
        "attention": attention,
    }
    if device is not None:
        out["device"] = torch.device(device).type
    samples, root = _samples_and_root(dataset)
    if samples is None or root is None:
        log.info(
            "this dataset lists no samples under a root (a custom Dataset): a resume cannot "
            "check that its images are the ones the run trained on"
        )
    else:

        def size(rel: str) -> str:
            try:
                return str(os.stat(Path(root) / rel).st_size) if rel else "-"
            except OSError:
                return "missing"

        def content(rel: str) -> str:  # (masks are small: their bytes, which define the truth)
            try:
                return hashlib.sha256((Path(root) / rel).read_bytes()).hexdigest() if rel else "-"
            except OSError:
                return "missing"

        out["images_sha256"] = progress_log.digest_of(
            f"{s.img_path}\t{s.anomaly}\t{s.mask_path}" for s in samples
        )
        out["files_sha256"] = progress_log.digest_of(
            f"{size(s.img_path)}\t{content(s.mask_path)}" for s in samples
        )
    return out


def _samples_and_root(dataset: Any) -> tuple[list | None, Any]:
    """The samples a dataset serves, in order, and their root: through ``Subset`` wrappers
    (nested ones too), which pick and order their dataset's samples."""
    indices = None
    while isinstance(dataset, torch.utils.data.Subset):
        outer = list(dataset.indices)
        indices = outer if indices is None else [outer[i] for i in indices]
        dataset = dataset.dataset
    samples, root = getattr(dataset, "samples", None), getattr(dataset, "root", None)
    if samples is not None and indices is not None:
        samples = [samples[i] for i in indices]
    return samples, root


#: (checked in this order: the sampled digest's rounding follows the precision)
_FINGERPRINT_LABELS = {
    "backbone_sha256": "the frozen backbone weights differ from the ones it trained with",
    "precision": "its features were encoded in {was}, now in {now} (--precision)",
    "backbone_sample_sha256": "the frozen backbone weights differ (inside their blocks) from the "
    "ones it trained with",
    "attention": "its features were encoded with --attention {was}, now with {now}",
    "images_sha256": "the images differ from the ones it trained on (other files, classes or "
    "class order: --classes)",
    "files_sha256": "image or mask files changed since it trained on them (an image's size or "
    "a mask's content)",
}


def _load_resume(
    run_dir: Path, model: CraneModel, opt: torch.optim.Optimizer, settings: TrainSettings,
    n_images: int, fingerprint: dict[str, Any],
) -> tuple[int, list]:  # fmt: skip
    """Checks that the run continues with the same settings, model and data, then loads the
    prompts and optimizer state of the last complete epoch; (epochs done, loss history)."""

    def refuse(why: str) -> CraneError:
        return CraneError(f"cannot resume {run_dir}: {why}")

    from safetensors import SafetensorError

    try:
        return _resume_from(run_dir, model, opt, settings, n_images, fingerprint, refuse)
    except CraneError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise refuse(
            f"its files are damaged ({type(exc).__name__}: {exc}); train again with "
            "--overwrite, or copy an intact epoch_K folder into a new run"
        ) from exc


def _resume_from(run_dir, model, opt, settings, n_images, fingerprint, refuse):  # fmt: skip
    from safetensors.torch import load_file

    meta = json.loads((run_dir / RESUME_JSON).read_text())
    saved = meta["settings"]
    for key in ("batch_size", "lr", "seed"):
        if saved[key] != getattr(settings, key):
            raise refuse(
                f"it was trained with {key}={saved[key]}, now {key}={getattr(settings, key)}"
            )
    if list(saved.get("betas", settings.betas)) != list(settings.betas):
        raise refuse(f"it was trained with betas={saved['betas']}, now {list(settings.betas)}")
    was, now = saved.get("dataset") or {}, settings.dataset or {}
    for key in ("name", "split"):
        if key in was and key in now and was[key] != now[key]:
            raise refuse(f"it was trained on {key} {was[key]!r}, now {now[key]!r}")
    if meta.get("n_images", n_images) != n_images:
        raise refuse(
            f"it was trained on {meta['n_images']} images, this dataset has {n_images} "
            "(other --classes or --split?)"
        )
    done = int(meta["epochs_done"])
    epoch_dir = _epoch_dir(run_dir, done)
    # Runs saved before the optimizer state moved into the epoch folders kept it (and the
    # matching prompts) at the top level.
    legacy = not (epoch_dir / OPTIMIZER).is_file() and (run_dir / RESUME_TENSORS).is_file()
    try:
        cfg, prompts, _ = ckpt.read_checkpoint(epoch_dir)
    except CheckpointError as exc:
        if not legacy:
            raise refuse(str(exc)) from exc
        # (epoch folders first: this crane rewrites the top-level model before resume.json,
        # so after a crash between the two the top level holds the next epoch's prompts)
        try:
            cfg, prompts, _ = ckpt.read_checkpoint(run_dir)
        except CheckpointError as exc:
            raise refuse(str(exc)) from exc
    if cfg.to_dict() != model.cfg.to_dict():
        ours, theirs = model.cfg.to_dict(), cfg.to_dict()
        diff = ", ".join(
            f"{k}: {theirs.get(k)!r} → {ours.get(k)!r}"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)
        )
        raise refuse(f"the model differs from the one it trained ({diff})")
    # (after the config: another image size also changes the backbone's position embedding)
    was_fp = meta.get("fingerprint") or {}  # (runs saved before the 25th session have none)
    for key, label in _FINGERPRINT_LABELS.items():
        if key in was_fp and key in fingerprint and was_fp[key] != fingerprint[key]:
            raise refuse(label.format(was=was_fp[key], now=fingerprint[key]))
    was, now = was_fp.get("device"), fingerprint.get("device")
    if was and now and was != now:
        log.warning(
            "the run encoded its features on %s, this resume on %s: the epochs after it are "
            "not bit for bit those of an unstopped run (float rounding differs by device)",
            was,
            now,
        )
    model.prompt_learner.load_state_dict(prompts)
    tensors = load_file(str(run_dir / RESUME_TENSORS if legacy else epoch_dir / OPTIMIZER))
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    for key, val in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return done, list(meta["history"])


def _no_run_to_resume(run_dir: Path) -> CraneError:
    return CraneError(f"--resume: {run_dir} holds no interrupted run ({RESUME_JSON} missing)")


def run_settings(run_dir: Path) -> dict[str, Any]:
    """An interrupted run's settings (``resume.json``'s, plus its model's preset name and
    image size and its encoding precision), for a resume that does not repeat them."""
    if not (run_dir / RESUME_JSON).is_file():
        raise _no_run_to_resume(run_dir)
    try:
        meta = json.loads((run_dir / RESUME_JSON).read_text())
        cfg = ckpt.read_checkpoint(run_dir, check_pair=False)[0]
        return {
            **meta["settings"],
            "preset": cfg.name,
            "image_size": cfg.image_size,
            "precision": (meta.get("fingerprint") or {}).get("precision"),
            "attention": (meta.get("fingerprint") or {}).get("attention"),
        }
    except (OSError, ValueError, KeyError, TypeError, CheckpointError) as exc:
        raise CraneError(
            f"cannot resume {run_dir}: its files are damaged ({type(exc).__name__}: {exc})"
        ) from exc


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """True when resuming. Refuses to mix a new run into an existing one. With ``overwrite``
    an earlier run's files stay until the new run saves its first epoch
    (:func:`_remove_earlier_run`): a new run that fails before then loses nothing."""
    has_state = (run_dir / RESUME_JSON).is_file()
    if resume:
        if not has_state:
            raise _no_run_to_resume(run_dir)
        return True
    leftovers = (_RunLock.NAME, FEATURE_CACHE)  # (a killed run's: not a run's files)
    if (
        run_dir.exists()
        and any(p.name not in leftovers for p in run_dir.iterdir())
        and not overwrite
    ):
        if has_state:
            raise CraneError(
                f"{run_dir} is not empty; pass --resume to continue the run there or "
                "--overwrite to start a new one in it"
            )
        raise CraneError(
            f"{run_dir} is not empty and holds no run to resume ({RESUME_JSON} missing); pass "
            "--overwrite to start a new run in it (a training's own earlier files are replaced, "
            "other files left alone), or choose another --out"
        )
    foreign = _foreign_run_files(run_dir) if run_dir.is_dir() else []
    if foreign:
        raise CraneError(
            f"--overwrite: {run_dir} holds {' and '.join(foreign)} not written by a crane run, "
            "and the new run writes files of that name there: move "
            f"{'it' if len(foreign) == 1 else 'them'} away, or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


def _foreign_run_files(run_dir: Path) -> list[str]:
    """The files in ``run_dir`` that a new run would write over and that no crane run wrote:
    a ``config.json`` that is not a crane checkpoint's; a ``prompts.safetensors`` without one
    beside it, unless an ``epoch_K`` folder there is a crane checkpoint (a run killed between
    the two writes of its model's save leaves its prompts alone)."""

    def crane_config(path: Path) -> bool:
        try:
            return json.loads(path.read_text()).get("format") == ckpt.FORMAT
        except (OSError, ValueError, AttributeError):  # (not JSON, or JSON but no object)
            return False

    config, tensors = run_dir / ckpt.CONFIG, run_dir / ckpt.TENSORS
    ours = config.is_file() and crane_config(config)
    foreign = [config.name] if config.exists() and not ours else []
    if tensors.exists() and not ours:
        epochs = run_dir.glob(f"epoch_*/{ckpt.CONFIG}")
        if config.exists() or not any(crane_config(c) for c in epochs):
            foreign.append(tensors.name)
    return foreign


def _remove_earlier_run(run_dir: Path) -> None:
    """The files an earlier training run wrote in ``run_dir`` (its ``epoch_K`` checkpoints,
    resume state, log and latest model), so that none passes for part of the new run; other
    files are left alone."""
    import re

    def ours(p: Path) -> bool:  # a checkpoint's file, or an atomic write's leftover
        names = (ckpt.CONFIG, ckpt.TENSORS, OPTIMIZER)
        return p.is_file() and (p.name in names or p.name[0] == "." and p.name.endswith(".tmp"))

    removed = 0
    for child in run_dir.iterdir():
        if child.is_dir() and re.fullmatch(r"epoch_\d+", child.name):
            entries = list(child.iterdir())
            try:
                ckpt.read_checkpoint(child, check_pair=False)
            except CheckpointError:
                # One of ours that a crash left half written (only our files), or not one of
                # ours at all.
                if not entries or not all(ours(p) for p in entries):
                    continue
            # Only the checkpoint's files: what else a user put in the folder (an
            # evaluation's metrics, notes) stays, and so does the folder.
            for f in entries:
                if ours(f):
                    f.unlink()
            with contextlib.suppress(OSError):  # (not empty: the user's files stay)
                child.rmdir()
            removed += 1
    names = [RESUME_JSON, RESUME_TENSORS, "train_log.jsonl", FEATURE_CACHE]
    try:
        ckpt.read_checkpoint(run_dir, check_pair=False)
        names += [ckpt.CONFIG, ckpt.TENSORS]  # the latest model: ours, not a user's config.json
    except CheckpointError:
        pass
    for name in names:
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed += 1
    if removed:
        log.info("--overwrite: removed the earlier run's files from %s", run_dir)


def _with_pixel_truth(dataset):
    """``dataset`` without its anomalous images that have no mask (``missing_mask="warn"``
    keeps them): the pixel losses would take their defects for normal pixels. A dataset
    whose anomalous images all lack masks cannot train (SPEC §6's losses need masks)."""
    samples = _samples_and_root(dataset)[0]
    if samples is None:
        return dataset
    unmasked = [s for s in samples if s.anomaly and not s.has_mask]
    if not unmasked:
        return dataset
    if len(unmasked) == sum(1 for s in samples if s.anomaly):
        raise CraneError(
            "training needs pixel masks for the anomalous images (the focal and Dice losses "
            f"compare maps with them), and none of this dataset's {len(unmasked)} has one"
        )
    log.warning(
        "training without the %d anomalous images that have no mask (their defects would "
        "count as normal pixels in the losses)",
        len(unmasked),
    )
    kept = [i for i, s in enumerate(samples) if not (s.anomaly and not s.has_mask)]
    if isinstance(dataset, torch.utils.data.Subset):  # (its positions, as it orders them)
        return torch.utils.data.Subset(dataset, kept)
    view = copy.copy(dataset)
    view.samples = [samples[i] for i in kept]
    return view


def train(
    model: CraneModel,
    dataset: torch.utils.data.Dataset,
    run_dir: str | Path,
    settings: TrainSettings | None = None,
    *,
    device: torch.device | str | None = None,
    workers: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    cache_location: str = "auto",
    autocast_dtype: torch.dtype | None = None,
    attention: str = "auto",
    device_decode: bool = False,
    device_resize: bool = False,
) -> TrainResult:
    """Train ``model``'s prompts on ``dataset`` (items as :class:`crane.data.AnomalyDataset`).

    ``stop_after_epoch`` ends the run early as an interruption would (used to test resume).
    ``attention``: the fused attention kernel tried first while the frozen features are
    encoded (:func:`~crane.engine.runtime.attention_kernels`). ``device_decode``: the
    dataset's JPEGs are decoded on ``device`` for that encoding (:meth:`FeatureCache.build`);
    ``device_resize``: its large images are resized there (bit for bit as PIL would).
    """
    settings = settings or TrainSettings()
    if settings.epochs < 1 or not settings.lr > 0 or settings.batch_size < 1:
        raise CraneError(
            "training needs epochs >= 1, lr > 0 and batch_size >= 1, got "
            f"{settings.epochs}, {settings.lr}, {settings.batch_size}"
        )
    if resume and overwrite:
        raise CraneError(
            "--resume continues the run in the folder, --overwrite replaces it: pick one"
        )
    check_image_size(model, dataset)
    dataset = _with_pixel_truth(dataset)
    _check_labels(dataset)
    cfg = model.cfg
    if cfg.train_set_multiplicity > 1 and len(cfg.feature_layers) > 1:
        log.warning(
            "each of the %d E-Attn patch sets (layers %s) counts %d times in the local loss: "
            "train_set_multiplicity reproduces the reference's one layer-24 set counted 4 "
            "times; for genuine multi-layer sets give train_set_multiplicity=1",
            len(cfg.feature_layers),
            ", ".join(map(str, cfg.feature_layers)),
            cfg.train_set_multiplicity,
        )
    if model.cfg.use_dattn and model.cfg.dattn_threshold_scope == "batch":
        log.warning(
            "dattn_threshold_scope='batch': the features are encoded once, in dataset order, "
            "so each image's D-Attn threshold comes from those batches, not from the shuffled "
            "training batches the reference computes it over"
        )
    run_dir = Path(run_dir)
    device = pick_device(device)
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # (what this run creates)
    try:
        with _RunLock(run_dir):
            return _train(
                model, dataset, run_dir, settings, device, workers, resume, overwrite, progress,
                stop_after_epoch, cache_location, autocast_dtype, attention, device_decode,
                device_resize,
            )  # fmt: skip
    finally:
        # A run that wrote nothing leaves no folder behind (the lock file aside, these
        # folders are empty then; after the lock is released).
        if (
            made
            and run_dir.is_dir()
            and [p.name for p in run_dir.iterdir()] in ([], [_RunLock.NAME])
        ):
            with contextlib.suppress(OSError):
                (run_dir / _RunLock.NAME).unlink(missing_ok=True)
                for folder in made:
                    folder.rmdir()


def _train(
    model, dataset, run_dir, settings, device, workers, resume, overwrite, progress,
    stop_after_epoch, cache_location, autocast_dtype, attention, device_decode, device_resize,
):  # fmt: skip
    resuming = prepare_run_dir(run_dir, resume, overwrite)
    model.to(device)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=settings.lr, betas=settings.betas)
    n_images = len(dataset)
    fingerprint = _fingerprint(model, dataset, autocast_dtype, attention, device)
    start, history = (
        _load_resume(run_dir, model, opt, settings, n_images, fingerprint) if resuming else (0, [])
    )
    if start < settings.epochs:
        if model.image_threshold is not None:  # (a model built from a calibrated run)
            log.warning(
                "the model's image threshold (%s) was calibrated on its prompts before this "
                "training; the trained prompts do not keep it: run crane calibrate on the result",
                model.image_threshold,
            )
            model.image_threshold = None
        elif resuming:
            _warn_calibration_dropped(run_dir)
    if start >= settings.epochs:
        log.info(
            "%s already trained for %d epochs: nothing to do (the model after epoch %d is in %s)",
            run_dir,
            start,
            settings.epochs,
            _epoch_dir(run_dir, settings.epochs),
        )
        model.eval()
        return TrainResult(run_dir, history, [], 0.0, "none")

    t0 = time.perf_counter()
    mmap = run_dir / FEATURE_CACHE
    cache = None
    # --overwrite: the earlier run's files go just before the first epoch is saved
    earlier = [run_dir] if overwrite and not resuming else []
    try:  # (the memory-mapped cache is removed also when encoding fails: it can be gigabytes)
        cache = FeatureCache.build(
            model,
            dataset,
            device,
            batch_size=settings.batch_size,
            workers=workers,
            location=cache_location,
            mmap_path=mmap,
            progress=progress,
            autocast_dtype=autocast_dtype,
            attention=attention,
            device_decode=device_decode,
            device_resize=device_resize,
        )
        return _epochs(
            model, cache, run_dir, settings, opt, start, history, progress, t0, stop_after_epoch,
            device, fingerprint, earlier,
        )  # fmt: skip
    except BaseException:  # Ctrl-C, a crash: the epochs saved stay
        try:  # (resume.json, written last, names the epochs a resume starts after)
            saved = int(json.loads((run_dir / RESUME_JSON).read_text())["epochs_done"])
        except (OSError, ValueError, KeyError, TypeError):
            saved = 0
        if isinstance(sys.exc_info()[1], TrainingDiverged):
            pass  # (its message says what was kept and what to do)
        elif earlier:  # (--overwrite: nothing of the new run saved, the earlier run kept)
            log.warning(
                "stopped before the first epoch was saved; the earlier run in %s is left as it "
                "was (--overwrite replaces it once the new run saves its first epoch)",
                run_dir,
            )
        elif saved:
            log.warning(
                "stopped with %d of %d epochs saved in %s; `crane train ... --resume` (API: "
                "resume=True) continues exactly from there",
                saved,
                settings.epochs,
                run_dir,
            )
        else:
            log.warning("stopped before the first epoch was saved: nothing to resume")
        raise
    finally:
        model.eval()
        del cache
        release_memmap(mmap)


def _check_labels(dataset) -> None:
    """A training set needs anomalous images (with masks) and normal ones: the losses
    compare maps with defects and the image loss tells the two labels apart."""
    samples = _samples_and_root(dataset)[0]
    if samples is None:
        return
    anomalous = sum(1 for s in samples if s.anomaly)
    if not anomalous:
        split = getattr(dataset, "split", "")
        raise CraneError(
            f"the {split + ' ' if split else ''}split to train on has no anomalous image: the "
            "losses would only ever see normal pixels (MVTec-style train splits are all "
            "normal; the reference trains on the auxiliary dataset's test split, --split test)"
        )
    if anomalous == len(samples):
        log.warning("the training set has no normal image: the image loss sees one label only")


def run_lock(run_dir: str | os.PathLike, doing: str) -> _RunLock:
    """The lock a training holds on its run folder, for another command that writes into a
    run (``crane calibrate``): refused while a training runs there, and the reverse."""
    return _RunLock(Path(run_dir), doing)


def _warn_calibration_dropped(run_dir: Path) -> None:
    """A resumed training writes a new model: a threshold calibrated on the old one goes."""
    try:
        meta = json.loads((run_dir / ckpt.CONFIG).read_text())
    except (OSError, ValueError):
        return
    if isinstance(meta, dict) and meta.get("image_threshold") is not None:
        log.warning(
            "%s holds an image threshold calibrated on the model before this training went on "
            "(%s); the new epochs' model does not keep it: run crane calibrate again",
            run_dir,
            meta["image_threshold"],
        )


class _RunLock:
    """An exclusive lock on a run folder while a training (or ``crane calibrate``) writes into
    it (``flock`` on ``.train.lock``, a file that stays in the folder): a second training into
    the same folder is refused instead of both writing their epochs, resume state and model
    over each other, and so is a calibration, whose threshold the training's next epoch would
    replace. (No lock where the platform has no ``flock``.)"""

    NAME = ".train.lock"

    def __init__(self, run_dir: Path, doing: str = "train"):
        self.run_dir = run_dir
        self.doing = doing
        self.file = None

    def __enter__(self) -> _RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (self.run_dir / self.NAME).open("a")
        if not progress_log._lock(self.file):
            self.file.close()
            where = "or choose another --out" if self.doing == "train" else "then run it again"
            raise CraneError(
                f"another crane train or calibrate is writing into {self.run_dir}; cannot "
                f"{self.doing} it now: wait for that to finish or stop it, {where}"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        # (the file stays: unlinking it before the lock is released would let one run lock
        # the old file while another locks a new one; runs ignore it as a leftover)
        self.file.close()


def _epochs(
    model, cache, run_dir, settings, opt, start, history, progress, t0, stop_after_epoch, device,
    fingerprint, earlier,
):  # fmt: skip
    """The epochs from ``start`` over the cached features, each saved as it ends (``earlier``:
    a folder whose earlier run's files go before the first save, emptied then)."""
    encode_s = time.perf_counter() - t0
    size = cache.masks.shape[-1]
    n = len(cache)
    location = cache.location
    model.train()
    epoch_times = []
    for epoch in range(start, settings.epochs):
        t_ep = time.perf_counter()
        order = _epoch_order(n, settings.seed, epoch)
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(
            range(0, n, settings.batch_size),
            desc=f"epoch {epoch + 1}/{settings.epochs}",
            disable=not progress,
            unit="batch",
        )
        for i in bar:
            vis, masks, labels = cache.batch(order[i : i + settings.batch_size], device)
            out = model.forward_train(vis)
            loss, parts = crane_loss(out, masks, labels, size, model.cfg.train_set_multiplicity)
            if not math.isfinite(parts["loss"]):  # (before the step: the prompts stay finite)
                last = f"the model after epoch {epoch} is in {_epoch_dir(run_dir, epoch)}"
                raise TrainingDiverged(
                    f"training diverged: the loss became {parts['loss']} in epoch {epoch + 1}, "
                    f"step {steps + 1}; a resume would diverge again (it repeats the run "
                    "exactly): start a new run with a lower --lr (another --out, or "
                    "--overwrite); " + (last if epoch else "no epoch was saved")
                )
            opt.zero_grad(set_to_none=True)
            with strict_fp32(device):  # (the gradients as strict as the forward)
                loss.backward()
            opt.step()
            steps += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}")
        means = {k: v / steps for k, v in sums.items()}
        history.append({"epoch": epoch + 1, **means})
        epoch_times.append(time.perf_counter() - t_ep)
        provenance = {
            "epoch": epoch + 1,
            "settings": {**asdict(settings), "betas": list(settings.betas)},
            "losses": means,
        }
        epoch_dir = _epoch_dir(run_dir, epoch + 1)
        if earlier:
            _remove_earlier_run(earlier.pop())
        save_model(model, epoch_dir, overwrite=True, **provenance)
        optimizer = _save_optimizer(epoch_dir, opt)
        save_model(model, run_dir, overwrite=True, **provenance)
        log_lines = "".join(json.dumps(strict_json(h), allow_nan=False) + "\n" for h in history)
        ckpt.atomic_write_bytes(run_dir / "train_log.jsonl", log_lines.encode())
        _save_resume(run_dir, epoch + 1, settings, history, optimizer, n, fingerprint)
        log.info(
            "epoch %d/%d: %s (%.1fs)",
            epoch + 1,
            settings.epochs,
            ", ".join(f"{k}={v:.4f}" for k, v in means.items()),
            epoch_times[-1],
        )
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return TrainResult(run_dir, history, epoch_times, encode_s, location)
