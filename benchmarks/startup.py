"""Cold start on CPU: building the full-size backbones from local weight files, and one image
through the whole CLI, with the loading path before the 19th session ("baseline": random
initialisation, then the file read whole) and the current one ("current": parameters left
uninitialised for the strict load, plain torch files memory-mapped) alternating in one run.

Weight files are random full-size state dicts in the formats users have (speed does not
depend on the values): CLIP ViT-L/14-336 as the OpenAI TorchScript archive (fp16, the official
``ViT-L-14-336px.pt``), as a torch state dict and as safetensors (fp32); DINOv2-B/14-reg4 as a
torch state dict and as timm's safetensors. Each measurement runs in a fresh interpreter
(what a user's command pays); the files are in the page cache after the first round.

``load`` rows: ``build_clip`` / ``build_dino`` alone, seconds inside the process (imports
excluded) and the process's peak RSS. ``cli`` rows: ``crane predict`` on one 518×518 JPEG
with Crane+ and the released MVTec prompts on the CPU, wall seconds from interpreter start
to exit (imports, model build, text features, the image, the CSV and overlay).

  python benchmarks/startup.py --json results/startup.json
  python benchmarks/startup.py --weights-dir /tmp/w --rounds 5 --only cli
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import host, save, table  # same folder

MODES = ("baseline", "current")
CLIP_FILES = {
    "torchscript fp16": "openai/ViT-L-14-336px.pt",
    "state dict fp32": "ViT-L-14-336px.pt",
    "safetensors fp32": "open_clip_model.safetensors",
}
DINO_FILES = {
    "state dict fp32": "dinov2_vitb14_reg4_pretrain.pth",
    "safetensors fp32": "model.safetensors",
}


def use_mode(mode: str) -> None:
    """Put this process's loading path in ``mode``: "baseline" undoes the two changes of the
    19th session (initialise, then read the whole file), "current" leaves the code as is."""
    if mode == "current":
        return
    import torch

    from crane.models import weights as W

    W.no_random_init = contextlib.nullcontext
    W._torch_load = lambda path: torch.load(str(path), map_location="cpu", weights_only=True)


def make_weights(folder: Path) -> None:
    """Random full-size weight files in every format of CLIP_FILES / DINO_FILES (skipped where
    present)."""
    import open_clip
    import timm
    import torch
    from safetensors.torch import save_file

    if not all((folder / f).exists() for f in (*CLIP_FILES.values(), *DINO_FILES.values())):
        print(f"writing random full-size weight files to {folder} ...", file=sys.stderr)
    (folder / "openai").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if not all((folder / f).exists() for f in CLIP_FILES.values()):
        clip = open_clip.create_model("ViT-L-14-336-quickgelu", pretrained=None).eval()
        sd = {k: v.contiguous() for k, v in clip.state_dict().items()}
        torch.save(sd, folder / CLIP_FILES["state dict fp32"])
        save_file(sd, str(folder / CLIP_FILES["safetensors fp32"]))
        image = torch.randn(1, 3, 336, 336)
        text = open_clip.get_tokenizer("ViT-L-14-336-quickgelu")(["a"])
        with torch.no_grad():
            traced = torch.jit.trace(clip, (image, text), strict=False, check_trace=False)
        traced.half().save(str(folder / CLIP_FILES["torchscript fp16"]))  # as OpenAI ships it
        del clip, sd, traced
    if not all((folder / f).exists() for f in DINO_FILES.values()):
        dino = timm.create_model(
            "vit_base_patch14_reg4_dinov2", pretrained=False, img_size=518, num_classes=0
        )
        sd = {k: v.contiguous() for k, v in dino.state_dict().items()}
        torch.save(sd, folder / DINO_FILES["state dict fp32"])
        save_file(sd, str(folder / DINO_FILES["safetensors fp32"]))


def make_image(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    path = folder / "one.jpg"
    if not path.exists():
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (518, 518, 3), dtype=np.uint8)).save(path)
    return path


def run_child(args: list[str]) -> tuple[float, dict]:
    """Run this script as a fresh interpreter; (wall s, the JSON line it printed last)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "CRANE_OFFLINE": "1"},
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM; getrusage's ru_maxrss would carry the
    parent's over the exec). It counts the pages of memory-mapped weight files while they
    are mapped, which the kernel can drop without writing anything back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child(argv: list[str]) -> int:
    """In a fresh interpreter: ``weights FOLDER``, ``load MODE clip|dino FILE`` or
    ``cli MODE CRANE-ARGS...``."""
    kind, mode, *rest = argv
    if kind == "weights":
        make_weights(Path(mode))
        print("{}")
        return 0
    use_mode(mode)
    result: dict = {}
    if kind == "load":
        from crane.config import get_config
        from crane.models.backbones import build_clip, build_dino

        what, path = rest
        cfg = get_config("crane+")
        start = time.perf_counter()
        if what == "clip":
            build_clip(cfg, path)
        else:
            build_dino(cfg, path)
        result["build_s"] = time.perf_counter() - start
    else:
        from crane.cli import main

        with contextlib.redirect_stdout(sys.stderr):
            code = main(rest)
        if code:
            return code
    result["maxrss_mb"] = peak_rss_mb()
    print(json.dumps(result))
    return 0


