"""``crane models | train | evaluate | predict | calibrate``: thin wrappers over crane.engine."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import stat
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crane.cli.common import check_writable, missing_mask_arg
from crane.constants import ATTENTION_KERNELS
from crane.errors import CraneError, DatasetError

if TYPE_CHECKING:
    import torch

    from crane.models.crane import CraneModel

log = logging.getLogger("crane")


_SCAN_NOTE = "; read when the dataset has no meta.json (a prepared one keeps its own choice)"


def _common(p: argparse.ArgumentParser, batch: int = 8, with_compile: bool = True) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if present)"
    )
    g.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="fp32 (default), or bf16/fp16 autocast for the backbones (fp16: CUDA only)",
    )
    g.add_argument("--batch-size", type=int, default=batch, help=f"default {batch}")
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader worker processes that decode images (default: min(8, CPU cores) on "
        "a GPU, 0 on the CPU, where the model already uses every core)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    if with_compile:  # (not for train: its one frozen pass and the text encoder run eagerly)
        g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--attention",
        default="auto",
        choices=list(ATTENTION_KERNELS),
        help="fused attention kernel tried first on CUDA (torch's order after it, for calls it "
        "cannot serve): auto keeps torch's choice (cuDNN first on H100/H200-class GPUs with a "
        "recent cuDNN, else FlashAttention-2); math is the unfused reference, on any device",
    )
    w = p.add_argument_group("weights")
    w.add_argument(
        "--clip-weights", default=None, help="local CLIP file (OpenAI .pt or state dict)"
    )
    w.add_argument("--dino-weights", default=None, help="local DINOv2 file (original or timm)")


# --dino-precision NAME -> config fields (what a run or preset stored otherwise stays).
DINO_PRECISIONS = {
    "fp16-attention": {"dino_fp32": True, "dino_attn_fp16": True, "dino_fp16": False},
    "fp32": {"dino_fp32": True, "dino_attn_fp16": False, "dino_fp16": False},
    "bf16": {"dino_fp32": False, "dino_fp16": False},
    "fp16": {"dino_fp32": False, "dino_fp16": True},
}


def _model_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--model",
        default=default,
        required=default is None,
        help="a run directory (crane train --out) or a preset (see `crane models`)",
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="prompt weights for a preset: a released .pth, official:mvtec|visa|mvtec-medical, "
        "or a run directory",
    )
    p.add_argument(
        "--dino-precision",
        default=None,
        choices=list(DINO_PRECISIONS),
        help="DINOv2 (Crane+) under --precision bf16/fp16: fp16-attention keeps it in fp32 "
        "with TF32 matmuls and fp16 flash attention (the presets' default); fp32 also keeps "
        "its attention in fp32 (the slowest); bf16 runs all of it in the autocast dtype "
        "(fastest measured; the D-Attn cut sees rounded similarities); fp16 runs all of it "
        "under fp16 autocast (bf16's speed with TF32's 10-bit mantissa, fp16's range). "
        "Default: what the run or preset stores",
    )


def _write_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--write-threads",
        type=int,
        default=None,
        metavar="N",
        help="threads that draw and write overlays (and maps) beside the model loop "
        "(default: the CPU count, at most 8; 0 = in the loop)",
    )


def _device_decode_arg(p: argparse.ArgumentParser, when: str = "", rest: str = "masks and") -> None:
    p.add_argument(
        "--device-decode",
        action="store_true",
        help=f"decode JPEG images on the GPU (nvJPEG through torchvision or TorchCodec: "
        f"CRANE_JPEG_DECODER picks; resized there bit for bit as PIL does) so the CPUs only "
        f"read them{when}; {rest} other images are decoded on the CPU as usual",
    )


def _device_resize_arg(p: argparse.ArgumentParser, when: str = "", rest: str = "") -> None:
    p.add_argument(
        "--device-resize",
        action="store_true",
        help=f"decode images on the CPU as usual but resize large ones on the GPU{when}, bit "
        "for bit as PIL does: the reference pixels, with the CPUs only decoding (full-size "
        f"pixels are copied to the GPU){rest}",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "train",
        help="train prompts on an auxiliary dataset (the paper's recipe)",
        description="Train prompts on an auxiliary dataset (the paper's recipe). With --resume, "
        "the options not given are the interrupted run's (dataset, root, split, classes, "
        "preset, image size, epochs, lr, seed, batch size, precision, weight files).",
    )
    p.add_argument(
        "--dataset", help="layout name (see `crane datasets list`); required unless --resume"
    )
    p.add_argument(
        "--root", help="dataset root (meta.json used when present); required unless --resume"
    )
    p.add_argument(
        "--split", default=None, help="split to train on (default test, as the reference)"
    )
    p.add_argument("--classes", nargs="+", default=None)
    missing_mask_arg(p, None, _SCAN_NOTE)
    p.add_argument("--preset", default=None, help="default crane+ (see `crane models`)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--epochs", type=int, default=None, help="default 5 (the paper's recipe)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (the paper's recipe)")
    p.add_argument("--seed", type=int, default=None, help="default 111")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out (options not given: the run's)",
    )
    p.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out")
    _device_decode_arg(p, " in the one pass that encodes the training images")
    _device_resize_arg(p, " in the one pass that encodes the training images")
    _common(p, with_compile=False)
    p.set_defaults(func=cmd_train, batch_size=None, precision=None, attention=None)

    p = sub.add_parser("evaluate", help="per-class metrics on a labelled dataset")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--classes", nargs="+", default=None)
    missing_mask_arg(p, note=_SCAN_NOTE)
    _model_args(p, None)
    p.add_argument(
        "--paper-protocol",
        action="store_true",
        help="the paper's settings for this dataset: released prompts and map combination",
    )
    p.add_argument(
        "--aupro",
        default="mvtec",
        choices=["mvtec", "legacy"],
        help="AUPRO definition: mvtec (default) or legacy (the reference code's)",
    )
    p.add_argument(
        "--metric-mode",
        default="exact",
        choices=["exact", "binned"],
        help="exact: pixel metrics over every pixel (holds one class's maps); binned: from "
        "K-bin histograms (--bins) in bounded memory, each with a certified bound on its error "
        "(the ± in the table, *_bound columns, the JSON's bounds and mean_bounds)",
    )
    p.add_argument(
        "--bins",
        type=int,
        default=None,
        metavar="K",
        help="histogram bins per class for --metric-mode binned: a power of two up to 2**24 "
        "(default 65536; more bins, tighter bounds, 24 B per bin and class)",
    )
    p.add_argument(
        "--out", default=None, help="where metrics.{md,csv,json} go (default: ./eval_<dataset>)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the metrics already in --out")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an evaluation in --out that stopped (Ctrl-C, a crash): the classes it "
        "finished (kept in --out/progress.jsonl) are not evaluated again; same model, dataset "
        "and options required",
    )
    p.add_argument("--visualize", default=None, metavar="DIR", help="write heatmap overlays here")
    _write_threads_arg(p)
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (logged)")
    _device_decode_arg(p)
    _device_resize_arg(p)
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score images, folders or globs (no labels needed)")
    p.add_argument("inputs", nargs="+", metavar="PATH")
    _model_args(p, "crane+")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="image decision threshold (default: the run's calibrated one, if it has one; "
        "without any, the decision column stays empty)",
    )
    p.add_argument("--save-maps", action="store_true", help="also write raw maps as .npy")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument(
        "--overlay-format",
        default=None,
        choices=["png", "jpg"],
        help="png (the default): lossless; jpg: quality 90, far cheaper to encode (the PNG "
        "encode is most of an overlay's cost)",
    )
    _write_threads_arg(p)
    p.add_argument(
        "--overwrite", action="store_true", help="replace the predictions already in --out"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run in --out that stopped (Ctrl-C, a crash): only the images it had "
        "not finished are predicted; same model, inputs and options required",
    )
    p.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode large JPEGs at a reduced scale (>= the model input) and shrink images "
        "with torch's uint8 bicubic kernel; faster, pixels differ slightly from the reference "
        "pipeline",
    )
    p.add_argument(
        "--device-decode",
        action="store_true",
        help="decode JPEG files on the GPU (nvJPEG through torchvision or TorchCodec: "
        "CRANE_JPEG_DECODER picks; resized there bit for bit as PIL does) so the CPUs only "
        "read files; other files are decoded on the CPU as usual. nvJPEG's "
        "decode may differ from the reference decoder's by a level or two",
    )
    _device_resize_arg(p, rest=". Not with --fast-decode")
    p.add_argument(
        "--map-size",
        default="input",
        choices=["input", "model"],
        help="anomaly maps (--save-maps, overlays) at each image's size or at the model's "
        "S x S; max_pixel_score is the maximum of that map",
    )
    p.add_argument(
        "--dino-bf16",
        action="store_true",
        help="the same as --dino-precision bf16",
    )
    _common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("calibrate", help="set a run's image threshold from labelled images")
    p.add_argument("--model", required=True, help="run directory to update")
    p.add_argument(
        "--root", required=True, help="labelled dataset root (meta.json or --dataset layout)"
    )
    p.add_argument(
        "--dataset", default=None, help="layout name (default: generic, read where no meta.json is)"
    )
    p.add_argument("--split", default="test", help="default test")
    missing_mask_arg(p, note=_SCAN_NOTE)
    p.add_argument(
        "--mode",
        default="f1",
        choices=["f1", "fpr"],
        help="f1 (default): the F1-optimal threshold; fpr: within --target-fpr",
    )
    p.add_argument(
        "--target-fpr",
        type=float,
        default=None,
        help="--mode fpr: the largest false-positive rate allowed on the normal images, in "
        "[0, 1) (default 0.05)",
    )
    _device_decode_arg(p, rest="PNGs and")
    _device_resize_arg(p)
    _common(p)
    p.set_defaults(func=cmd_calibrate)


def cmd_models(args: argparse.Namespace) -> int:
    from crane.config import PRESETS

    for name, cfg in PRESETS.items():
        sets = (["D-Attn"] if cfg.use_dattn else []) + [
            f"E-Attn{lay}" for lay in cfg.feature_layers
        ]
        clip, dino = cfg.clip_model, cfg.dino_model or "-"
        if cfg.clip_overrides:  # the tiny presets: small random backbones of those layouts
            width = cfg.clip_overrides.get("vision_cfg", {}).get("width", "?")
            clip = f"{clip}(width {width}, random)"
        if cfg.dino_model and cfg.dino_overrides:
            dino = f"{dino}(width {cfg.dino_overrides.get('embed_dim', '?')}, random)"
        print(
            f"{name:7s} clip={clip} dino={dino} sets={'+'.join(sets)} "
            f"combine={cfg.map_combine} size={cfg.image_size}"
        )
    return 0


def _runtime(args):
    from crane.engine.runtime import autocast_dtype, pick_device

    device = pick_device(args.device)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    elif args.workers < 0:
        raise CraneError(f"--workers must be >= 0, got {args.workers}")
    for flag, ok in (
        ("epochs", lambda v: v >= 1),
        ("lr", lambda v: v > 0 and math.isfinite(v)),
        ("image_size", lambda v: v is None or v >= 14),
        ("threshold", lambda v: v is None or math.isfinite(v)),  # (> 1: flag none; < 0: all)
        ("target_fpr", lambda v: 0 <= v < 1),
    ):
        value = getattr(args, flag, None)
        if value is not None and not ok(value):
            raise CraneError(f"--{flag.replace('_', '-')} {value} is out of range")
    if getattr(args, "batch_size", 1) < 1:
        raise CraneError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "write_threads", None) is not None and args.write_threads < 0:
        raise CraneError(f"--write-threads must be >= 0, got {args.write_threads}")
    return device, autocast_dtype(args.precision, device)


def _load_model(
    args, dataset: str | None = None, amp: torch.dtype | None = None, **overrides
) -> tuple[CraneModel, dict[str, str | None]]:
    """A run directory as saved, or a preset with the released prompts SPEC §7 names for
    ``dataset`` (``--prompts`` overrides; the tiny test presets have no released prompts).
    ``amp``: the autocast dtype it will run under; the model is ours, so its frozen matmul
    weights are stored in it (same results, half the memory, no fp32 copy made first).
    Returns the model and which prompts it holds: ``{"prompts": ..., "prompts_from": ...}``."""
    from crane.config import get_config, is_tiny
    from crane.engine.evaluate import paper_protocol
    from crane.models import create_model
    from crane.models.factory import names_a_run

    prompts = args.prompts
    asked = getattr(args, "dino_precision", None)
    if getattr(args, "dino_bf16", False):
        if asked not in (None, "bf16"):
            raise CraneError(f"--dino-bf16 contradicts --dino-precision {asked}")
        asked = "bf16"
    if asked is not None:
        overrides.update(DINO_PRECISIONS[asked])
    source = "--prompts" if prompts is not None else "random initialisation (test preset)"
    if names_a_run(args.model):
        if getattr(args, "paper_protocol", False):
            log.warning(
                "--paper-protocol applies to presets with released prompts; "
                "ignored for a run directory"
            )
        if prompts is None:
            prompts, source = str(args.model), "the run directory"
    elif is_tiny(get_config(args.model)):
        if getattr(args, "paper_protocol", False):
            log.warning("--paper-protocol: %s has no released prompts; ignored", args.model)
    else:
        proto = paper_protocol(dataset or "", args.model)
        if prompts is None:
            prompts, source = proto["prompts"], "the released prompts the paper uses for it"
            log.info("prompts: %s", prompts)
        if getattr(args, "paper_protocol", False):
            overrides.setdefault("map_combine", proto["map_combine"])
    model = create_model(
        args.model,
        prompts=None if source == "the run directory" else prompts,
        clip_weights=args.clip_weights,
        dino_weights=args.dino_weights,
        matmul_dtype=amp,
        **overrides,
    )
    if asked is not None and not model.cfg.use_dattn:
        log.warning("--dino-precision/--dino-bf16: %s has no DINOv2; ignored", args.model)
    elif asked is not None and amp is None:
        log.warning(
            "--dino-precision/--dino-bf16 apply under --precision bf16 or fp16; with fp32 "
            "DINOv2 runs in fp32"
        )
    return model, {"prompts": None if prompts is None else str(prompts), "prompts_from": source}


_TRAIN_DEFAULTS = {
    "split": "test",
    "missing_mask": "error",
    "preset": "crane+",
    "epochs": 5,
    "lr": 1e-3,
    "seed": 111,
    "batch_size": 8,
    "precision": "fp32",
    "attention": "auto",
}


def _recorded_weights(recorded: Any) -> dict[str, str]:
    """The weight files a run recorded that still exist, as ``clip_weights``/``dino_weights``;
    those that are gone (e.g. another machine) are said and left to the usual lookup
    (``$CRANE_CLIP_WEIGHTS``, the cache), which the backbone check then holds to the run's."""
    out = {}
    for key, value in (recorded or {}).items() if isinstance(recorded, dict) else ():
        if key not in ("clip", "dino") or not isinstance(value, str) or not value:
            continue
        if Path(value).is_file():
            out[f"{key}_weights"] = value
        else:
            log.warning("the run's %s weights %s are gone: looking for them as usual", key, value)
    return out


