"""meta.json: the dataset index shared with AnomalyCLIP, AdaCLIP and the Crane reference (SPEC §8).

Format, at the dataset root::

    {"train": {cls: [sample, ...]}, "test": {cls: [sample, ...]}}

with each sample ``{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}`` in
that key order, paths relative to the root with forward slashes, ``mask_path`` "" when
there is no mask and ``anomaly`` 0 or 1. The reference generators write it with
``json.dumps(info, indent=4) + "\\n"``; :func:`write_meta` produces the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crane.errors import DatasetError
from crane.files import new_file_mode

logger = logging.getLogger(__name__)

META_FILENAME = "meta.json"
SPLITS = ("train", "test")
SAMPLE_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")
#: How many offending entries an error message lists before "... and N more".
MAX_LISTED = 5

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Sample:
    """One meta.json entry. Paths are relative to the dataset root, with forward slashes."""

    img_path: str
    mask_path: str
    cls_name: str
    specie_name: str
    anomaly: int

    @property
    def has_mask(self) -> bool:
        return bool(self.mask_path)

    def to_dict(self) -> dict[str, str | int]:
        """The JSON object, keys in the reference order."""
        return {key: getattr(self, key) for key in SAMPLE_KEYS}


#: ``{split: {class name: [Sample, ...]}}`` with both splits present.
Meta = dict[str, dict[str, list[Sample]]]


def new_meta() -> Meta:
    """An empty index with both splits."""
    return {split: {} for split in SPLITS}


def iter_samples(meta: Meta, split: str | None = None) -> Iterator[tuple[str, Sample]]:
    """Yield ``(split, sample)`` over one split or both, in file order."""
    for name in SPLITS if split is None else (split,):
        for samples in meta.get(name, {}).values():
            for sample in samples:
                yield name, sample


# --------------------------------------------------------------------------- problems


class _Problems:
    """Collects validation problems and raises one DatasetError listing the first few."""

    def __init__(self, header: str) -> None:
        self.header = header
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise DatasetError(format_problem_list(self.header, self.items))


def format_problem_list(header: str, items: list[str], limit: int = MAX_LISTED) -> str:
    """``header`` plus the count and the first ``limit`` items, one per line."""
    n = len(items)
    lines = [f"{header}: {n} problem{'s' if n != 1 else ''}"]
    lines += [f"  - {item}" for item in items[:limit]]
    if n > limit:
        lines.append(f"  ... and {n - limit} more")
    return "\n".join(lines)


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a safe root-relative path, or None if it is."""
    if not path:
        return "empty path"
    if "\\" in path:
        return f"{path!r} contains a backslash (use forward slashes)"
    if path.startswith("/") or _WINDOWS_DRIVE.match(path):
        return f"{path!r} is absolute (paths must be relative to the dataset root)"
    if ".." in path.split("/"):
        return f"{path!r} escapes the dataset root ('..')"
    return None


# --------------------------------------------------------------------------- parsing


def meta_from_json(data: Any, source: str = "meta.json") -> Meta:
    """Parse the JSON object of a meta.json into :class:`Sample` records.

    Checks the structure (splits, key sets, types); raises DatasetError listing the first
    few problems. Content checks are in :func:`validate_meta`.
    """
    problems = _Problems(f"{source} is malformed")
    if not isinstance(data, Mapping):
        raise DatasetError(f"{source} must hold a JSON object, got {type(data).__name__}")
    for key in data:
        if key not in SPLITS:
            problems.add(repr(key), f"unknown split (expected {', '.join(SPLITS)})")
    for split in SPLITS:
        if split not in data:
            problems.add(repr(split), "missing split (write {} for an empty one)")
    meta = new_meta()
    for split in SPLITS:
        classes = data.get(split, {})
        if not isinstance(classes, Mapping):
            problems.add(split, f"must map class names to lists, got {type(classes).__name__}")
            continue
        for cls, entries in classes.items():
            where_cls = f"{split}/{cls}"
            if not isinstance(entries, list):
                problems.add(where_cls, f"must be a list of samples, got {type(entries).__name__}")
                continue
            parsed: list[Sample] = []
            for i, entry in enumerate(entries):
                sample = _parse_sample(entry, f"{where_cls}[{i}]", problems)
                if sample is not None:
                    parsed.append(sample)
            meta[split][cls] = parsed
    problems.raise_if_any()
    return meta


