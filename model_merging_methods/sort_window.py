"""Which entries torch's CPU sort puts at positions [lo, hi) — and which torch.topk returns — without sorting.

mergekit's TIES / Breadcrumbs cut-offs take a window of `torch.argsort(|δ|)` (descending for the top k,
ascending for Breadcrumbs), so at a cut-off value shared by many entries (every bfloat16 task vector) the kept
ones are those the sort happens to put first. On the CPU torch sorts (value, index) pairs with libstdc++'s
`std::sort` (introsort: median-of-three pivot, unguarded Hoare partition, a final insertion sort of runs of at
most 16; heapsort past a depth of 2·⌊log₂ n⌋). That procedure is deterministic, and which entries end up in a
window depends only on the partitions of the segments that straddle the window's ends: a segment wholly inside
or outside is decided as a set, whatever its inner order. `window_keep` replays exactly those partitions in
NumPy — expected O(n) work instead of O(n log n) comparisons, 2–3× faster than the sort on large tensors.
torch.topk (largest, k·64 > n) runs `std::nth_element`, whose introselect partitions the same way down to runs of
3, following only the side that holds the k-th position: `topk_keep` replays it (SCE's selection).

It is only as right as the assumption that this torch build sorts with that algorithm (true of the Linux
wheels; not necessarily of other platforms' standard libraries), so `argsort_window_keep` checks it once per
process against `torch.sort` on tie-heavy data and uses torch's own sort when the check fails, when values are
NaN, or when the replay would need the heapsort fallback.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

INSERTION_RUN = 16   # libstdc++'s _S_threshold: runs this short are left to std::sort's final insertion sort
NTH_ELEMENT_RUN = 3  # std::nth_element's introselect insertion-sorts the last segment of at most 3


def window_keep(values: np.ndarray, lo: int, hi: int, descending: bool, overwrite: bool = False,
                run: int = INSERTION_RUN) -> Optional[np.ndarray]:
    """keep[i] = entry i lands at a position in [lo, hi) when libstdc++'s std::sort orders the flat, NaN-free
    `values` with comp(a, b) = a > b (descending) or a < b; None where the replay would reach the heapsort
    fallback. The partitions replayed: pivot = median of (first + 1, mid, last − 1) moved to first; the left
    scan stops at every x with ¬comp(x, p), the right scan at every x with ¬comp(p, x); the t-th stops are
    swapped while the left one lies before the right one; the cut is where the left scan then stops.
    The swaps are made in place (in `values` itself with overwrite): no copies beyond the scans' positions.
    `run`: segments this short are insertion-sorted (16 for std::sort; 3 for std::nth_element, whose
    introselect partitions only the side holding the n-th position — for the window [0, k) the same segments)."""
    n = values.size
    keep = np.zeros(n, dtype=bool)
    not_comp = np.less_equal if descending else np.greater_equal           # ¬comp(a, b) as a ufunc
    comp = (lambda a, b: a > b) if descending else (lambda a, b: a < b)   # noqa: E731
    v = values.reshape(-1) if overwrite else values.reshape(-1).copy()
    index = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    segments = [(0, n, 2 * (n.bit_length() - 1) if n else 0)]   # [first, last) of the sorted array, depth left
    while segments:
        first, last, depth = segments.pop()
        if last <= lo or first >= hi:
            continue                                          # wholly outside the window
        if lo <= first and last <= hi:
            keep[index[first:last]] = True                    # wholly inside: its order does not matter
            continue
        seg, seg_index = v[first:last], index[first:last]
        size = last - first
        if size <= run:                         # the insertion sort is stable: equal entries keep their order
            order = np.argsort(-seg if descending else seg, kind="stable")
            positions = np.arange(first, last)
            keep[seg_index[order][(positions >= lo) & (positions < hi)]] = True
            continue
        if depth == 0:
            return None
        a, b, c = 1, size // 2, size - 1
        if comp(seg[a], seg[b]):
            median = b if comp(seg[b], seg[c]) else (c if comp(seg[a], seg[c]) else a)
        elif comp(seg[a], seg[c]):
            median = a
        else:
            median = c if comp(seg[b], seg[c]) else b
        seg[0], seg[median] = seg[median], seg[0]
        seg_index[0], seg_index[median] = seg_index[median], seg_index[0]
        pivot = seg[0]
        left = _positions(not_comp(seg[1:], pivot), 1)            # the left scan's stops, in order
        right = _positions(not_comp(pivot, seg))[::-1]            # the right scan's (the pivot is the last)
        pairs = min(left.size, right.size)
        swaps = int(np.count_nonzero(left[:pairs] < right[:pairs]))
        # after `swaps` swaps the left scan stops at its next stop or at the last swapped-in entry
        cut = int(left[swaps]) if swaps < left.size else int(right[swaps - 1])
        if swaps and right[swaps - 1] < cut:
            cut = int(right[swaps - 1])
        moved_left, moved_right = left[:swaps], right[:swaps]
        del left, right
        held = seg[moved_left]
        seg[moved_left] = seg[moved_right]
        seg[moved_right] = held
        held = seg_index[moved_left]
        seg_index[moved_left] = seg_index[moved_right]
        seg_index[moved_right] = held
        del held, moved_left, moved_right
        segments.append((first + cut, last, depth - 1))     # (introsort recurses right, loops left)
        segments.append((first, first + cut, depth - 1))
    return keep


POSITIONS_CHUNK = 1 << 22   # entries per chunk of _positions (its int64 temporaries stay small)


def _positions(flags: np.ndarray, offset: int = 0) -> np.ndarray:
    """np.flatnonzero(flags) + offset as int32 (int64 beyond 2^31 entries), found chunk by chunk into one
    array counted first: a scan's stops over a whole tensor were int64 arrays of up to n entries."""
    out = np.empty(int(np.count_nonzero(flags)), dtype=np.int32 if flags.size + offset < 2**31 else np.int64)
    filled = 0
    for start in range(0, flags.size, POSITIONS_CHUNK):
        found = np.flatnonzero(flags[start:start + POSITIONS_CHUNK])
        out[filled:filled + found.size] = found + (start + offset)
        filled += found.size
    return out