def bench_load(folder: Path, rounds: int) -> list[dict]:
    jobs = [("clip", fmt, folder / f) for fmt, f in CLIP_FILES.items()]
    jobs += [("dino", fmt, folder / f) for fmt, f in DINO_FILES.items()]
    rows = []
    for what, fmt, path in jobs:
        got: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        for _ in range(rounds):
            for mode in MODES:  # alternating: drift slows both alike
                _, r = run_child(["load", mode, what, str(path)])
                got[mode].append((r["build_s"], r["maxrss_mb"]))
        row = {"backbone": {"clip": "CLIP ViT-L/14-336", "dino": "DINOv2-B/14-reg4"}[what]}
        row["file"] = f"{fmt} ({path.stat().st_size / 2**20:.0f} MiB)"
        rows.append(summarise(row, got, "s"))
    return rows


def summarise(row: dict, got: dict[str, list[tuple[float, float]]], unit: str) -> dict:
    """Medians of each mode's (seconds, peak RSS) into ``row``, and the speed-up; printed."""
    for mode in MODES:
        row[f"{mode}_{unit}"] = statistics.median(s for s, _ in got[mode])
        row[f"{mode}_peak_rss_mb"] = statistics.median(m for _, m in got[mode])
        row[f"{mode}_all_s"] = [round(s, 3) for s, _ in got[mode]]
    row["speedup"] = row[f"baseline_{unit}"] / row[f"current_{unit}"]
    print(json.dumps(row), flush=True)
    return row


def bench_cli(folder: Path, rounds: int) -> list[dict]:
    image = make_image(folder)
    rows = []
    for fmt in ("torchscript fp16", "state dict fp32"):
        got: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        for _ in range(rounds):
            for mode in MODES:
                with tempfile.TemporaryDirectory() as out_dir:
                    argv = ["predict", str(image), "--device", "cpu", "--model", "crane+"]
                    argv += ["--prompts", "official:mvtec", "--out", out_dir, "--no-progress"]
                    argv += ["--clip-weights", str(folder / CLIP_FILES[fmt])]
                    argv += ["--dino-weights", str(folder / DINO_FILES["state dict fp32"])]
                    wall, r = run_child(["cli", mode, *argv])
                    got[mode].append((wall, r["maxrss_mb"]))
        rows.append(summarise({"CLIP file": fmt}, got, "wall_s"))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights-dir", default=None, help="reuse/keep the weight files here")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("load", "cli"), default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.weights_dir:
            folder = Path(args.weights_dir)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crane-startup-")))
        run_child(["weights", str(folder)])  # its 3 GB of models leave with the child
        results: dict = {"host": host(), "rounds": args.rounds, "load": [], "cli": []}
        if args.only in (None, "load"):
            results["load"] = bench_load(folder, args.rounds)
            save(results, args.json)
        if args.only in (None, "cli"):
            results["cli"] = bench_cli(folder, args.rounds)
            save(results, args.json)
    keys = ["backbone", "file", "baseline_s", "current_s", "speedup"]
    table(results["load"], keys + ["baseline_peak_rss_mb", "current_peak_rss_mb"])
    keys = ["CLIP file", "baseline_wall_s", "current_wall_s", "speedup"]
    table(results["cli"], keys + ["baseline_peak_rss_mb", "current_peak_rss_mb"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