def _train_defaults(args: argparse.Namespace) -> None:
    """Fill the train options not given: from the interrupted run with --resume (so that
    `crane train --out RUN --resume` alone continues it), else the defaults."""
    from crane.engine.train import run_settings

    run: dict[str, Any] = {}
    if args.resume:
        run = run_settings(Path(args.out))
        data = run.get("dataset") or {}
        fill = {
            "dataset": data.get("name"),
            "root": data.get("root"),
            "split": data.get("split"),
            "classes": data.get("classes"),
            "missing_mask": data.get("missing_mask"),
            "preset": run.get("preset"),
            "image_size": run.get("image_size"),
            "epochs": run.get("epochs"),
            "lr": run.get("lr"),
            "seed": run.get("seed"),
            "batch_size": run.get("batch_size"),
            "precision": run.get("precision"),
            "attention": run.get("attention"),
            **_recorded_weights(run.get("weights")),
        }
        if fill["precision"] is None and args.precision is None:
            raise CraneError(
                f"{args.out} was saved before runs recorded the precision they encode in: pass "
                "the --precision it was trained with (fp32 unless you chose another)"
            )
        for key, value in fill.items():
            if getattr(args, key) is None and value is not None:
                setattr(args, key, value)
    for key, value in _TRAIN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    missing = [f"--{k}" for k in ("dataset", "root") if getattr(args, k) is None]
    if missing:
        raise CraneError(f"crane train needs {' and '.join(missing)}")


