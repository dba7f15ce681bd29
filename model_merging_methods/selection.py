"""Exact order statistics of |x| over a sequence of pieces: radix selection on float32 bit patterns.

For finite float32 values the bit pattern of |x| (the int32 view with the sign bit cleared) is monotone
in |x|, so the k-th smallest |x| is found by counting, without a sort and without holding the values:

1. high pass: a histogram of the high 16 bits (sign 0, 8 exponent bits, 7 mantissa bits: the bfloat16
   truncation) over every piece locates the bin b that holds the k-th smallest. The histogram also
   tells, per bin, how many entries have zero low 16 bits, i.e. equal the bin's smallest value b·2^16
   exactly (every bfloat16 value, and most deltas of two bfloat16 weights of one binade). When the
   k-th smallest is among those, it is b·2^16 and the selection ends after one pass.
2. low pass (otherwise): a histogram of the low 16 bits of the entries in bin b, over every piece again,
   locates the k-th smallest exactly.

Each pass is O(n) in piece-sized temporaries; the counts are integers, so pieces may be counted in any
order, by any thread, and cut at any boundary, with the same result. Callers that hold a whole tensor use
kth_smallest / rank_statistics / smallest_mask; callers that stream (the flag engine's TIES thresholds,
the recipes' rank cuts) hand select_streamed a way to recompute their pieces and a pool to map them on.
KeepRule states which entries a rank cut keeps, ties in flat order, so that pieces can apply it.
Values of any sign (arcee_fusion's quartiles) use signed_order_statistics (order-preserving integer keys);
magnitude_above answers torch's |x| > bound from the bit patterns (PATTERNS: each float dtype's layout).
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable

import numpy as np
import torch

HIGH_BINS = 1 << 15        # high 16 bits of a non-negative float32 (the sign bit is 0)
LOW_BINS = 1 << 16
PIECE = 1 << 20            # elements per piece when a whole tensor is split here (4 MiB of float32)
_ABS = 0x7FFFFFFF

Pieces = Callable[[], Iterable[torch.Tensor]]   # each call yields the same values again, in any cut


def as_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as 0/1 values of `dtype`, converted through uint8 (3× faster than bool → float
    on CPUs; the same values)."""
    return keep.view(torch.uint8).to(dtype)


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |values| (float32): monotone in |values| for finite (and infinite) entries."""
    return values.detach().to(torch.float32).contiguous().view(torch.int32).bitwise_and(_ABS).reshape(-1)


def high_counts(values: torch.Tensor) -> torch.Tensor:
    """The high pass over one piece: int64 counts [2·HIGH_BINS]; entry 2h counts the |x| whose high 16
    bits are h and low 16 bits 0 (|x| = h·2^16 exactly), entry 2h + 1 the other |x| of bin h."""
    if values.dtype == torch.bfloat16:   # its bits are float32's high 16: every value is exact, no float32 copy
        counts = torch.zeros(2 * HIGH_BINS, dtype=torch.int64, device=values.device)
        bits = values.detach().contiguous().view(torch.int16).reshape(-1).to(torch.int32).bitwise_and_(0x7FFF)
        counts[0::2] = torch.bincount(bits, minlength=HIGH_BINS)
        return counts
    bits = magnitude_bits(values)
    inexact = bits.bitwise_and(0xFFFF).ne_(0)
    keys = torch.add(inexact, bits.bitwise_right_shift_(16), alpha=2)
    return torch.bincount(keys, minlength=2 * HIGH_BINS)


def low_counts(values: torch.Tensor, high_bin: int) -> torch.Tensor:
    """The low pass over one piece: int64 counts [LOW_BINS] of the low 16 bits of the |x| in `high_bin`."""
    offsets = magnitude_bits(values).sub_(high_bin << 16).clamp_(-1, LOW_BINS).add_(1)
    return torch.bincount(offsets, minlength=LOW_BINS + 2)[1:LOW_BINS + 1]


class RadixSelect:
    """The k-th smallest (1-based) |x| of n streamed values: add the high_counts of every piece, then,
    while `needs_low_pass`, the low_counts(piece, high_bin) of every piece; then read `value`."""

    def __init__(self, k: int, n: int):
        if not 1 <= k <= n:
            raise ValueError(f"k = {k} is outside [1, {n}]")
        self.k, self.n = k, n
        self._high = torch.zeros(2 * HIGH_BINS, dtype=torch.int64)
        self._low: torch.Tensor | None = None
        self.high_bin: int | None = None
        self._value_bits: int | None = None

    def add_high(self, counts: torch.Tensor) -> None:
        self._high += counts

    def finish_high(self) -> None:
        """Locate the bin of the k-th smallest; afterwards either `value` is known or a low pass is due."""
        counted = int(self._high.sum())
        if counted != self.n:
            raise ValueError(f"the high pass counted {counted} values, expected {self.n}")
        cumulative = self._high.cumsum(0)
        key = int(torch.searchsorted(cumulative, self.k))  # first key whose cumulative count reaches k
        self.high_bin = key >> 1
        if key % 2 == 0:  # among the entries equal to the bin's smallest value
            self._value_bits = self.high_bin << 16
            self._less = int(cumulative[key - 1]) if key else 0
            self._equal = int(self._high[key])
        else:
            self._below = int(cumulative[key - 1]) - int(self._high[key - 1])  # entries of lower bins
            self._low = torch.zeros(LOW_BINS, dtype=torch.int64)

    @property
    def needs_low_pass(self) -> bool:
        return self._value_bits is None

    def add_low(self, counts: torch.Tensor) -> None:
        self._low += counts

    def finish_low(self) -> None:
        low_cumulative = self._low.cumsum(0)
        low_bin = int(torch.searchsorted(low_cumulative, self.k - self._below))
        self._value_bits = (self.high_bin << 16) | low_bin
        self._less = self._below + (int(low_cumulative[low_bin - 1]) if low_bin else 0)
        self._equal = int(self._low[low_bin])

    @property
    def value(self) -> float:
        if self._value_bits is None:
            raise RuntimeError("the selection is not finished")
        return float(torch.tensor([self._value_bits], dtype=torch.int32).view(torch.float32))

    @property
    def statistic(self) -> "RankStat":
        """The selected value with the number of entries strictly below it and equal to it."""
        return RankStat(self.value, self._less, self._equal)


@dataclass(frozen=True)
class RankStat:
    """An order statistic of |x|: its value, and how many entries are strictly smaller / equal to it."""

    value: float
    less: int
    equal: int


MapPieces = Callable[[Callable[[Any], Any], Callable[[Any], None]], None]


def select_streamed(selections: dict[Hashable, list[RadixSelect]], map_pieces: MapPieces,
                    values: Callable[[Any, set], dict[Hashable, torch.Tensor]]) -> None:
    """Finish every RadixSelect of `selections` (key → selections over that key's values) over streamed
    pieces: a high pass, then a low pass for the selections that need one.

    `map_pieces(work, reduce)` calls work(piece) for every piece (in any order, on any threads) and
    reduce(result) in piece order; `values(piece, keys)` gives the piece's values for each of `keys`,
    recomputed in each pass (so only a few pieces are ever held)."""
    wanted = {key for key, group in selections.items() if group}
    if not wanted:
        return

    def high(piece) -> dict:
        return {key: high_counts(value) for key, value in values(piece, wanted).items()}

    def add_high(counts: dict) -> None:
        for key, value in counts.items():
            for selection in selections[key]:
                selection.add_high(value.cpu())

    map_pieces(high, add_high)
    for key in wanted:
        for selection in selections[key]:
            selection.finish_high()
    pending = {key: [s for s in selections[key] if s.needs_low_pass] for key in wanted}
    pending = {key: group for key, group in pending.items() if group}
    if not pending:
        return

    def low(piece) -> dict:
        return {key: [low_counts(value, s.high_bin) for s in pending[key]]
                for key, value in values(piece, set(pending)).items()}

    def add_low(counts: dict) -> None:
        for key, group in counts.items():
            for selection, value in zip(pending[key], group):
                selection.add_low(value.cpu())

    map_pieces(low, add_low)
    for group in pending.values():
        for selection in group:
            selection.finish_low()


def rank_statistics_pieces(pieces: Pieces, ks: list[int], n: int) -> list[RankStat]:
    """RankStat of the k-th smallest |x| (1-based), for each k, over the n values `pieces()` yields."""
    selections = {None: [RadixSelect(k, n) for k in ks]}
    select_streamed(selections, lambda work, reduce: [reduce(work(piece)) for piece in pieces()],
                    lambda piece, keys: {None: piece})
    return [selection.statistic for selection in selections[None]]


def rank_statistics(values: torch.Tensor, ks: list[int]) -> list[RankStat]:
    """RankStat of the k-th smallest |x| (1-based) of a whole tensor, for each k (radix selection)."""
    return rank_statistics_pieces(pieces_of(values), ks, values.numel())


@dataclass(frozen=True)
class TieWindow:
    """Of the entries with |x| == value, keep those whose tie index (how many entries with |x| == value
    come before it in flat order) lies in [start, stop)."""

    value: float
    start: int
    stop: int


@dataclass(frozen=True)
class KeepRule:
    """Which entries a rank-based cut keeps, stated so that flat pieces can apply it one at a time:
    entries with low < |x| < high, plus the tie windows. A stable sort puts equal values in flat order,
    so "the first r of the entries equal to the cut-off" is a window [0, r) — the same entries on every
    machine, and the same whether the tensor is held whole or streamed (pieces pass the number of
    entries equal to each window value in the pieces before them)."""

    low: float
    high: float
    windows: tuple[TieWindow, ...] = ()

    def mask_of(self, values: torch.Tensor,
                tie_offsets: Callable[[list[int]], list[int]] | None = None) -> torch.Tensor:
        """mask(|values|): on the CPU, bfloat16 values are compared by bit pattern, without a float32 copy."""
        if values.device.type == "cpu" and values.dtype == torch.bfloat16:
            return self.mask(values, tie_offsets)
        return self.mask(values.abs().float(), tie_offsets)

    def mask(self, magnitudes: torch.Tensor,
             tie_offsets: Callable[[list[int]], list[int]] | None = None) -> torch.Tensor:
        """Boolean keep-mask of one piece of |x| (float32). A streamed piece passes `tie_offsets`: called
        with this piece's count of entries equal to each window value, it returns the counts of the
        earlier pieces (the whole tensor: None, i.e. zeros). Scratch beyond the mask is proportional to
        the number of ties."""
        if magnitudes.device.type == "cpu" and magnitudes.dtype == torch.float32:
            # the same comparisons in NumPy (float32 against the bound rounded to float32, as torch compares
            # with a Python float): torch's boolean ops cost ~10× more on CPUs
            values = magnitudes.detach().contiguous().view(-1).numpy()
            compare = lambda op, bound: op(values, np.float32(bound))  # noqa: E731
            count_true, positions_of = np.count_nonzero, np.flatnonzero
            wrap = lambda keep: torch.from_numpy(keep).view(magnitudes.shape)  # noqa: E731
        elif magnitudes.device.type == "cpu" and magnitudes.dtype == torch.bfloat16:
            # bfloat16: the comparisons on the bit patterns of |x| (the sign bit cleared, so x itself may be
            # passed), 2 bytes an entry and no float32 copy (_bfloat16_compare)
            values = magnitudes.detach().contiguous().view(torch.int16).view(-1).numpy().view(np.uint16) & 0x7FFF
            compare = lambda op, bound: _bfloat16_compare(values, op, bound)  # noqa: E731
            count_true, positions_of = np.count_nonzero, np.flatnonzero
            wrap = lambda keep: torch.from_numpy(keep).view(magnitudes.shape)  # noqa: E731
        else:
            values = magnitudes
            compare = lambda op, bound: op(values, bound).view(-1)  # noqa: E731
            count_true, positions_of = torch.count_nonzero, lambda tie: torch.nonzero(tie).squeeze(1)  # noqa: E731
            wrap = lambda keep: keep.view(magnitudes.shape)  # noqa: E731
        ties = [compare(operator.eq, window.value) for window in self.windows]
        counts = [int(count_true(tie)) for tie in ties]
        offsets = tie_offsets(counts) if tie_offsets is not None else [0] * len(self.windows)
        flat = compare(operator.gt, self.low)
        if self.high != float("inf"):
            flat &= compare(operator.lt, self.high)
        for window, tie, count, before in zip(self.windows, ties, counts, offsets):
            if before >= window.stop or window.start >= window.stop:
                continue                                  # the window was filled by earlier pieces
            if window.start <= before and before + count <= window.stop:
                flat |= tie                               # every tie of this piece is inside the window
            else:
                positions = positions_of(tie)
                first = min(max(0, window.start - before), len(positions))
                flat[positions[first:max(first, window.stop - before)]] = True
        return wrap(flat)

    @classmethod
    def nothing(cls) -> "KeepRule":
        return cls(float("inf"), float("-inf"))


# float dtype → (same-width integer dtype, NumPy unsigned view, magnitude bits, the pattern of +inf)
PATTERNS = {torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80),
             torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00),
             torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF, 0x7F800000)}


@functools.lru_cache(maxsize=64)
def _magnitude_floor(dtype: torch.dtype, bound: float) -> int:
    """The smallest magnitude pattern p of `dtype` whose value torch finds > `bound` (its own comparison of a
    one-entry tensor with the Python number, so the bound is rounded as torch rounds it), or inf's pattern
    + 1 when none is. Non-negative values are ordered as their patterns, so a binary search finds it."""
    integer, _, _, infinity = PATTERNS[dtype]

    def above(pattern: int) -> bool:
        return bool((torch.tensor([pattern], dtype=torch.int64).to(integer).view(dtype) > bound)[0])

    low, high = 0, infinity + 1          # the answer lies in [low, high]
    while low < high:
        middle = (low + high) // 2
        if above(middle):
            high = middle
        else:
            low = middle + 1
    return low


def magnitude_above(values: torch.Tensor, bound: float) -> np.ndarray:
    """|values| > bound as torch compares a bfloat16 / float16 / float32 tensor with a Python number (the
    booleans of ``values.abs() > bound``, NaN false), from the bit patterns: floor ≤ (bits & magnitude) ≤
    inf's pattern, as one unsigned subtraction and comparison (4–6× faster than torch's comparison)."""
    integer, unsigned, magnitude, infinity = PATTERNS[values.dtype]
    floor = _magnitude_floor(values.dtype, float(bound))
    bits = values.detach().contiguous().view(integer).reshape(-1).numpy().view(unsigned)
    if floor > infinity:
        return np.zeros(bits.shape, dtype=bool)
    shifted = np.bitwise_and(bits, unsigned(magnitude))
    shifted -= unsigned(floor)                       # below the floor wraps around to large values
    return shifted <= unsigned(infinity - floor)


def _bfloat16_compare(patterns: np.ndarray, op: Callable, bound: float) -> np.ndarray:
    """op(|x|, β) for the bit patterns (uint16, sign cleared) of bfloat16 |x|, with β = bound rounded to
    float32 as torch compares: the same booleans as comparing the float32 values, except for NaN entries
    (ordered above +inf here), whose product with the mask is NaN either way. Non-negative bfloat16 values
    are ordered as their patterns; a β off the bfloat16 grid lies strictly between its truncation t to the
    high 16 bits and the next pattern, so |x| > β ⇔ p > t, |x| < β ⇔ p ≤ t and |x| = β never."""
    with np.errstate(over="ignore"):                 # (a bound beyond float32's range is ±inf, as in torch)
        beta = np.float32(bound)
    if beta < 0:                                      # (|x| ≥ 0: −inf and the other negative bounds)
        return np.full(patterns.shape, op is operator.gt)
    bits = int(beta.view(np.uint32)) & 0x7FFFFFFF     # (−0 → +0)
    high, on_grid = bits >> 16, bits & 0xFFFF == 0
    if op is operator.gt:
        return patterns > np.uint16(high)
    if op is operator.lt:
        return patterns < np.uint16(high if on_grid else high + 1)
    if op is operator.eq:
        return patterns == np.uint16(high) if on_grid else np.zeros(patterns.shape, dtype=bool)
    raise ValueError(f"unsupported comparison {op!r}")


def top_k_rule(n: int, k: int, cut: RankStat) -> KeepRule:
    """The k largest |x| as a stable descending sort takes them: every entry above the cut-off (the
    k-th largest, i.e. the (n − k + 1)-th smallest `cut`), then the first entries equal to it."""
    greater = n - cut.less - cut.equal
    return KeepRule(cut.value, float("inf"), (TieWindow(cut.value, 0, k - greater),))


def bottom_k_rule(k: int, cut: RankStat) -> KeepRule:
    """The k smallest |x| as a stable ascending sort takes them: every entry below the cut-off (the k-th
    smallest), then the first entries equal to it."""
    return KeepRule(float("-inf"), cut.value, (TieWindow(cut.value, 0, k - cut.less),))


def rank_window_rule(first: int, count: int, low: RankStat, high: RankStat) -> KeepRule:
    """Ascending positions [first, first + count) of a stable sort of |x|; `low` / `high` are the
    (first + 1)-th and (first + count)-th smallest."""
    if low.value == high.value:
        return KeepRule(low.value, low.value, (TieWindow(low.value, first - low.less, first + count - low.less),))
    return KeepRule(low.value, high.value, (TieWindow(low.value, first - low.less, low.equal),
                                            TieWindow(high.value, 0, first + count - high.less)))


def pieces_of(values: torch.Tensor, size: int = PIECE) -> Pieces:
    """A whole tensor as a re-iterable sequence of flat pieces (views, no copy when contiguous)."""
    flat = values.reshape(-1)
    return lambda: flat.split(size)


def kth_smallest_pieces(pieces: Pieces, k: int, n: int) -> float:
    """The k-th smallest (1-based) |x| over the n values that `pieces()` yields, in one or two passes."""
    return rank_statistics_pieces(pieces, [k], n)[0].value


def kth_smallest(values: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) |x| of a finite float tensor (of its values when they are non-negative)."""
    return kth_smallest_pieces(pieces_of(values), k, values.numel())


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest (1-based) |x|: the (n − k + 1)-th smallest."""
    return kth_smallest(values, values.numel() - k + 1)


def count_below(values: torch.Tensor, threshold: float) -> int:
    """Number of entries with |x| < threshold (float32 comparison)."""
    return sum(int(torch.count_nonzero(piece.abs() < threshold)) for piece in pieces_of(values)())


def count_at_least(values: torch.Tensor, threshold: float) -> int:
    """Number of entries with |x| ≥ threshold (float32 comparison): the entries a trim at `threshold` keeps."""
    return values.numel() - count_below(values, threshold)


def smallest_mask(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask marking exactly `count` entries of smallest magnitude (`magnitudes` ≥ 0, e.g. |x|).

    Entries equal to the threshold (the count-th smallest) are taken in flat index order, so the count
    is exact even with ties."""
    flat = magnitudes.reshape(-1)
    if count <= 0:
        return torch.zeros_like(flat, dtype=torch.bool).view(magnitudes.shape)
    if count >= flat.numel():
        return torch.ones_like(flat, dtype=torch.bool).view(magnitudes.shape)
    return bottom_k_rule(count, rank_statistics(flat, [count])[0]).mask(flat).view(magnitudes.shape)


