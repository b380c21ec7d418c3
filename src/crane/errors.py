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