def cmd_train(args: argparse.Namespace) -> int:
    from crane.engine.common import open_dataset
    from crane.engine.train import TrainSettings, train
    from crane.models import create_model

    _train_defaults(args)
    device, amp = _runtime(args)
    check_writable(Path(args.out))
    overrides = {"image_size": args.image_size} if args.image_size else {}
    model = create_model(
        args.preset,
        clip_weights=args.clip_weights,
        dino_weights=args.dino_weights,
        seed=args.seed,
        **overrides,
    )
    ds = open_dataset(
        args.root,
        args.dataset,
        args.split,
        model.cfg.image_size,
        args.classes,
        missing_mask=args.missing_mask,
    )
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        dataset={
            "name": args.dataset,
            "root": str(Path(args.root).resolve()),
            "split": args.split,
            "classes": args.classes,
            "missing_mask": args.missing_mask,
            "n_images": len(ds),
        },
        weights={
            key: None if value is None else str(Path(value).expanduser().resolve())
            for key, value in (("clip", args.clip_weights), ("dino", args.dino_weights))
        },
    )
    res = train(
        model,
        ds,
        args.out,
        settings,
        device=device,
        workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        autocast_dtype=amp,
        attention=args.attention,
        device_decode=args.device_decode,
        device_resize=args.device_resize,
    )
    if not res.seconds_per_epoch:
        print(f"{res.run_dir} already holds {len(res.epoch_losses)} epochs: nothing to train")
        return 0
    for h in res.epoch_losses:
        print(
            f"epoch {h['epoch']}: loss {h['loss']:.4f} (focal {h['focal']:.4f}, "
            f"dice {h['dice']:.4f}, "
            f"ce {h['ce']:.4f})"
        )
    print(
        "(focal and dice are summed over the model's patch sets, as the loss adds them: "
        f"{model.cfg.n_sets * model.cfg.train_set_multiplicity} here)"
    )
    print(f"model written to {res.run_dir} (load with --model {res.run_dir})")
    return 0


