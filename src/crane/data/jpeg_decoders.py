"""The library that decodes JPEGs on a device for :func:`crane.data.transforms.decode_jpegs`.

Two can: torchvision's ``decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on the CPU), the path
measured on the H100s, deprecated since torchvision 0.29 in favour of TorchCodec; and
TorchCodec's ``decode_jpeg`` (≥ 0.16; nvJPEG too, one batched call on CUDA). The default is
torchvision while it has the function, then TorchCodec where it is installed;
``$CRANE_JPEG_DECODER`` (``torchvision`` or ``torchcodec``) picks one.

TorchCodec applies a JPEG's EXIF orientation (rotates or mirrors the image, with no option to
leave it), where the reference (PIL's ``Image.open``) and torchvision keep the stored pixels
(see :mod:`crane.data.imageio`): the EXIF segments are removed from the bytes it is given
(:func:`without_exif`), so every decoder returns the stored pixels.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence

import torch

from crane.errors import CraneError

ENV_VAR = "CRANE_JPEG_DECODER"
DECODERS = ("torchvision", "torchcodec")


def jpeg_decoder() -> str:
    """The decoder :func:`decode` uses: ``$CRANE_JPEG_DECODER`` where set; else torchvision
    while ``torchvision.io`` has ``decode_jpeg``, else ``torchcodec`` (whether or not it is
    installed: :func:`crane.engine.predict.check_device_decode` then says how to install
    it)."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if name:
        if name not in DECODERS:
            raise CraneError(
                f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a JPEG decoder: use one of "
                f"{', '.join(DECODERS)}, or unset it for the default (torchvision while it "
                "has decode_jpeg, else torchcodec)."
            )
        return name
    import torchvision.io

    if hasattr(torchvision.io, "decode_jpeg"):
        return "torchvision"
    return "torchcodec"


def version(name: str) -> str:
    """The installed version of decoder ``name``'s package, or "not installed"."""
    try:
        if importlib.util.find_spec(name) is None:
            return "not installed"
        return importlib.metadata.version(name)
    except (ImportError, ValueError):  # a module set to None, a package without metadata
        return "(version unknown)"


def decode(
    name: str, batch: Sequence[torch.Tensor], device: torch.device, batched: bool
) -> list[torch.Tensor]:
    """Decode the JPEG bytes (1-D uint8 CPU tensors) as (3, H, W) uint8 RGB tensors on
    ``device`` with decoder ``name``: in one call where ``batched`` (nvJPEG's batched decode
    on CUDA), else one call per image. A bad stream raises (a RuntimeError), failing the
    call."""
    if name == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        mode = "RGB"
    else:
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.RGB
    if not batched or len(batch) == 1:
        return [decode_jpeg(d, mode=mode, device=device) for d in batch]
    return list(decode_jpeg(list(batch), mode=mode, device=device))


def batched(name: str) -> bool:
    """Whether decoder ``name`` takes a list of JPEGs in one call: TorchCodec always,
    torchvision from 0.19."""
    if name == "torchcodec":
        return True
    import torchvision

    major, minor = (int(p) for p in torchvision.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (0, 19)


_SOS, _EOI, _APP1 = 0xDA, 0xD9, 0xE1
_EXIF = b"Exif\x00\x00"


def without_exif(data: torch.Tensor) -> torch.Tensor | RuntimeError:
    """``data`` (a JPEG's bytes, 1-D uint8) without its EXIF segments: the APP1 segments
    whose payload starts with ``Exif\\0\\0`` (what TorchCodec's nvJPEG path looks for) or
    holds a TIFF header after its first 6 bytes whatever they are (what its CPU decoder reads
    from the first APP1 segment), among the marker segments before the first scan. ``data``
    itself where it has none.

    A header whose segments cannot be walked to the first scan (a bad length, a byte that is
    no marker) while ``Exif\\0\\0`` occurs in the data is returned as a RuntimeError: whether a
    decoder would find and apply an orientation there is not known, so the caller decodes
    that image on the host."""
    raw = memoryview(data.numpy())
    n = len(raw)
    pos, kept, cut, walked = 2, [], False, False
    start = 0  # the part from ``start`` to ``pos`` is kept as it is
    while pos + 4 <= n and raw[pos] == 0xFF:
        marker = raw[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        if marker in (_SOS, _EOI):
            walked = True
            break
        end = pos + 2 + ((raw[pos + 2] << 8) | raw[pos + 3])
        if end < pos + 4 or end > n:
            break
        if marker == _APP1 and (
            raw[pos + 4 : pos + 4 + len(_EXIF)] == _EXIF
            or raw[pos + 10 : pos + 14] in (b"II*\x00", b"MM\x00*")
        ):
            kept.append(raw[start:pos])
            start, cut = end, True
        pos = end
    if not walked and _EXIF in raw.tobytes():
        return RuntimeError(
            "the JPEG's header segments could not be walked to its first scan and it holds "
            "EXIF data (an orientation TorchCodec might apply)"
        )
    if not cut:
        return data
    kept.append(raw[start:])
    return torch.frombuffer(bytearray(b"".join(kept)), dtype=torch.uint8)
