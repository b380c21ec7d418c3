"""Device and precision choices shared by the pipelines."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from crane.config import CraneConfig
from crane.constants import ATTENTION_KERNELS
from crane.data import AnomalyDataset, collate_skip_none
from crane.data.transforms import normalize_uint8
from crane.engine.batching import (
    ChunkedBatches,
    check_shared_memory,
    chunk_plan,
    reuse_freed_memory,
)
from crane.errors import CraneError
from crane.models.vision import strict_fp32

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CraneError(f"--device {device}: not a device (cpu, cuda, cuda:1, ...)") from exc
    if dev.type not in ("cpu", "cuda"):  # (mps, xpu, meta...: not what crane is built for)
        raise CraneError(f"--device {device}: crane runs on the CPU or CUDA (cpu, cuda, cuda:1)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CraneError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda":
        if dev.index is None:  # pinned now: "cuda" means the thread's current device at each use
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise CraneError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return dev


_SAID: dict[str, bool] = {}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise CraneError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise CraneError("fp16 needs a CUDA device; use --precision bf16 or fp32 on CPU")
    if dtype is torch.bfloat16 and device.type == "cpu":
        from crane.models.kernels import native_bf16

        if not native_bf16() and not _SAID.get("emulated bf16"):
            _SAID["emulated bf16"] = True  # (once: the CLI and its Detector both ask)
            log.warning(
                "--precision bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): it is "
                "emulated there, several times slower than fp32 (a Crane+ image took 49 s "
                "against 11.7 s on an AVX2 Zen 3); fp32 is the faster choice here"
            )
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the backbones; softmax, norms and the Gaussian stay in fp32
    (autocast keeps softmax/layer_norm in fp32; scoring casts maps to fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@functools.cache
def _sdpa_api():
    """``(SDPBackend, sdpa_kernel)``, or None on a torch without ``sdpa_kernel``'s
    ``set_priority`` (the package allows torch versions older than that, where only ``auto``
    runs). Looked up once: named kernels enter it on every forward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    has_priority = "set_priority" in inspect.signature(sdpa_kernel).parameters
    if not has_priority or not hasattr(torch._C, "_get_sdp_priority_order"):
        return None
    return SDPBackend, sdpa_kernel


def check_attention(name: str) -> str:
    if name not in ATTENTION_KERNELS:
        raise CraneError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {name!r}")
    if name != "auto" and _sdpa_api() is None:
        raise CraneError(
            f"--attention {name} needs a torch whose torch.nn.attention.sdpa_kernel takes "
            f"set_priority (this is torch {torch.__version__}, the 2.14 pin has it): upgrade "
            "torch or use --attention auto"
        )
    return name


def attention_kernels(name: str = "auto") -> contextlib.AbstractContextManager:
    """While open, every ``scaled_dot_product_attention`` (CLIP's, the E-Attn terms, DINOv2's)
    tries the kernel ``name`` first, then the kernels torch would have tried, in torch's order.

    ``auto``: torch's own choice: FlashAttention-2, memory-efficient, math, cuDNN; but on
    Hopper/Blackwell data-centre GPUs (sm90/sm100) with a recent cuDNN torch tries cuDNN first
    unless ``TORCH_CUDNN_SDPA_DEPRIORITIZED`` is set (measured on an H100, torch 2.11 and cuDNN
    9.19: ``auto`` ran cuDNN, 1.38x FlashAttention-2 at Crane+'s shapes, so ``cudnn`` changed
    nothing there). ``cudnn``/``flash``/``efficient``: that CUDA kernel first where it can
    serve the call (dtype, head size, strides, GPU); a call it cannot serve runs as under
    ``auto``, so no setting fails. On the CPU
    torch has one fused kernel and keeps it whatever the order says. ``math``: only the
    unfused reference (materialises every N×N matrix; for checks), on any device.
    Backends switched off before stay off; the previous settings come back on exit.
    These are torch's process-wide settings: the pipelines open this inside
    :func:`~crane.models.vision.strict_fp32`, whose lock (on CUDA) keeps two threads' forwards
    from running under each other's order.
    """
    if ATTENTION_KERNELS[check_attention(name)] is None:
        return contextlib.nullcontext()
    SDPBackend, sdpa_kernel = _sdpa_api()
    first = getattr(SDPBackend, ATTENTION_KERNELS[name])
    if first == SDPBackend.MATH:
        return sdpa_kernel([SDPBackend.MATH])
    on = {
        SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled(),
        SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
        SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
        SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
    }
    order = [first] + [
        b
        for b in (SDPBackend(int(i)) for i in torch._C._get_sdp_priority_order())
        if b != first and on.get(b, False)
    ]
    return sdpa_kernel(order, set_priority=True)