def _bins(args: argparse.Namespace) -> int:
    from crane.metrics import DEFAULT_NUM_BINS
    from crane.metrics.binned import MAX_NUM_BINS

    if args.bins is None:
        return DEFAULT_NUM_BINS
    if args.metric_mode != "binned":
        raise CraneError("--bins applies to --metric-mode binned only")
    if args.bins < 2 or args.bins & (args.bins - 1) or args.bins > MAX_NUM_BINS:
        raise CraneError(f"--bins must be a power of two from 2 to 2**24, got {args.bins}")
    return args.bins


def _holds_images(folder: Path) -> bool:
    from crane.data.imageio import is_image_file

    return folder.is_dir() and any(is_image_file(p) for p in folder.rglob("*") if p.is_file())


def _file_stamps(folder: Path | None) -> dict[Path, tuple[int, int]]:
    """Each image file under ``folder`` with its inode and modification time (an overlay
    written again is a new file: its stamp changes; other files, as the metrics of an --out
    inside the folder, are not overlays)."""
    from crane.data.imageio import is_image_file

    if folder is None or not folder.is_dir():
        return {}
    out = {}
    for p in folder.rglob("*"):
        if not is_image_file(p):
            continue
        try:
            st = p.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out[p] = (st.st_ino, st.st_mtime_ns)
    return out


