"""Progress files that let an interrupted ``predict`` or ``evaluate`` be resumed.

A progress file is JSON lines: a header ``{"crane": <kind>, "settings": {...}}``, then one
record per finished unit of work (an image for predict, a class for evaluate), appended and
flushed once the unit's output files are written (:class:`Recorder`). A resumed run reads the
records back, refuses a header whose settings differ from its own (its results would not
belong in the same files), and starts the file afresh with the records it keeps. A last line
cut short (the process died while writing it) is dropped; the run redoes that unit. A run
holds a lock on its file (``flock``) while it appends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TextIO

import torch

from crane.errors import CraneError
from crane.files import atomic_write_bytes
from crane.models.crane import CraneModel

log = logging.getLogger(__name__)

#: Its name in an output folder; removed once the run's own files are written.
PROGRESS_FILE = "progress.jsonl"


def model_settings(model: CraneModel, amp: torch.dtype | None) -> dict[str, Any]:
    """The part of a run's settings that names the model it ran: its config, digests of its
    prompts and of its backbone weights, and the autocast precision."""
    return {
        "config": model.cfg.to_dict(),
        "prompts_sha256": prompts_digest(model),
        "backbone_sha256": backbone_digest(model),
        "backbone_sample_sha256": backbone_sample_digest(model, amp),
        "precision": precision_name(amp),
    }


def prompts_digest(model: CraneModel) -> str:
    """SHA-256 of the model's prompt tensors (names and float32 values): tells two prompt
    sets apart without storing them."""
    digest = hashlib.sha256()
    for key, t in sorted(model.prompt_learner.state_dict().items()):
        digest.update(key.encode())
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def backbone_digest(model: CraneModel) -> str:
    """SHA-256 of a few frozen backbone tensors that no precision casts (embeddings, norms,
    projections, the last block's ``out_proj``; DINOv2's embeddings): tells two sets of
    backbone weights apart cheaply (a few MB read, not the whole 1.7 GB)."""
    visual, text = model.vision.visual, model.text_encoder.clip
    named = {
        "visual.class_embedding": visual.class_embedding,
        "visual.positional_embedding": visual.positional_embedding,
        "visual.ln_post.weight": visual.ln_post.weight,
        "visual.proj": visual.proj,
        "visual.last.out_proj.weight": visual.transformer.resblocks[-1].attn.out_proj.weight,
        "text.positional_embedding": text.positional_embedding,
        "text.text_projection": text.text_projection,
    }
    dino = model.vision.dino
    if dino is not None:
        named["dino.cls_token"] = dino.cls_token
        named["dino.pos_embed"] = dino.pos_embed
    digest = hashlib.sha256()
    for key, t in named.items():
        if isinstance(t, torch.Tensor):
            digest.update(key.encode())
            digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


#: Values of each backbone tensor in :func:`backbone_sample_digest` (evenly strided).
_SAMPLES_PER_TENSOR = 4096


def backbone_sample_digest(model: CraneModel, amp: torch.dtype | None) -> str:
    """SHA-256 of an evenly strided sample of every frozen backbone tensor (at most 4096
    values each, about 10 MB for Crane+): :func:`backbone_digest` reads a few tensors only,
    so backbones that differ inside their blocks alone (a merged LoRA, a partial fine-tune)
    passed it. The values are rounded as :meth:`CraneModel.cast_frozen_matmuls` casts under
    ``amp`` (fp16 for DINOv2's under ``dino_fp16``), so a model with cast weights and one
    without give the same digest; under fp32 nothing is rounded."""
    cfg = model.cfg
    dino_dtype = torch.float16 if (cfg.dino_fp16 and not cfg.dino_fp32) else amp
    parts = [
        ("visual", model.vision.visual, amp),
        ("text", model.text_encoder.clip, amp),
        ("dino", model.vision.dino, dino_dtype),
    ]
    digest = hashlib.sha256()
    for prefix, module, dtype in parts:
        if module is None:
            continue
        named = dict(module.named_parameters())
        named.update(module.named_buffers())
        for key in sorted(named):
            t = named[key].detach()
            if not t.is_floating_point() or t.numel() == 0:
                continue
            flat = t.reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)].float()
            if dtype is not None:
                sample = sample.to(dtype).float()
            digest.update(f"{prefix}.{key}{tuple(t.shape)}".encode())
            digest.update(sample.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def precision_name(amp: torch.dtype | None) -> str:
    """The ``--precision`` name of an autocast dtype (None: fp32)."""
    names = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(amp, str(amp))


def remove_partial_writes(folders: Iterable[Path]) -> None:
    """Temp files a killed run left in output folders (``crane.files`` names them
    ``.<file name>.<random>.tmp``)."""
    for folder in folders:
        if folder.is_dir():
            for f in folder.glob(".*.tmp"):
                f.unlink(missing_ok=True)


def digest_of(items: Iterable[str]) -> str:
    """SHA-256 of a list of strings (e.g. the input paths, whose list names the outputs)."""
    return hashlib.sha256("\n".join(items).encode("utf-8", "surrogateescape")).hexdigest()


#: Settings a run's progress file holds since a later crane (26th session): missing from an
#: older run's, they are not checked (said), where any other missing one refuses the resume.
_ADDED_LATER = frozenset(
    {"backbone_sha256", "backbone_sample_sha256", "batch_size", "attention", "compile"}
)

#: How a refused resume names what changed (other settings by their own names).
_LABELS = {
    "config": "model configuration",
    "prompts_sha256": "prompts",
    "backbone_sha256": "backbone weights (--clip-weights, --dino-weights)",
    "backbone_sample_sha256": "backbone weights inside the blocks (--clip-weights, --dino-weights)",
    "inputs_sha256": "input files",
    "n_inputs": "number of input files",
    "samples_sha256": "dataset images",
    "visualize": "--visualize folder",
    "overlays": "overlay option (--no-overlays, --overlay-format)",
    "maps": "--save-maps",
    "num_bins": "--bins",
    "batch_size": "--batch-size",
    "attention": "--attention",
    "compile": "--compile",
}


def read_progress(
    path: Path, kind: str, settings: dict[str, Any], required: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """The records of an interrupted ``kind`` run, each a dict with the ``required`` keys;
    CraneError if it ran with other settings or the file is not one crane wrote."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and i > 0:
                break  # cut short as the process died: that unit is done again
            record = None
        ok = isinstance(record, dict) and (i == 0 or all(k in record for k in required))
        if not ok:
            raise CraneError(
                f"{path} line {i + 1} is not a progress record; pass --overwrite to start again"
            )
        records.append(record)
    head = records[0] if records else {}
    theirs = head.get("settings")
    if head.get("crane") != kind or not isinstance(theirs, dict):
        raise CraneError(f"{path} is not a progress file of crane {kind}")
    unrecorded = sorted((settings.keys() - theirs.keys()) & _ADDED_LATER)
    if unrecorded:  # (what an older crane did not record cannot be checked: said, not refused)
        log.warning(
            "%s was started by an older crane, which did not record its %s: not checked",
            path.parent,
            ", ".join(_LABELS.get(k, k) for k in unrecorded),
        )
    differ = sorted(
        k
        for k in (settings.keys() | theirs.keys()) - set(unrecorded)
        if settings.get(k) != theirs.get(k)
    )
    if differ:
        if "backbone_sample_sha256" in differ and {"backbone_sha256", "precision"} & set(differ):
            differ.remove("backbone_sample_sha256")  # (its values are rounded by precision)
        named = [_LABELS.get(k, k) for k in differ]
        raise CraneError(
            f"cannot resume the run in {path.parent}: it was started with other "
            f"{', '.join(named)} (a resumed run must use the same "
            "model, prompts, inputs and options); pass --overwrite to start again, or choose "
            "another --out"
        )
    return records[1:]


def _progress_kind(path: Path) -> str | None:
    """The command (``"predict"``, ``"evaluate"``) whose progress file ``path`` is, from its
    header; None if there is none or it cannot be read as one."""
    try:
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    kind = head.get("crane") if isinstance(head, dict) else None
    return kind if isinstance(kind, str) else None


def _lock(file: TextIO) -> bool:
    """Take an exclusive lock on ``file`` without waiting; False if another run holds one
    (True where the platform has no ``flock``)."""
    try:
        import fcntl
    except ImportError:  # (not POSIX)
        return True
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks
        return True
    return True


def open_progress(
    path: Path, kind: str, settings: dict[str, Any], kept: Iterable[dict[str, Any]] = ()
) -> TextIO:
    """Write the header and the records kept (atomically), then open the file to append
    records to (:func:`append`). The open file holds a lock for as long as the run has it
    open: a second run into the same folder (``--resume`` or ``--overwrite`` beside a live
    one) is refused instead of replacing the file the first one appends to; two opening it
    at the same moment take turns (:func:`_folder_lock`), so the second one is refused."""
    busy = CraneError(
        f"another crane {kind} is running into {path.parent} (it holds {path.name}); wait for "
        "it to finish or stop it, or choose another --out"
    )
    lines = [{"crane": kind, "settings": settings}, *kept]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    with _folder_lock(path.parent, busy):
        return _open_locked(path, text, busy)


#: How long a run waits for another one's few milliseconds of opening a progress file.
_FOLDER_WAIT_S = 10.0


@contextlib.contextmanager
def _folder_lock(folder: Path, busy: CraneError):
    """Hold ``flock`` on the folder itself (never replaced, unlike the progress file) while a
    run checks, replaces and locks its progress file: two runs doing so at once would each
    lock a different file (one replaced under the other) and one would append to a deleted
    file. Waits up to ``_FOLDER_WAIT_S`` for another run's turn, then ``busy``. Nothing where
    the platform or file system has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # (not POSIX)
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + _FOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise busy from None
                time.sleep(0.02)
            except OSError:  # a file system without locks
                break
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _open_locked(path: Path, text: str, busy: CraneError) -> TextIO:
    """:func:`open_progress`'s work, under the folder's lock."""
    if not path.exists():  # a fresh run: created exclusively (two starting at once: one wins)
        try:
            file = open(path, "x", encoding="utf-8")  # noqa: SIM115 (closed by the caller)
        except FileExistsError:
            raise busy from None
        if not _lock(file):
            file.close()
            raise busy
        file.write(text)
        file.flush()
        return file
    with open(path, encoding="utf-8") as current:
        if not _lock(current):
            raise busy
    atomic_write_bytes(path, text.encode())
    file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (the caller's with block closes it)
    if not _lock(file):  # (another run replaced it just now)
        file.close()
        raise busy
    return file


def append(file: TextIO, record: dict[str, Any]) -> None:
    """Add one finished unit; flushed to the OS at once (it survives the process, not a
    power cut: a resumed run then redoes what the disk lost)."""
    file.write(json.dumps(record, allow_nan=True) + "\n")
    file.flush()


class Recorder:
    """Appends records to a progress file once the output files each one vouches for are
    written: a record follows its files, so a run killed between queuing an overlay and
    writing it redoes that image (an earlier run's file of the same name, left in place by
    ``--overwrite``, never passes for this run's). Records whose files failed to write are
    dropped (their unit is redone)."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self._waiting: deque[tuple[dict[str, Any], list[Future]]] = deque()
        #: Records appended so far.
        self.appended = 0

    def add(self, record: dict[str, Any], writes: Iterable[Future] = ()) -> None:
        self._waiting.append((record, list(writes)))
        self.flush()

    def flush(self) -> int:
        """Append the records whose writes have all finished (in order); return how many
        are still waiting."""
        while self._waiting and all(f.done() for f in self._waiting[0][1]):
            record, writes = self._waiting.popleft()
            if all(not f.cancelled() and f.exception() is None for f in writes):
                append(self.file, record)
                self.appended += 1
        return len(self._waiting)


def check_resume_flags(
    out: Path, resume: bool, overwrite: bool, finished: str, kind: str | None = None
) -> Path:
    """The progress file's path in ``out``, after refusing contradictory or pointless flags:
    ``resume`` without an interrupted run, or a plain run into a folder that holds one.
    ``finished``: the file a finished run leaves (a resume then says so). ``kind`` (``"predict"``,
    ``"evaluate"``): the command asking; an interrupted run of the other one is named and
    left alone, ``--overwrite`` too (its progress is that run's, not this one's to replace)."""
    path = out / PROGRESS_FILE
    if resume and overwrite:
        raise CraneError(
            "--resume continues the run in --out and --overwrite replaces it: not both"
        )
    theirs = _progress_kind(path) if kind is not None else None
    if theirs is not None and theirs != kind:
        raise CraneError(
            f"{out} holds an interrupted crane {theirs}, not a {kind}: continue it with crane "
            f"{theirs} --resume, or choose another --out for this {kind}"
        )
    if resume and not path.is_file():
        done = " (its run finished)" if (out / finished).exists() else ""
        raise CraneError(f"{out} holds no interrupted run to resume{done}")
    if not resume and not overwrite and path.exists():
        raise CraneError(
            f"{out} holds an interrupted run; pass --resume to continue it, --overwrite to "
            "start again, or choose another --out"
        )
    return path