def order_statistics(values: torch.Tensor, ks: list[int]) -> list[float]:
    """The k-th smallest (1-based) of a flat, non-negative, finite float32 tensor, for every k in `ks`.

    kth_smallest for several k at once: one histogram of the high 16 bits locates every k's high bin,
    then one more pass gathers the entries of those few bins, whose low-16-bit histograms finish the
    job. Exact for any size (no sort)."""
    n = values.numel()
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k = {k} is outside [1, {n}]")
    bits = values.detach().to(torch.float32).contiguous().view(torch.int32).reshape(-1)
    high = bits >> 16
    return select_in_high_counts(bits, high, torch.bincount(high, minlength=1 << 15), ks)


def signed_order_statistics(values: torch.Tensor, ks: list[int]) -> list[float]:
    """The k-th smallest (1-based) of a finite float tensor of any sign, for every k in `ks`, exactly, without
    a sort: signed_order_statistics_pieces over the tensor's flat pieces."""
    flat = values.detach().reshape(-1)
    return signed_order_statistics_pieces(lambda: flat.split(PIECE), ks, flat.numel(), flat.dtype)


def signed_order_statistics_pieces(pieces: Pieces, ks: list[int], n: int, dtype: torch.dtype) -> list[float]:
    """The k-th smallest (1-based), for every k in `ks`, of the n values of `dtype` that `pieces()` yields (the
    same values on every call, in any cut), exactly, without a sort: radix selection on integer keys whose
    order is the values' order (−0 just below +0).

    bfloat16 / float16: key = bits ^ 0x8000 for a non-negative value, ~bits for a negative one (16-bit
    patterns), one histogram of 2^16 keys (one pass). float32 (and any other dtype, as float32): s = bits for
    a non-negative value, bits ^ 0x7FFFFFFF for a negative one (monotone as int32); a histogram of s's high
    16 bits, then the low 16 bits of the entries in the few high bins the ks fall in (two passes)."""
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k = {k} is outside [1, {n}]")
    narrow = dtype in (torch.bfloat16, torch.float16)

    def keys(piece: torch.Tensor) -> torch.Tensor:
        if narrow:
            bits = piece.detach().contiguous().view(torch.int16).to(torch.int32)       # sign-extended
            return bits.bitwise_xor_(bits.bitwise_right_shift(15).bitwise_or_(0x8000))
        bits = piece.detach().to(torch.float32).contiguous().view(torch.int32).clone()
        return bits.bitwise_xor_(bits.bitwise_right_shift(31).bitwise_and_(0x7FFFFFFF))

    counts = torch.zeros(1 << 16, dtype=torch.int64)
    for piece in pieces():
        key = keys(piece)
        counts += torch.bincount(key if narrow else key.bitwise_right_shift_(16).add_(1 << 15), minlength=1 << 16).cpu()
    cumulative = counts.cumsum(0)
    found = torch.searchsorted(cumulative, torch.tensor(ks, dtype=cumulative.dtype)).tolist()
    if narrow:
        patterns = [key ^ 0x8000 if key >= 0x8000 else ~key for key in found]
        return torch.tensor(patterns, dtype=torch.int16).view(dtype).tolist()
    low = {high: torch.zeros(1 << 16, dtype=torch.int64) for high in set(found)}
    for piece in pieces():
        key = keys(piece)
        high = key.bitwise_right_shift(16).add_(1 << 15)
        for high_bin, histogram in low.items():
            histogram += torch.bincount(key[high == high_bin].bitwise_and_(0xFFFF), minlength=1 << 16).cpu()
    results = []
    for k, high_bin in zip(ks, found):
        below = int(cumulative[high_bin - 1]) if high_bin else 0
        low_bin = int(torch.searchsorted(low[high_bin].cumsum(0), k - below))
        key = ((high_bin - (1 << 15)) << 16) | low_bin          # s as a Python int (negative below +0)
        results.append(key if key >= 0 else key ^ 0x7FFFFFFF)
    return torch.tensor(results, dtype=torch.int32).view(torch.float32).tolist()