def _warn_left_over(folder: Path | None, before: dict[Path, tuple[int, int]]) -> None:
    """Files an earlier evaluation left in ``--visualize`` that this one (``--overwrite``)
    did not replace: said, as predict says it (they looked like this run's)."""
    if not before:
        return
    now = _file_stamps(folder)
    stale = [p for p, stamp in before.items() if now.get(p) == stamp]
    if stale:
        log.warning(
            "%d file(s) in %s are not from this run (an earlier evaluation's; left in place)",
            len(stale),
            folder,
        )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from crane.engine.common import open_dataset
    from crane.engine.evaluate import evaluate, report_markdown, write_report
    from crane.engine.progress import check_resume_flags

    num_bins = _bins(args)  # before any model is loaded
    device, amp = _runtime(args)
    out = Path(args.out or f"eval_{args.dataset}")
    progress_file = check_resume_flags(out, args.resume, args.overwrite, "metrics.json", "evaluate")
    held = [n for n in ("metrics.json", "metrics.csv", "metrics.md") if (out / n).exists()]
    if held and not (args.overwrite or args.resume):  # (none of them replaced unasked)
        raise CraneError(
            f"{out} already holds metrics ({', '.join(held)}); pass --overwrite or choose "
            "another --out"
        )
    viz = None if args.visualize is None else Path(args.visualize)
    if viz is None and args.write_threads is not None:
        log.warning("--write-threads: evaluate writes files with it only for --visualize; ignored")
    if viz is not None and not (args.overwrite or args.resume) and _holds_images(viz):
        raise CraneError(
            f"{viz} already holds overlays (another evaluation's?); pass --overwrite to replace "
            "them, or choose another --visualize folder"
        )
    for folder in (out, viz):  # checked now, not after the whole evaluation
        if folder is not None:
            check_writable(folder)
    model, prompts = _load_model(args, args.dataset, amp)
    ds = open_dataset(
        args.root,
        args.dataset,
        args.split,
        model.cfg.image_size,
        args.classes,
        on_error="skip" if args.skip_bad else "raise",
        missing_mask=args.missing_mask,
    )
    earlier = _file_stamps(viz) if args.overwrite and not args.resume else {}
    res = evaluate(
        model,
        ds,
        device=device,
        amp_dtype=amp,
        batch_size=args.batch_size,
        workers=args.workers,
        aupro=args.aupro,
        metric_mode=args.metric_mode,
        num_bins=num_bins,
        visualize_dir=args.visualize,
        progress=not args.no_progress,
        compile=args.compile,
        attention=args.attention,
        write_threads=args.write_threads,
        device_decode=args.device_decode,
        device_resize=args.device_resize,
        progress_file=progress_file,
        resume=args.resume,
    )
    _warn_left_over(viz, earlier)
    extra = {
        "dataset": args.dataset,
        "root": str(args.root),
        "split": args.split,
        "classes": args.classes,
        "missing_mask": args.missing_mask,
        "model": str(args.model),
        **prompts,
        "precision": args.precision,
        "aupro": args.aupro,
        "metric_mode": args.metric_mode,
        "bins": num_bins if args.metric_mode == "binned" else None,
        "config": model.cfg.to_dict(),
        "n_images": res.n_images + res.n_resumed,
        "n_images_resumed": res.n_resumed,
        "classes_not_read": res.unread_classes,
        "seconds": res.seconds,
        "timings_s": res.timings,
    }
    try:
        print(report_markdown(res.report))  # (first: on the screen even if writing fails)
    finally:  # (and written when the screen has gone: `crane evaluate ... | head` closed it)
        files = write_report(res.report, out, extra)
        progress_file.unlink(missing_ok=True)  # (the metrics are written: nothing to resume)
    split = ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items())
    more = f"; {res.n_resumed} more from the interrupted run" if res.n_resumed else ""
    print(
        f"\n{res.n_images} images in {res.seconds:.1f}s ({split}{more}); "
        f"wrote {', '.join(str(f) for f in files.values())}"
    )
    if res.n_images + res.n_resumed == 0:
        log.error("no image could be read: nothing was evaluated")
        return 1
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from crane.engine.predict import Detector, run_predict

    device, amp = _runtime(args)
    check_writable(Path(args.out))
    if args.no_overlays and args.overlay_format is not None:
        log.warning("--overlay-format: --no-overlays writes no overlays; ignored")
    if args.no_overlays and not args.save_maps and args.write_threads is not None:
        log.warning("--write-threads: nothing to write (--no-overlays, no --save-maps); ignored")
    model, prompts = _load_model(args, amp=amp)
    det = Detector(
        model,
        device=device,
        precision=args.precision,
        threshold=args.threshold,
        batch_size=args.batch_size,
        workers=args.workers,
        compile=args.compile,
        attention=args.attention,
        fast_decode=args.fast_decode,
        device_decode=args.device_decode,
        device_resize=args.device_resize,
        cast_weights=True,  # the model is ours; a no-op for fp32
        map_size=args.map_size,
    )
    det.source = str(args.model)  # (for summary.json: the run directory or preset named)
    det.prompts = prompts["prompts"]
    summary = run_predict(
        det,
        args.inputs,
        args.out,
        overlays=not args.no_overlays,
        save_maps=args.save_maps,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.no_progress,
        write_threads=args.write_threads,
        overlay_format=args.overlay_format or "png",
    )
    print(json.dumps({k: summary[k] for k in ("n_images", "n_anomalous", "n_failed", "threshold")}))
    if summary["n_failed"]:
        reasons = Counter(f["reason"] for f in summary["failed"])
        unreadable, other = reasons["unreadable"], summary["n_failed"] - reasons["unreadable"]
        said = [f"{unreadable} unreadable file(s)"] if unreadable else []
        said += [f"{other} image(s) without a score (NaN)"] if other else []
        print(f"{' and '.join(said)} skipped; see {args.out}/summary.json", file=sys.stderr)
    print(f"wrote {args.out}/predictions.csv")
    if summary["n_failed"] and not summary["n_images"]:
        print("crane: error: no input could be predicted", file=sys.stderr)
        return 1  # (a script must see that nothing was predicted)
    return 0


