"""Where backbone weights come from: local files first, then the hubs, never a hang.

Resolution order for each backbone (first hit wins):
1. an explicit path (``clip_weights=`` / ``--clip-weights``),
2. the environment variable (``CRANE_CLIP_WEIGHTS`` / ``CRANE_DINO_WEIGHTS``),
3. the cache directory (``$CRANE_CACHE_DIR``, default ``~/.cache/crane``) under the
   file name the upstream projects publish,
4. a copy an earlier download left in a Hugging Face hub cache (the cache directory, then
   the default hub cache), so an online run's download serves later offline runs,
5. a download through open_clip / timm (skipped when ``CRANE_OFFLINE`` or ``HF_HUB_OFFLINE``
   is set, or when the hub host cannot be reached within a few seconds).
When all fail, :class:`~crane.errors.WeightsError` says in one paragraph what to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import socket
import threading
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from crane.errors import WeightsError
from crane.models import torchscript

log = logging.getLogger(__name__)

CLIP_ENV = "CRANE_CLIP_WEIGHTS"
DINO_ENV = "CRANE_DINO_WEIGHTS"
CACHE_ENV = "CRANE_CACHE_DIR"
OFFLINE_ENVS = ("CRANE_OFFLINE", "HF_HUB_OFFLINE")

#: File names under which the upstream projects publish the reference weights.
CLIP_FILENAMES = ("ViT-L-14-336px.pt", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
DINO_FILENAMES = ("dinov2_vitb14_reg4_pretrain.pth", "model.safetensors", "pytorch_model.bin")
#: Where downloads go: the Hugging Face hub (open_clip takes OpenAI's CLIP from there too
#: whenever huggingface_hub is installed, as timm takes DINOv2), else OpenAI's own host.
_HF_HOST = ("huggingface.co", 443)
_OPENAI_HOST = ("openaipublic.azureedge.net", 443)
#: Seconds a probe's name lookup, and then each address's connection, may take.
_PROBE_S = 3.0


_PROXY_ENVS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _host_port(url: str, scheme: str) -> tuple[str, int] | None:
    """(host, port) of a URL (``http://proxy:3128``; ``proxy:3128`` taken as ``scheme``'s),
    the port by its scheme where the URL gives none; None for what is no URL."""
    from urllib.parse import urlsplit

    url = url.strip()
    try:
        parts = urlsplit(url if "//" in url else f"{scheme}://{url}")
        host = parts.hostname
        port = parts.port
    except ValueError:  # (no URL, a bad port)
        return None
    if port is None:
        port = 1080 if parts.scheme.startswith("socks") else 80 if parts.scheme == "http" else 443
    return (host, port) if host else None


def _hub_hosts() -> list[tuple[str, int]]:
    """The hosts a download would reach: the Hugging Face hub's (``$HF_ENDPOINT``'s, a
    mirror's, where set, as huggingface_hub reads it), or OpenAI's where huggingface_hub is
    missing (open_clip then downloads from OpenAI's URL; timm needs the hub either way)."""
    if not _has_hf_hub():
        return [_OPENAI_HOST]
    endpoint = os.environ.get("HF_ENDPOINT", "").strip()
    mirror = _host_port(endpoint, "https") if endpoint else None
    return [mirror or _HF_HOST]  # (a value it cannot read: huggingface_hub says what is wrong)


def _has_hf_hub() -> bool:
    return importlib.util.find_spec("huggingface_hub") is not None


def _resolve(host: str, port: int) -> list[tuple[str, int]]:
    """The addresses of ``host`` (IPv6 and IPv4, as the system lists them)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))


def _answers(where: tuple[str, int]) -> bool:
    """Whether a TCP connection to ``where`` opens: its name looked up, then every address
    tried at once, each for :data:`_PROBE_S` seconds, within ``2 * _PROBE_S`` in all.
    ``socket.create_connection``'s timeout covers neither the lookup (a DNS server that never
    answers held the probe 20 s) nor the sum over a host's addresses, which it tries in turn
    (one whose packets are dropped, as a broken IPv6 route, hid the next one). The probe runs
    in daemon threads, left behind if they are late."""
    answered, finished = threading.Event(), threading.Event()

    def connect(address: tuple[str, int]) -> None:
        try:
            with socket.create_connection(address, timeout=_PROBE_S):
                answered.set()
                finished.set()
        except (OSError, ValueError):  # (ValueError: a host name IDNA cannot encode)
            pass

    def probe() -> None:
        try:
            addresses = _resolve(*where)
        except (OSError, ValueError):  # (UnicodeError is a ValueError)
            addresses = []
        threads = [threading.Thread(target=connect, args=(a,), daemon=True) for a in addresses]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        finished.set()

    threading.Thread(target=probe, name="crane-network-probe", daemon=True).start()
    finished.wait(2 * _PROBE_S)
    return answered.is_set()


def cache_dir() -> Path:
    # (expanded: a literal "~" from a .env, docker or systemd file means the home folder)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "crane").expanduser()


def _offline() -> bool:
    off = ("", "0", "false", "no", "off")  # (as huggingface_hub reads HF_HUB_OFFLINE)
    if any(os.environ.get(k, "").strip().lower() not in off for k in OFFLINE_ENVS):
        return True
    proxy = next((os.environ[k] for k in _PROXY_ENVS if os.environ.get(k, "").strip()), None)
    hub = _hub_hosts()[0][0]
    if proxy is not None and not urllib.request.proxy_bypass_environment(hub):  # (NO_PROXY)
        # Direct probes say nothing behind a proxy: the proxy itself is probed. One that does
        # not answer cost about a minute of the hub client's retries before the message.
        where = _host_port(proxy, "http")
        if where is None:
            return False  # (a value it cannot read: the hub client says what is wrong)
        if _answers(where):
            return False
        log.info("the proxy %s:%s does not answer: no download is attempted", *where)
        return True
    return not any(_answers(where) for where in _hub_hosts())


def resolve_local(
    explicit: str | os.PathLike | None,
    env: str,
    filenames: tuple[str, ...],
    flag: str,
    what: str,
    hub: tuple[str, tuple[str, ...]] | None = None,
) -> Path | None:
    """The local weight file to use, or None when a download should be attempted.

    ``hub``: ``(repo_id, file names)`` under which open_clip / timm download the weights
    from the Hugging Face hub; a copy an earlier download left in a hub cache is used
    (:func:`hub_cached`)."""
    for source, value in (("argument", explicit), (f"${env}", os.environ.get(env))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                why = "a folder, not a file" if path.is_dir() else "which does not exist"
                raise offline_error(what, filenames, flag, env, f"{source} names {path}, {why}")
            return path
    for name in filenames:
        candidate = cache_dir() / name
        if candidate.is_file():
            return candidate
    return hub_cached(*hub) if hub else None


def hub_cached(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    """A file of ``repo_id`` (the first of ``filenames`` present) that an earlier download
    left in a Hugging Face hub cache: the cache directory, where crane has open_clip and timm
    download to, then the user's default hub cache (``HF_HUB_CACHE``). No network access."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of timm and open_clip
        return None
    for cache in (str(cache_dir()), None):
        for name in filenames:
            try:
                found = try_to_load_from_cache(repo_id, name, cache_dir=cache)
            except Exception as exc:  # a malformed cache folder must not stop the run
                log.debug("hub cache lookup of %s/%s failed: %s", repo_id, name, exc)
                continue
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    return None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: OpenAI TorchScript archive, torch state dict, or safetensors.

    All three are read as data: nothing in a file runs. Plain torch files are loaded with
    ``weights_only=True``, safetensors files with safetensors, and a TorchScript archive (the
    OpenAI CLIP release format) by :mod:`crane.models.torchscript`, which gives what
    ``torch.jit.load(f).state_dict()`` gives without compiling or running the archive's code
    (``torch.jit.load``, which open_clip uses, runs its ``__setstate__`` methods).
    """
    path = Path(path)
    try:
        # (by content: a torch file saved under a .safetensors name is read as what it is)
        is_zip = zipfile.is_zipfile(path)
        if (path.suffix == ".safetensors" and not is_zip) or _looks_like_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path))
        if is_zip:
            check_zip_crcs(path)
            if is_torchscript(path):
                return _without_archive_extras(torchscript.read_state_dict(path))
        obj = _torch_load(path)
    except WeightsError:
        raise
    except Exception as exc:  # unpickling, zip and format errors come in many types
        raise WeightsError(
            f"cannot read weight file {path}{describe_file(path)}; crane reads torch state dicts, "
            "OpenAI's TorchScript archives and safetensors files"
        ) from exc
    teacher = False
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj, teacher = obj[key], key == "teacher"
            break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weight file {path} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("prompt_learner"), Mapping):
        raise WeightsError(
            f"{path} is a Crane prompt file (it holds a 'prompt_learner'), not backbone "
            "weights: pass it as --prompts"
        )
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    # DINOv2 training checkpoints nest the backbone under 'backbone.'; its teacher_checkpoint
    # holds the training heads (dino_head., ibot_head.) beside it, which are not the backbone.
    if teacher and any(k.startswith("backbone.") for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    if sd and all(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    return _without_archive_extras(sd)


def _without_archive_extras(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI's archive keeps a few non-weights beside the tensors (also in a state dict saved
    from it, as open_clip's loader accepts): dropped."""
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        sd.pop(key, None)
    return sd


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file under another name (``model.bin``): an 8-byte little-endian header
    length that fits the file, then the JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        n = int.from_bytes(head[:8], "little")
        return len(head) == 9 and head[8:9] == b"{" and 8 + n <= path.stat().st_size
    except OSError:
        return False


def describe_file(path: Path) -> str:
    """What an unreadable weight file looks like, from its first bytes (torch's own errors
    advise ``weights_only=False``, which is no help here)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
        size = path.stat().st_size
    except OSError as exc:
        return f" ({exc.strerror or exc})"
    text = head.lstrip().lower()
    if not head:
        return ": the file is empty"
    if text.startswith(b"version https://git-lfs"):
        return ": it is a Git LFS pointer, not the file (run `git lfs pull` where it came from)"
    if text.startswith((b"<!doctype", b"<html", b"<?xml")):
        return ": it is a web page (a failed or redirected download)"
    if head[:4] == b"PK\x03\x04":
        try:
            if is_torchscript(path):  # (before testzip, which inflates every member)
                return ": a TorchScript archive that is damaged or holds what crane does not read"
            with zipfile.ZipFile(path) as zf:
                torch_zip = any(n.endswith("/data.pkl") for n in zf.namelist())
                intact = zf.testzip() is None
        except Exception:  # (damaged, encrypted, ...: said below)
            torch_zip = intact = False
        if intact and not torch_zip:
            return ": a zip archive, not a torch file (a numpy .npz, or an archive around one?)"
        if intact:
            return (
                ": a torch file holding more than tensors (a whole pickled model or training "
                "state?), which crane does not unpickle: save its state_dict() instead"
            )
        return f": a zip archive that is damaged or incomplete ({size} bytes)"
    return f": not a format it knows, or a damaged file ({size} bytes)"


VERIFIED_FILE = "verified-weights.json"


def check_zip_crcs(path: Path) -> None:
    """Raise a :class:`~crane.errors.WeightsError` when a member of the zip file ``path`` (a
    torch file, a TorchScript archive) fails its CRC-32: damaged bytes inside a tensor load
    without any other error, finite and wrong. Reading the whole file took 0.6 s for a
    1.7 GB fp32 state dict (CLIP ViT-L/14-336's size) in the page cache on the 2-core dev box,
    so a file that passed is remembered in the cache folder (by path, size, modification and
    change times and inode) and not read again (0.05 s for the whole load then). Files torch
    saved without CRCs (all zero) are not checked."""
    try:
        st = path.stat()
        # (the inode and change time too: a damaged copy that kept the modification time,
        # as `cp -p` and `rsync -a` keep it, is another file)
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
    except OSError:
        return  # (torch's own read reports it)
    record = cache_dir() / VERIFIED_FILE
    try:
        known = json.loads(record.read_text())
        known = known if isinstance(known, list) else []
    except (OSError, ValueError):
        known = []
    if key in known:
        return
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if infos and all(i.CRC == 0 for i in infos) and any(i.file_size for i in infos):
                # torch's format without CRCs (torch.serialization.set_crc32_options(False)):
                # nothing to check against
                log.debug("%s was saved without CRC-32s: not checked", path)
                return
            bad = zf.testzip()
    except (OSError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as exc:
        raise WeightsError(
            f"weight file {path} is a damaged zip archive ({exc}): download or copy it again"
        ) from None
    if bad is not None:
        raise WeightsError(
            f"weight file {path} is damaged: its member {bad} fails its CRC-32 check (bytes "
            "changed after it was written): download or copy it again"
        )
    try:  # (best effort: a cache folder that cannot be written only costs the next check)
        from crane.files import atomic_write_bytes

        record.parent.mkdir(parents=True, exist_ok=True)
        kept = [k for k in known if isinstance(k, str) and not k.startswith(f"{path.resolve()}|")]
        atomic_write_bytes(record, json.dumps([*kept[-63:], key], indent=1).encode())
    except OSError as exc:
        log.debug("could not record %s as verified in %s: %s", path, record, exc)


def _torch_load(path: Path) -> object:
    """``torch.load`` of a plain torch file, memory-mapped where the format allows (the zip
    format torch has written since 1.6): tensors are then read straight from the page cache
    when :func:`load_into` copies them into the model, instead of into a second full-size
    copy first — 0.02 s instead of 0.8–4 s for CLIP ViT-L/14-336's 1.7 GB on the 2-core dev
    box (``benchmarks/startup.py``). Older files are read whole, and so is a torch file named
    ``.safetensors``, which ``torch.load`` given its path would read as safetensors."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    if zipfile.is_zipfile(path):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # a file system or platform that cannot map it, or a bad
            # file, which the plain read below then reports
            log.debug("memory-mapped load of %s failed (%s); reading it whole", path, exc)
    return torch.load(str(path), map_location="cpu", weights_only=True)


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding code; False for anything
    else, unreadable files included)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def load_into(
    module: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: Path, what: str
) -> None:
    """Strict load with an error that lists the first mismatches instead of a wall of keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    wrong += [
        f"{k}: file {sd[k].dtype} vs model {own[k].dtype}"
        for k in own
        if k in sd and sd[k].is_floating_point() != own[k].is_floating_point()
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape or type", wrong),
        ):
            if items:
                parts.append(f"{len(items)} {label} (first: {', '.join(items[:4])})")
        raise WeightsError(f"{path} does not fit the {what} architecture: " + "; ".join(parts))
    bad = [k for k, v in sd.items() if not all_finite(v)]
    if bad:  # (they would reach every score as NaN, image after image)
        raise WeightsError(
            f"{path} holds NaN or infinite values in {len(bad)} {what} tensor(s) (first: "
            f"{', '.join(bad[:4])}): a damaged or diverged file"
        )
    module.load_state_dict(sd, strict=True)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t`` (true for non-float tensors). By its minimum and maximum,
    which are NaN when any value is: on the CPU 25× faster than ``torch.isfinite(t).all()``,
    whose pass over CLIP ViT-L's 428 M weights added 0.4 s (fp32 state dict) to 0.8 s (fp16
    archive) to every model build on the 2-core dev box (26th session)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:  # (float8: no aminmax on the CPU)
        t = t.float()
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


class _SkipParameterInit(TorchFunctionMode):
    """See :func:`no_random_init`."""

    # The in-place writes initialisers make (random fills and the arithmetic of truncated
    # normals); metadata changes such as requires_grad_ still run.
    _WRITES = frozenset(
        "uniform_ normal_ erfinv_ mul_ add_ sub_ div_ clamp_ fill_ zero_ copy_ random_ "
        "bernoulli_ exponential_".split()
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        name = getattr(func, "__name__", "")
        initializer = getattr(func, "__module__", "") == "torch.nn.init" and name.endswith("_")
        if (initializer or name in self._WRITES) and isinstance(target, torch.nn.Parameter):
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_random_init() -> Iterator[None]:
    """Build modules whose weights are loaded right after without initialising them first.

    Inside, ``torch.nn.init``'s initialisers and the in-place writes initialisers make
    (``uniform_``, ``normal_``, the arithmetic of truncated normals ...) return an
    ``nn.Parameter`` they are given untouched, so it keeps the uninitialised memory
    ``torch.empty`` gave it. Everything else runs as usual: shapes, and non-persistent
    buffers such as CLIP's causal text mask. Random initialisation was most of building the
    backbones: about 2 s of CLIP ViT-L/14-336 and 0.5–1.5 s of DINOv2-B/14 on the 2-core dev
    box (``benchmarks/startup.py``). Only for modules then filled by a strict
    :func:`load_into`, which overwrites every parameter. Applies to the calling thread only
    (torch function modes are per thread)."""
    with _SkipParameterInit():
        yield


def offline_error(
    what: str,
    filenames: tuple[str, ...],
    flag: str,
    env: str,
    why: str,
    hub: tuple[str, tuple[str, ...]] | None = None,
) -> WeightsError:
    """The one-paragraph error for weights that are missing: the file, the flag (and its
    Python keyword), the environment variable, the cache folder and where to download it."""
    cached = cache_dir() / filenames[0]
    keyword = flag.lstrip("-").replace("-", "_")
    source = (
        f"from the Hugging Face hub repository {hub[0]} ({' or '.join(hub[1])}), or " if hub else ""
    )
    return WeightsError(
        f"{what} weights are not available ({why}). Crane needs the file {filenames[0]} "
        f"(any of: {', '.join(filenames)}). Fix it in one of three ways: pass {flag} "
        f"/path/to/{filenames[0]} (Python: {keyword}=...); or set the environment variable "
        f"{env}=/path/to/{filenames[0]}; or copy the file to {cached} (the cache directory is "
        f"set by {CACHE_ENV}). The file can be downloaded on a machine with internet access: "
        f"{source}by any online run of crane there, which fetches it into its cache directory "
        "(copy that directory here). To try crane without any weights, run `crane demo`."
    )


def hub_unreachable() -> bool:
    """True when no download should be attempted (offline flag set or hosts unreachable)."""
    return _offline()