def attention_kernel_used(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs
) -> str:
    """The kernel ``scaled_dot_product_attention(q, k, v, *args, **kwargs)`` would run under
    the current settings (``flash``, ``efficient``, ``cudnn``, ``math``...), as torch's
    dispatcher picks it."""
    from torch.nn.attention import SDPBackend

    choice = SDPBackend(int(torch._fused_sdp_choice(q, k, v, *args, **kwargs)))
    names = {member: name for name, member in ATTENTION_KERNELS.items() if member is not None}
    return names.get(choice.name, choice.name.lower())


def nan_score_message(cfg: CraneConfig, amp: torch.dtype | None) -> str:
    """Why a model may have scored NaN, and what to change (predict and evaluate say this)."""
    return f"the model's anomaly score is NaN ({nan_cause(cfg, amp)})"


def nan_cause(cfg: CraneConfig, amp: torch.dtype | None) -> str:
    """What may make a forward at precision ``amp`` non-finite, and what to change."""
    if amp is None:
        why = "in fp32 this points to weights holding NaN/inf values"
    elif cfg.use_dattn and cfg.dino_fp32 and cfg.dino_attn_fp16:
        why = (
            "DINOv2's attention ran in fp16 (range ±65504) and may have overflowed: use "
            "--dino-precision fp32 (API: dino_attn_fp16=False) or --precision fp32"
        )
    elif cfg.use_dattn and not cfg.dino_fp32 and cfg.dino_fp16:
        why = (
            "DINOv2 ran in fp16 (range ±65504) and may have overflowed: use --dino-precision "
            "bf16 or fp32 (API: dino_fp16=False) or --precision fp32"
        )
    else:
        name = str(amp).removeprefix("torch.")
        why = f"{name} autocast may have overflowed: try --precision fp32"
    return why