def _parse_sample(entry: Any, where: str, problems: _Problems) -> Sample | None:
    if not isinstance(entry, Mapping):
        problems.add(where, f"sample must be an object, got {type(entry).__name__}")
        return None
    unknown = [k for k in entry if k not in SAMPLE_KEYS]
    missing = [k for k in SAMPLE_KEYS if k not in entry]
    if unknown:
        problems.add(where, f"unknown key(s) {', '.join(map(repr, unknown))}")
    if missing:
        problems.add(where, f"missing key(s) {', '.join(map(repr, missing))}")
    if unknown or missing:
        return None
    ok = True
    for key in SAMPLE_KEYS[:4]:
        if not isinstance(entry[key], str):
            problems.add(where, f"{key} must be a string, got {type(entry[key]).__name__}")
            ok = False
    label = entry["anomaly"]
    # bool is an int subclass; JSON true/false is not a valid label.
    if not isinstance(label, int) or isinstance(label, bool):
        problems.add(where, f"anomaly must be the integer 0 or 1, got {label!r}")
        ok = False
    return Sample(**{k: entry[k] for k in SAMPLE_KEYS}) if ok else None


def meta_to_json(meta: Meta) -> dict[str, dict[str, list[dict[str, str | int]]]]:
    """The plain JSON structure (both splits, reference key order)."""
    return {
        split: {cls: [s.to_dict() for s in samples] for cls, samples in meta.get(split, {}).items()}
        for split in SPLITS
    }


def dumps_meta(meta: Meta) -> str:
    """Serialise exactly as the reference generators do: ``json.dumps(indent=4) + "\\n"``."""
    return json.dumps(meta_to_json(meta), indent=4) + "\n"


# --------------------------------------------------------------------------- validation


def validate_meta(meta: Meta, root: str | os.PathLike[str] | None = None) -> None:
    """Check sample contents; with ``root``, also that every referenced file exists.

    Problems reported (first few listed, with the total): paths that are absolute, use
    backslashes or escape the root, labels outside {0, 1}, masks on normal samples,
    ``cls_name`` differing from its class key, duplicate images within a split, and
    (with ``root``) missing image or mask files. Raises DatasetError.
    """
    problems = _Problems("invalid dataset index")
    for split in SPLITS:
        seen: dict[str, str] = {}
        for cls, samples in meta.get(split, {}).items():
            for i, s in enumerate(samples):
                where = f"{split}/{cls}[{i}] {s.img_path!r}"
                for msg in sample_problems(s, cls):
                    problems.add(where, msg)
                key = posixpath.normpath(s.img_path) if s.img_path else ""
                if key and key in seen:
                    problems.add(where, f"duplicate entry (also at {seen[key]})")
                elif key:
                    seen[key] = f"{split}/{cls}[{i}]"
    problems.raise_if_any()
    if root is not None:
        missing = missing_files(meta, root)
        if missing:
            raise DatasetError(format_problem_list(f"files missing under {root}", missing))


def sample_problems(sample: Sample, cls_key: str | None = None) -> list[str]:
    """Content problems of one sample (no file-system access)."""
    out = []
    if (why := path_problem(sample.img_path)) is not None:
        out.append(f"img_path {why}")
    if sample.mask_path and (why := path_problem(sample.mask_path)) is not None:
        out.append(f"mask_path {why}")
    if sample.anomaly not in (0, 1):
        out.append(f"anomaly must be 0 or 1, got {sample.anomaly!r}")
    elif sample.anomaly == 0 and sample.mask_path:
        out.append(f"normal sample (anomaly 0) has a mask {sample.mask_path!r}")
    if cls_key is not None and sample.cls_name != cls_key:
        out.append(f"cls_name {sample.cls_name!r} differs from its class key {cls_key!r}")
    return out


def missing_files(meta: Meta, root: str | os.PathLike[str]) -> list[str]:
    """Descriptions of every image/mask file the index references that does not exist."""
    root = Path(root)
    out = []
    for split, s in iter_samples(meta):
        if not (root / s.img_path).is_file():
            out.append(f"{split}/{s.cls_name}: image {s.img_path!r} not found")
        if s.mask_path and not (root / s.mask_path).is_file():
            out.append(f"{split}/{s.cls_name}: mask {s.mask_path!r} not found")
    return out