def select_in_high_counts(bits: torch.Tensor, high: torch.Tensor, counts: torch.Tensor, ks: list[int]) -> list[float]:
    """order_statistics from its first pass, done by the caller: `bits` the int32 patterns of the
    non-negative float32 values, `high` = bits >> 16 and `counts` = bincount(high, minlength=2^15) (a caller
    that needs that histogram for itself, as the task-vector analysis does, counts once)."""
    cumulative = counts.cumsum(0)
    positions = torch.searchsorted(cumulative, torch.tensor(ks, dtype=cumulative.dtype, device=bits.device))
    distinct = sorted(set(positions.tolist()))
    if len(distinct) <= 8:   # a few comparisons cost less than one table lookup per entry (3x, measured)
        selected = high == distinct[0]
        for high_bin in distinct[1:]:
            selected.logical_or_(high == high_bin)
    else:
        wanted = torch.zeros(1 << 15, dtype=torch.bool, device=bits.device)
        wanted[positions] = True
        selected = wanted[high]  # a table lookup: much faster than torch.isin
    selected_high, selected_low = high[selected], bits[selected] & 0xFFFF
    results = []
    for k, high_bin in zip(ks, positions.tolist()):
        below = int(cumulative[high_bin - 1]) if high_bin > 0 else 0
        low_cumulative = torch.bincount(selected_low[selected_high == high_bin], minlength=1 << 16).cumsum(0)
        low_bin = int(torch.searchsorted(low_cumulative, k - below))
        pattern = torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32)
        results.append(float(pattern.view(torch.float32)))
    return results