def _tie_heavy_samples(seed: int):
    """Small vectors full of ties (bfloat16-rounded, rounded to thirds, all zero) for the self-checks."""
    generator = torch.Generator().manual_seed(seed)
    for trial in range(24):
        n = [40, 1000, 4099][trial % 3]
        x = torch.randn(n, generator=generator) * 1e-2
        yield [x.bfloat16().float().abs(), torch.round(x * 300).abs() / 300, torch.zeros(n)][trial // 8]


def _same_entries(got: Optional[np.ndarray], chosen: torch.Tensor, n: int) -> bool:
    expected = np.zeros(n, dtype=bool)
    expected[chosen.numpy()] = True
    return got is not None and np.array_equal(got, expected)


@functools.lru_cache(maxsize=1)
def replay_matches_torch() -> bool:
    """Whether this torch build's CPU sort is the one window_keep replays: compared once per process on
    tie-heavy data, both directions, several windows."""
    for x in _tie_heavy_samples(0):
        n = x.numel()
        for descending in (True, False):
            order = torch.sort(x, descending=descending).indices
            for lo, hi in ((0, n // 2), (n // 5, n - n // 7)):
                if not _same_entries(window_keep(x.numpy(), lo, hi, descending), order[lo:hi], n):
                    return False
    return True


@functools.lru_cache(maxsize=1)
def topk_replay_matches_torch() -> bool:
    """Whether torch.topk(largest) on this build's CPU keeps what window_keep(run=3) replays of
    std::nth_element (it does where k·64 > n; below that topk uses a heap and is not replayed)."""
    for x in _tie_heavy_samples(1):
        n = x.numel()
        for k in (n // 3, n // 2, n - 1, n):           # (k·64 > n: the nth_element path)
            chosen = torch.topk(x, k, largest=True).indices
            if not _same_entries(window_keep(x.numpy(), 0, k, True, run=NTH_ELEMENT_RUN), chosen, n):
                return False
    return True


def topk_keep(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (values' shape) of the k entries torch.topk(values.view(-1), k, largest=True) returns on
    this device: on the CPU, where topk runs std::nth_element (k·64 > n), the replay (the same entries,
    checked once per process); torch.topk itself otherwise, for NaN, or at introselect's heap depth."""
    flat = values.reshape(-1)
    if flat.device.type == "cpu" and 0 < k and k * 64 > flat.numel() and topk_replay_matches_torch():
        wide = flat.float().numpy() if flat.dtype != torch.float64 else flat.numpy()
        if not np.isnan(wide).any():
            keep = window_keep(wide, 0, k, True, overwrite=flat.dtype not in (torch.float32, torch.float64),
                               run=NTH_ELEMENT_RUN)
            if keep is not None:
                return torch.from_numpy(keep).view(values.shape)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, k, largest=True).indices] = True
    return keep.view(values.shape)


def argsort_window_keep(magnitudes: torch.Tensor, lo: int, hi: int, descending: bool,
                        owned: bool = False) -> torch.Tensor:
    """Boolean mask of the flat entries that positions [lo, hi) of torch.sort(magnitudes, descending) hold on
    this device: the replay on the CPU (same entries, checked), torch's own sort otherwise. `owned`: the caller
    hands `magnitudes` over (the replay permutes it in place)."""
    flat = magnitudes.reshape(-1)
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and replay_matches_torch():
        values = flat.contiguous().numpy()
        if not np.isnan(values).any():
            keep = window_keep(values, lo, hi, descending, overwrite=owned)
            if keep is not None:
                return torch.from_numpy(keep)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.sort(flat, descending=descending).indices[lo:hi]] = True
    return keep