def unreadable_files(
    meta: Meta, root: str | os.PathLike[str], *, threads: int = 4, progress: bool = False
) -> list[str]:
    """Decode every image and mask the index references, as loading them would (no
    resizing), and describe each that fails: missing, corrupt or truncated files, masks of
    another size than their image. Slow (every file is decoded), so an opt-in check
    (``crane datasets check --deep``) of what would otherwise stop a run midway.
    ``threads``: files decoded at once (decoders release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from crane.data.imageio import open_image, open_mask_of
    from crane.errors import CraneError

    root = Path(root)
    pairs = list(dict.fromkeys((s.img_path, s.mask_path) for _, s in iter_samples(meta)))

    def check(pair: tuple[str, str]) -> str | None:
        image, mask = pair
        try:
            im = open_image(root / image)
            if mask:
                open_mask_of(root / mask, root / image, im.height, im.width)
        except CraneError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = pool.map(check, pairs)
        bar = tqdm(found, total=len(pairs), desc="decode", unit="file", disable=not progress)
        return [p for p in bar if p is not None]


def sample_missing_files(sample: Sample, root: str | os.PathLike[str]) -> list[str]:
    """The image/mask paths of one sample that do not exist under ``root``."""
    root = Path(root)
    out = [sample.img_path] if not (root / sample.img_path).is_file() else []
    if sample.mask_path and not (root / sample.mask_path).is_file():
        out.append(sample.mask_path)
    return out


# --------------------------------------------------------------------------- file I/O


def meta_path(root: str | os.PathLike[str]) -> Path:
    return Path(root) / META_FILENAME


def read_meta(root: str | os.PathLike[str], *, check_files: bool = True) -> Meta:
    """Read and validate ``<root>/meta.json``.

    Raises DatasetError if the file is missing, is not valid JSON, is malformed, has
    invalid entries, or (with ``check_files``) references files that do not exist.
    """
    path = meta_path(root)
    if not Path(root).is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a directory")
    if not path.is_file():
        raise DatasetError(
            f"no {META_FILENAME} in {root}; create one with "
            f"`crane datasets prepare NAME --root {root}` (see `crane datasets list`)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    meta = meta_from_json(data, source=str(path))
    validate_meta(meta, root if check_files else None)
    return meta


def write_meta(
    root: str | os.PathLike[str],
    meta: Meta,
    *,
    overwrite: bool = False,
    check_files: bool = True,
) -> Path:
    """Validate ``meta`` and write it to ``<root>/meta.json`` atomically.

    The file is written to a temporary name in the same directory and then moved into
    place, so readers never see a half-written index. An existing meta.json is never
    replaced unless ``overwrite=True`` (DatasetError otherwise). Returns the path.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a directory")
    validate_meta(meta, root if check_files else None)
    target = meta_path(root)
    if target.exists() and not overwrite:
        raise DatasetError(f"{target} already exists; pass overwrite=True (CLI: --overwrite)")
    data = dumps_meta(meta).encode("utf-8")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{META_FILENAME}.", suffix=".tmp", dir=root)
    except OSError as exc:
        raise DatasetError(f"cannot write {META_FILENAME} in {root}: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())  # (mkstemp creates 0600)
        if overwrite:
            os.replace(tmp, target)
        else:
            _place_new(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    logger.debug("wrote %s", target)  # (the CLI says so itself)
    return target


def _place_new(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` only if ``target`` does not exist, atomically if possible."""
    try:
        os.link(tmp, target)  # fails with FileExistsError instead of clobbering
    except FileExistsError as exc:
        raise DatasetError(
            f"{target} already exists; pass overwrite=True (CLI: --overwrite)"
        ) from exc
    except OSError:
        # File systems without hard links: fall back to check-then-replace.
        if target.exists():
            raise DatasetError(
                f"{target} already exists; pass overwrite=True (CLI: --overwrite)"
            ) from None
        os.replace(tmp, target)


# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class ClassCounts:
    normal: int
    anomalous: int
    masks: int

    @property
    def total(self) -> int:
        return self.normal + self.anomalous


def count_samples(meta: Meta) -> dict[str, dict[str, ClassCounts]]:
    """``{split: {class: ClassCounts}}`` in file order."""
    out: dict[str, dict[str, ClassCounts]] = {}
    for split in SPLITS:
        out[split] = {}
        for cls, samples in meta.get(split, {}).items():
            anomalous = sum(s.anomaly == 1 for s in samples)
            out[split][cls] = ClassCounts(
                normal=len(samples) - anomalous,
                anomalous=anomalous,
                masks=sum(s.has_mask for s in samples),
            )
    return out


def format_summary(meta: Meta) -> str:
    """A per-split, per-class table of normal/anomalous/mask counts."""
    counts = count_samples(meta)
    rows = [("split", "class", "normal", "anomalous", "masks")]
    for split, classes in counts.items():
        for cls, c in classes.items():
            rows.append((split, cls, str(c.normal), str(c.anomalous), str(c.masks)))
        if classes:
            tot = [sum(getattr(c, f) for c in classes.values()) for f in ("normal", "anomalous")]
            masks = sum(c.masks for c in classes.values())
            rows.append((split, "(all)", str(tot[0]), str(tot[1]), str(masks)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for r in rows:
        left = [r[i].ljust(widths[i]) for i in range(2)]
        right = [r[i].rjust(widths[i]) for i in range(2, 5)]
        lines.append("  ".join(left + right).rstrip())
    return "\n".join(lines)
