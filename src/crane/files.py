"""Atomic file writes: a file appears under its final name complete or not at all, with the
permissions a plain ``open()`` would give it (a new file's from the umask, a replaced file
its own)."""

from __future__ import annotations

import hashlib
import math
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the process's umask. Read
    from ``/proc/self/status`` where Linux has it; elsewhere by setting and restoring the umask
    (a moment in which a file another thread creates would get mode 0o666)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temp file of its own beside ``path`` (two writers of one path never
    share one), then rename it over ``path``: no half-written file ever carries the final
    name, and the temp file is removed if writing fails. A new file gets
    :func:`new_file_mode` (``mkstemp`` makes it 0o600, which would hide a user's results from
    the colleagues their umask lets read them); a file replaced keeps its permission bits, as
    ``open(path, "w")`` would (a results file its owner made private stays private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (the name cut short in the temp file's: a final name near the file system's 255-byte
    # limit would not leave room for the affixes)
    fd, name = tempfile.mkstemp(prefix=f".{_cut(path.name, 200)}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:  # (a new file)
            mode = new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _cut(name: str, limit: int) -> str:
    """``name``'s first characters that take at most ``limit`` bytes in a file name."""
    out, size = [], 0
    for ch in name:
        size += len(os.fsencode(ch))
        if size > limit:
            break
        out.append(ch)
    return "".join(out)


def utf8_text(text: str) -> str:
    """``text`` as valid UTF-8 text: the bytes of a file name that is not UTF-8 (which Python
    holds as lone surrogates) shown as ``\\xNN`` escapes. Written as they were, one such name
    made a whole CSV unreadable as UTF-8 and a JSON file that strict parsers refuse."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # (a surrogate no file system name decodes to)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def utf8_strings(obj: Any) -> Any:
    """``obj`` (JSON-like: dicts, lists, strings) with every string :func:`utf8_text`: a path
    that is not UTF-8 went into JSON as a lone surrogate escape, which strict parsers refuse."""
    if isinstance(obj, str):
        return utf8_text(obj)
    if isinstance(obj, dict):
        return {utf8_strings(k): utf8_strings(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [utf8_strings(v) for v in obj]
    return obj


def fit_file_name(name: str, limit: int = 200) -> str:
    """``name`` unchanged if it takes at most ``limit`` bytes in a file name (255 is the usual
    file-system limit: the rest leaves room for an extension and suffixes), else cut short
    and ended with a digest of the whole name, so that names which differ only past the cut
    stay apart and the same name always gives the same result."""
    encoded = os.fsencode(name)
    if len(encoded) <= limit:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:10]
    return f"{_cut(name, limit - 11)}~{digest}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write` of ``data``, flushed to disk before the rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinite floats as None (in dicts, lists and tuples), for
    ``json.dumps(..., allow_nan=False)``: strict JSON has neither, and parsers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
