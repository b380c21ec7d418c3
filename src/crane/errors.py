"""User-facing error types. The CLI prints these as one paragraph without a traceback."""


class CraneError(Exception):
    """Base class for errors caused by user input (files, options, data), not by bugs."""


class DatasetError(CraneError, ValueError):
    """A dataset layout, meta.json or sample is missing, malformed or inconsistent."""


class ImageReadError(CraneError, OSError):
    """An image or mask file could not be decoded."""


class WeightsError(CraneError, FileNotFoundError):
    """Pretrained weights are missing or of the wrong format/shape."""


class CheckpointError(CraneError, ValueError):
    """A Crane checkpoint (ours or the released prompt files) does not match the model."""


_WORKER_PREFIX = "Caught "
_TRACEBACK = "Traceback (most recent call last):\n"


def user_message(exc: BaseException) -> str:
    """The message to show for ``exc``: its own text, or for an error re-raised from a
    DataLoader worker the original message alone. torch rebuilds such an error as the same
    type with the worker's whole traceback folded into its text ("Caught DatasetError in
    DataLoader worker process 0. Original Traceback ..."), which is not one paragraph."""
    text = str(exc)
    if not text.startswith(_WORKER_PREFIX) or _TRACEBACK not in text:
        return text
    last = text.rsplit(_TRACEBACK, 1)[1]  # (the last block: the error itself, after its causes)
    lines = last.splitlines()
    at = next((i for i, line in enumerate(lines) if line and not line[0].isspace()), None)
    if at is None:
        return text
    head = lines[at]
    name = f"{type(exc).__name__}: "
    head = head.split(name, 1)[1] if name in head else head
    return "\n".join([head, *lines[at + 1 :]]).strip() or text