def model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loader's batch on ``device`` as the model takes it: uint8 pixels (from workers, a
    quarter of the bytes) are normalised there, bitwise equal to normalising on the host."""
    images = images.to(device, non_blocking=True)
    return normalize_uint8(images) if images.dtype == torch.uint8 else images


def batch_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    uint8: bool = True,
    device_jpeg: bool = False,
    device_resize: bool = False,
) -> ChunkedBatches:
    """A dataset's batches in order for a forward pass on ``device`` (images pinned for CUDA;
    unreadable samples dropped, batches kept full), decoded by ``workers`` processes in chunks of
    ⌈batch / workers⌉ samples (:class:`~crane.engine.batching.ChunkedBatches`). With ``uint8``, an
    :class:`AnomalyDataset` with the CLIP normalisation hands over uint8 pixels and bool masks
    instead (a quarter / an eighth of the bytes), which :func:`model_input` normalises there:
    bitwise the same model inputs. The caller's dataset keeps handing out floats. ``device_jpeg``:
    its uint8 view hands over JPEG files undecoded (:meth:`AnomalyDataset.device_jpeg_view`);
    ``device_resize``: large images decoded but unresized
    (:meth:`AnomalyDataset.device_resize_view`; on CUDA the loader's thread pins them)."""
    if device_jpeg or device_resize:
        if not (isinstance(dataset, AnomalyDataset) and dataset.clip_normalised):
            what = "decoding JPEGs" if device_jpeg else "resizing images"
            raise CraneError(
                f"{what} on the device needs an AnomalyDataset with the CLIP "
                "normalisation (the model side normalises the decoded pixels)"
            )
        dataset = dataset.device_jpeg_view() if device_jpeg else dataset.uint8_view()
        if device_resize:
            dataset = dataset.device_resize_view()
    elif uint8 and isinstance(dataset, AnomalyDataset) and dataset.clip_normalised:
        dataset = dataset.uint8_view()
    pin = ("image",) if device.type == "cuda" else ()  # masks stay on the host
    if device_resize and workers:
        chunk, prefetch = chunk_plan(batch_size, workers)
        check_shared_memory(workers * (prefetch or 2) * chunk)
    return ChunkedBatches(
        dataset,
        batch_size,
        workers,
        collate_skip_none,
        pin=pin,
        worker_init_fn=reuse_freed_memory if device_resize else None,
        pin_memory=device_resize and device.type == "cuda",
    )


# The attention setting the process's torch.compile caches were traced under (see
# scoring_forward); None before the first compiled call.
_COMPILED_UNDER: str | None = None
_COMPILED_LOCK = threading.Lock()


def _compiled_attention(attention: str) -> None:
    """Before a compiled call under ``attention``: a compiled graph has its attention kernels
    baked in, and torch.compile does not guard on torch's attention settings (nor can a guard
    placed in our code cover the frames that graph breaks split off), so a graph traced under
    one setting would serve a Detector that asked for another — seen on the CPU: a second
    compiled Detector of the same model under ``math`` ran the first one's fused kernel. When
    the setting differs from the one the caches were traced under, they are dropped
    (``torch._dynamo.reset()``) and traced again under the new one."""
    global _COMPILED_UNDER
    with _COMPILED_LOCK:
        if _COMPILED_UNDER not in (None, attention):
            log.warning(
                "attention=%r differs from the %r the compiled graphs in this process were "
                "traced under: dropping torch.compile's caches, the next calls compile again",
                attention,
                _COMPILED_UNDER,
            )
            torch._dynamo.reset()
        _COMPILED_UNDER = attention


def scoring_forward(
    model: nn.Module, device: torch.device, compile: bool | str = False, attention: str = "auto"
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``images -> (scores, maps)`` in fp32 through ``model``, optionally ``torch.compile``d
    (``compile`` True or a mode name; the first call compiles), every call under
    :func:`attention_kernels` ``(attention)`` (compiled: see :func:`_compiled_attention`).

    With a CUDA-graph mode (``"reduce-overhead"``, ``"max-autotune"``) on CUDA the outputs are
    copied out of the graph's memory pool: the next call would overwrite them, and the
    predict/evaluate pipelines launch batch k+1 before they read batch k.

    A batch that runs out of device memory is run again in halves, and later batches in
    parts of the size that fit (with one warning per size): a long ``predict`` or
    ``evaluate`` keeps going where another process took some of the GPU, or where a batch
    of large inputs does not fit (:func:`is_out_of_memory`: on the CPU too). Each image's
    results do not depend on the batch it is in — except with the reference's batch-wide
    D-Attn threshold (``dattn_threshold_scope="batch"``), where such a batch raises a
    :class:`~crane.errors.CraneError` instead of being split. A single image that does not
    fit raises one naming the fixes.
    """
    mode = compile if isinstance(compile, str) else None
    check_attention(attention)
    fn = torch.compile(model, mode=mode) if compile else model
    graphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")

    cfg = getattr(model, "cfg", None)
    static_text = getattr(model, "static_text_features", None)
    if cfg is None or cfg.image_context_inference:
        static_text = None

    def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if compile:
            _compiled_attention(attention)
            if static_text is not None:
                # The static text features, computed (on a model's first call, or after its
                # prompts changed) and cached here, eagerly: inside a CUDA graph the cached
                # tensor would live in the graph's memory pool, which the next call reuses.
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    static_text()
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        # (strict fp32 held here: inside a compiled trace the model's own methods cannot
        # switch torch's global TF32 flags; entered first, its lock, held on CUDA while the
        # batch is launched, also keeps another thread's attention kernel order out)
        with strict_fp32(device), attention_kernels(attention):
            out = fn(images)
        scores, maps = out.image_scores.float(), out.anomaly_maps.float()
        return (scores.clone(), maps.clone()) if graphs else (scores, maps)

    fits: list[int] = []  # the most images per call since one ran out of memory
    # The reference's batch-wide D-Attn threshold makes each image's results depend on its
    # batch: a split would change them silently.
    whole = bool(cfg is not None and cfg.use_dattn and cfg.dattn_threshold_scope == "batch")

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = images.shape[0]
        if fits and n > fits[-1]:
            step = fits[-1]
            parts = [forward(images[i : i + step]) for i in range(0, n, step)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        try:
            return run(images)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError, the CPU allocator's error
            if not is_out_of_memory(exc):
                raise
            if n == 1:
                raise out_of_memory_error(device, images, exc) from None
            if whole:
                raise CraneError(
                    f"out of {device} memory for a batch of {n} images: {first_line(exc)}. "
                    "With the batch-wide D-Attn threshold (dattn_threshold_scope='batch') each "
                    "image's results depend on its batch, so the batch is not split: use a "
                    "smaller --batch-size, or the default per-image threshold."
                ) from None
        # (retried here, not in the handler: its traceback holds the failed call's tensors)
        fits.append(n // 2)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning(
            "out of %s memory for a batch of %d images: running %d at a time from now on "
            "(a smaller --batch-size avoids the failed try)",
            device,
            n,
            fits[-1],
        )
        return forward(images)

    return forward


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: CUDA's ``OutOfMemoryError``, or the plain
    ``RuntimeError`` torch's CPU allocator raises ("DefaultCPUAllocator: can't allocate
    memory", "... not enough memory" on Windows)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and "DefaultCPUAllocator" in text
        and ("can't allocate memory" in text or "not enough memory" in text)
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name where it has none)."""
    return (str(exc) or type(exc).__name__).splitlines()[0]


def out_of_memory_error(device: torch.device, images: torch.Tensor, exc: Exception) -> CraneError:
    """The one-paragraph error for an image that does not fit on ``device`` alone."""
    free = ""
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):
            got, total = torch.cuda.mem_get_info(device)
            free = f" ({got / 2**30:.1f} of {total / 2**30:.1f} GiB free now)"
    return CraneError(
        f"out of {device} memory for a single {images.shape[-2]}×{images.shape[-1]} image"
        f"{free}: {first_line(exc)}. Free the device of other processes, use --precision bf16 "
        "(half the weights and activations), or run on another device (--device)."
    )
