"""Tensor plumbing and the rank statistics that every ranking metric is computed from.

All ranking metrics here (AUROC, AP, F1-max, AUPRO) depend on the scores only through, for each
distinct score ``v`` held by a positive (anomalous) sample, how many positives and negatives
score ``>= v`` and ``== v``. :func:`rank_stats` computes exactly those counts from one sorted copy
of all scores plus the (few) positive scores, so no metric needs a second pass over the pixels.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

_HALF_TYPES = (torch.float16, torch.bfloat16)


def as_tensor(x: ArrayLike, device: torch.device | str | None = None) -> torch.Tensor:
    """A detached tensor view of ``x`` (NumPy arrays are wrapped without a copy)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if any(stride < 0 for stride in arr.strides):  # (flipped views: torch takes none)
            arr = np.ascontiguousarray(arr)
        with warnings.catch_warnings():
            # Read-only arrays make torch warn; nothing here writes into an input.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
    return t if device is None else t.to(device)


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype that holds scores of ``dtype`` exactly: floats as they are, integers as float64."""
    return dtype if dtype.is_floating_point else torch.float64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the ranking is computed in: half types widen (exactly) to float32."""
    dtype = storage_dtype(dtype)
    return torch.float32 if dtype in _HALF_TYPES else dtype


_EXACT_INT_LIMIT = 2**53  # float64 holds every integer of smaller magnitude exactly


def to_score_dtype(t: torch.Tensor, *, widen: bool = True) -> torch.Tensor:
    """``t`` in :func:`compute_dtype` (``widen``) or :func:`storage_dtype`; 64-bit integer
    scores of magnitude 2**53 or more are refused (float64 would merge neighbours into ties)."""
    out = t.to(compute_dtype(t.dtype) if widen else storage_dtype(t.dtype))
    if not t.is_floating_point() and t.dtype.itemsize == 8 and t.numel():
        big = float(out.abs().max())  # (after the cast: uint64 has no comparisons in torch)
        if big >= _EXACT_INT_LIMIT:
            raise ValueError(
                f"integer scores of magnitude up to {big:.4g} cannot be ranked exactly (float64 "
                "holds integers below 2**53 exactly); rescale them or pass them as floats"
            )
    return out


def score_tensor(x: ArrayLike, *, widen: bool = True) -> torch.Tensor:
    """Scores as a floating tensor in :func:`compute_dtype` (``widen``) or :func:`storage_dtype`."""
    return to_score_dtype(as_tensor(x), widen=widen)


def check_no_nan(t: torch.Tensor, name: str) -> None:
    """Reject NaN (it has no rank); infinities are fine (they sort to the ends)."""
    if t.is_floating_point() and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contain NaN")


def sorted_scores(x: torch.Tensor, *, owned: bool = False, name: str = "scores") -> torch.Tensor:
    """``x`` flattened and sorted ascending (in place if ``owned``); rejects NaN.

    NaN sorts last, so checking the last element replaces a full pass over the pixels.
    """
    s = sort_(x.reshape(-1) if owned else copy(x.reshape(-1)))
    if s.numel() and s.is_floating_point() and math.isnan(float(s[-1])):
        raise ValueError(f"{name} contain NaN")
    return s


def binary_tensor(x: ArrayLike) -> torch.Tensor:
    """Labels/masks as bool: True (anomalous) where the value is > 0.5, so bool, {0,1} and
    {0,255} inputs all work."""
    t = as_tensor(x)
    return t if t.dtype == torch.bool else t > 0.5


# Device dispatch. On CPU the O(pixels) work runs in NumPy: its SIMD sort is ~15x faster than
# torch.sort there, and its single-threaded kernels avoid torch's per-op OpenMP fork/join,
# which dominates on small CPU machines. Elsewhere (CUDA) the same steps run in torch on the
# device. Tests set ``_TORCH_ONLY`` to run the device code path on CPU.
_TORCH_ONLY = False