def _scores(results) -> Iterator[float]:
    """Each prediction's image score (its map is dropped: a dataset's maps need not fit in
    memory); an unreadable image or a NaN score stops calibration, as ``predict`` would."""
    from crane.engine.predict import Failure

    for r in results:
        if isinstance(r, Failure):
            r.raise_()
        yield r.score


def cmd_calibrate(args: argparse.Namespace) -> int:
    from crane.engine.train import run_lock
    from crane.models.factory import names_a_run

    if not Path(args.model).is_dir() or not names_a_run(args.model):
        raise CraneError("calibrate stores the threshold in a run directory; --model must be one")
    if args.target_fpr is not None and args.mode != "fpr":
        raise CraneError("--target-fpr applies to --mode fpr only")
    target_fpr = 0.05 if args.target_fpr is None else args.target_fpr
    device, _ = _runtime(args)
    check_writable(Path(args.model))
    with run_lock(args.model, "calibrate"):  # (not while a training writes the run)
        _warn_unfinished_training(Path(args.model))
        return _calibrate(args, device, target_fpr)


def _warn_unfinished_training(run: Path) -> None:
    from crane.engine.train import RESUME_JSON

    try:
        state = json.loads((run / RESUME_JSON).read_text())
        done, planned = int(state["epochs_done"]), int(state["settings"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if done < planned:
        log.warning(
            "%s holds the model after epoch %d of %d (an interrupted training): the threshold "
            "is calibrated on it, and a `crane train --resume` replaces the model and drops it",
            run,
            done,
            planned,
        )


def _calibrate(args: argparse.Namespace, device, target_fpr: float) -> int:
    import numpy as np

    from crane.engine.calibrate import check_labels, f1_optimal_threshold, fpr_threshold
    from crane.engine.common import open_dataset
    from crane.engine.predict import Detector
    from crane.models.checkpoint import update_threshold

    # (only its file list and labels are used: the labels are checked before the model is
    # built or any image scored)
    name = args.dataset or "generic"
    try:
        ds = open_dataset(args.root, name, args.split, missing_mask=args.missing_mask)
    except DatasetError as exc:
        if args.dataset is not None:
            raise
        raise DatasetError(
            f"{exc} (no --dataset was given: {args.root} was read as the generic layout; pass "
            "--dataset NAME for a dataset in its original layout, see `crane datasets list`)"
        ) from exc
    paths = [str(Path(ds.root) / s.img_path) for s in ds.samples]
    labels = np.array([s.anomaly for s in ds.samples])
    check_labels(labels, args.mode)
    det = Detector(
        args.model,
        device=device,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        compile=args.compile,
        attention=args.attention,
        clip_weights=args.clip_weights,
        dino_weights=args.dino_weights,
        device_decode=args.device_decode,
        device_resize=args.device_resize,
        map_size="model",  # (only the scores are used: no full-size maps are kept)
    )
    scores = np.fromiter(_scores(det.predict_iter(paths)), dtype=np.float64)
    if args.mode == "f1":
        t, stats = f1_optimal_threshold(scores, labels)
    else:
        t, stats = fpr_threshold(scores, labels, target_fpr)
    how = {
        "mode": args.mode,
        "dataset": name,
        "root": str(Path(args.root).resolve()),
        "split": args.split,
        "missing_mask": args.missing_mask,
        "inference_precision": args.precision,  # (stats may hold the F1 precision)
        "n_images": len(paths),
        **stats,
    }
    if args.mode == "fpr":
        how["target_fpr"] = target_fpr
    update_threshold(args.model, t, how)
    print(
        f"image threshold {t:.6f} stored in {args.model} "
        f"({', '.join(f'{k}={v:.3f}' for k, v in stats.items())})"
    )
    return 0