def use_numpy(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the NumPy (CPU) path."""
    return not _TORCH_ONLY and t.device.type == "cpu" and t.dtype not in _HALF_TYPES


def sort_(x: torch.Tensor) -> torch.Tensor:
    """Sort a contiguous 1-D tensor that the caller owns, ascending (in place on CPU)."""
    if use_numpy(x):
        x.numpy().sort()
        return x
    return torch.sort(x).values


def argsort(x: torch.Tensor) -> torch.Tensor:
    """Ascending argsort of a 1-D tensor (int64)."""
    if use_numpy(x):
        return torch.from_numpy(np.argsort(x.numpy()).astype(np.int64, copy=False))
    return torch.argsort(x)


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for a 1-D ``x`` and int64 ``index``."""
    if use_numpy(x):
        return torch.from_numpy(np.take(x.numpy(), index.numpy()))
    return x[index.to(x.device)]


def searchsorted(a: torch.Tensor, v: torch.Tensor, *, right: bool = False) -> np.ndarray:
    """Insertion points of ``v`` in the ascending 1-D ``a`` (int64 NumPy array on CPU)."""
    if use_numpy(a):
        return np.searchsorted(a.numpy(), v.cpu().numpy(), side="right" if right else "left")
    return torch.searchsorted(a, v.to(a.device, a.dtype), right=right).cpu().numpy()


def copy(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that shares nothing with ``x``.

    torch on every device: on CPU its allocator skips the huge-page advice NumPy gives large
    arrays, which made first-touch page faults cost about twice as much here.
    """
    return x.clone(memory_format=torch.contiguous_format)


def concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate 1-D tensors; a single part is returned as it is (callers own their parts)."""
    if len(parts) == 1:
        return parts[0]
    if all(use_numpy(p) for p in parts) and len({p.dtype for p in parts}) == 1:
        return torch.from_numpy(np.concatenate([p.numpy() for p in parts]))
    return torch.cat(parts)


def group_sorted(
    x: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Distinct values of an ascending 1-D tensor, their counts and summed ``weights``.

    Returns NumPy arrays on CPU (one entry per distinct value).
    """
    if use_numpy(x):
        a = x.numpy()
        starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]]) if a.size else np.zeros(0, int)
        counts = np.diff(np.r_[starts, a.size]).astype(np.int64)
        w = None
        if weights is not None:
            w = np.add.reduceat(weights.numpy(), starts) if a.size else np.zeros(0)
        return a[starts], counts, w
    values, counts = torch.unique_consecutive(x, return_counts=True)
    w = None
    if weights is not None:
        group = torch.repeat_interleave(torch.arange(values.numel(), device=x.device), counts)
        w_t = torch.zeros(values.numel(), dtype=torch.float64, device=x.device)
        w = w_t.index_add_(0, group, weights.to(x.device, torch.float64)).cpu().numpy()
    return values.cpu().numpy(), counts.cpu().numpy().astype(np.int64), w


def min_max(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty tensor; NaN if it holds NaN."""
    if use_numpy(x):
        a = x.numpy()
        return float(a.min()), float(a.max())
    lo, hi = torch.aminmax(x)
    return float(lo), float(hi)


def add_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += x`` in place."""
    if use_numpy(acc):
        np.add(acc.numpy(), x.numpy(), out=acc.numpy())
    else:
        acc += x


def bincount(
    index: torch.Tensor, num_bins: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Counts (int64) or summed weights (float64) per bin; stays on the index's device."""
    if use_numpy(index):
        w = None if weights is None else weights.numpy()
        return torch.from_numpy(np.bincount(index.numpy(), w, minlength=num_bins))
    return torch.bincount(index, weights, minlength=num_bins)


def suffix_sum(x: np.ndarray) -> np.ndarray:
    """``out[i] = x[i:].sum()``."""
    return np.cumsum(x[::-1])[::-1]


@dataclass(frozen=True)
class RankStats:
    """Counts at each distinct positive score (ascending) -- all that ranking metrics need.

    NumPy arrays on CPU: they have one entry per distinct positive score, so the finishing
    arithmetic is cheap wherever the pixels were; the work that scales with the pixel count
    (sorting, binary searches, grouping) runs where the scores are.
    ``weight`` is the summed per-sample weight of the positives at each value (AUPRO weighs an
    anomalous pixel by 1 / area of its region); ``None`` when unweighted.
    """

    pos: np.ndarray  # int64 (U,): positives scoring == value
    neg_ge: np.ndarray  # int64 (U,): negatives scoring >= value
    neg_eq: np.ndarray  # int64 (U,): negatives scoring == value
    weight: np.ndarray | None  # float64 (U,)
    values: np.ndarray  # distinct positive scores (U,), ascending
    n_pos: int
    n_neg: int

    @property
    def defined(self) -> bool:
        """Ranking metrics need both classes."""
        return self.n_pos > 0 and self.n_neg > 0


def rank_stats(
    all_sorted: torch.Tensor,
    pos_scores: torch.Tensor,
    pos_weights: torch.Tensor | None = None,
) -> RankStats:
    """Rank statistics from every score sorted ascending and the positives' scores, which must
    be among them (positives are a subset of all samples).

    Negatives are never separated out: counts over negatives are counts over all scores minus
    counts over positives, which keeps the expensive part to one sort of all scores and
    ``2U`` binary searches (``U`` = number of distinct positive scores).
    """
    n_pos = pos_scores.numel()
    n_neg = all_sorted.numel() - n_pos
    pos_scores = pos_scores.to(all_sorted.dtype)
    if pos_weights is None:
        values, pos, weight = group_sorted(sort_(copy(pos_scores)))
    else:
        order = argsort(pos_scores)
        values, pos, weight = group_sorted(
            take(pos_scores, order), take(pos_weights.to(torch.float64), order)
        )
    all_lt = searchsorted(all_sorted, torch.from_numpy(values))
    all_le = _run_ends(all_sorted, values, all_lt + pos)
    pos_lt = np.cumsum(pos) - pos
    neg_eq = (all_le - all_lt) - pos
    neg_ge = n_neg - (all_lt - pos_lt)
    return RankStats(pos, neg_ge, neg_eq, weight, values, n_pos, n_neg)


def _run_ends(
    all_sorted: torch.Tensor, values: np.ndarray, start: np.ndarray, steps: int = 8
) -> np.ndarray:
    """Index one past the last score equal to ``values`` in ``all_sorted``, from ``start``.

    The positives are part of ``all_sorted``, so the run of scores equal to a value v starts at
    all_lt(v) and ``start`` = all_lt(v) + pos(v) lies inside or just past it; the run goes on
    only where negatives tie with v. Ties are common at float32 resolution (about half of the
    positive values on 518x518 maps) but short, so a few vectorised steps forward settle nearly
    all of them far cheaper than a second binary search; the rest get one.
    """
    end = start.copy()
    n = all_sorted.numel()
    active = np.arange(values.size)
    for _ in range(steps):
        active = active[end[active] < n]
        if not active.size:
            return end
        nxt = take(all_sorted, torch.from_numpy(end[active])).cpu().numpy()
        active = active[nxt == values[active]]
        end[active] += 1
    active = active[end[active] < n]
    if active.size:
        end[active] = searchsorted(all_sorted, torch.from_numpy(values[active]), right=True)
    return end


def auroc_from_stats(st: RankStats) -> float:
    """Area under the ROC curve, ties counted as half (Mann-Whitney U)."""
    if not st.defined:
        return math.nan
    below = st.n_neg - st.neg_ge
    if 2 * st.n_pos * st.n_neg < 2**62:
        # Integer U statistic: exact, then one correctly rounded division.
        twice_u = int(np.sum(st.pos * (2 * below + st.neg_eq)))
        return twice_u / (2 * st.n_pos * st.n_neg)
    twice_u_f = float(np.sum(st.pos * (2.0 * below + st.neg_eq)))
    return twice_u_f / (2.0 * st.n_pos * st.n_neg)


def f1_max_from_stats(st: RankStats) -> float:
    """max over thresholds of 2PR/(P+R) = 2TP / (TP + FP + #positives).

    Only thresholds at positive scores can be optimal: lowering a threshold to a negative-only
    score adds false positives and no true positive, so the maximum over all distinct scores
    (what scikit-learn's curve enumerates) equals the maximum over these.
    """
    if not st.defined:
        return math.nan
    tp = suffix_sum(st.pos).astype(np.float64)
    return float(np.max(2.0 * tp / (tp + st.neg_ge + st.n_pos)))


def average_precision_from_stats(st: RankStats) -> float:
    """Step-wise AP as scikit-learn: sum over thresholds of (recall increment) x precision."""
    if not st.defined:
        return math.nan
    tp = suffix_sum(st.pos).astype(np.float64)
    with np.errstate(invalid="ignore"):  # empty groups (binned mode) have 0/0 and weight 0
        precision = np.where(st.pos > 0, tp / (tp + st.neg_ge), 0.0)
    return float(np.sum(st.pos * precision) / st.n_pos)


def pixel_inputs(
    maps: ArrayLike, masks: ArrayLike, *, widen: bool = True, masks_on_device: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate anomaly maps and masks; returns (B, H, W) scores and a bool mask on their device.

    Accepts (H, W), (B, H, W) or (B, 1, H, W), NumPy or torch. ``widen=False`` keeps half
    precision maps as they are (for compact storage). ``masks_on_device=False`` leaves the
    masks where they are (the streaming accumulator only labels them, on the CPU).
    """
    scores = score_tensor(maps, widen=widen)
    gt = binary_tensor(masks)
    scores, gt = _as_stack(scores, "anomaly maps"), _as_stack(gt, "masks")
    if scores.shape != gt.shape:
        raise ValueError(
            f"anomaly maps {tuple(scores.shape)} and masks {tuple(gt.shape)} differ in shape"
        )
    return scores, gt.to(scores.device) if masks_on_device else gt


def _as_stack(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    elif t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"{name} must be (H, W), (B, H, W) or (B, 1, H, W); got {tuple(t.shape)}")
    return t
