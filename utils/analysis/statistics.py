"""Statistics of one task-vector tensor δ = θ_ft − θ_base, computed in bounded memory.

Sums are accumulated in float64 over flat chunks (at most CHUNK elements converted at a time), so the
temporaries stay small whatever the tensor size. Quantiles of |δ| are exact order statistics for any
tensor size (radix select, model_merging_methods/selection.py), never torch.quantile (which refuses
tensors above 2^24 elements).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from model_merging_methods.selection import HIGH_BINS, order_statistics, select_in_high_counts

CHUNK = 1 << 22
HIST_SHIFT = 21  # |δ| histogram bins: float32 bit patterns >> 21 (shared by every tensor and model)


class AnalysisError(ValueError):
    """Bad input to the analysis: the message names the tensor, model, file or value at fault."""


class NonFiniteDelta(AnalysisError):
    """tensor_statistics met a NaN or infinite entry of δ (the caller names the model and tensor)."""


def _quantile_positions(n: int, quantiles: list[float]) -> tuple[list[tuple[int, float]], list[int]]:
    """Per quantile (⌊h⌋, h − ⌊h⌋) with h = (n − 1)·q, and the 0-based order statistics they need."""
    needed: set[int] = set()
    positions = []
    for q in quantiles:
        h = (n - 1) * q
        lower = min(int(math.floor(h)), n - 1)
        positions.append((lower, h - lower))
        needed.update({lower, min(lower + 1, n - 1)})
    return positions, sorted(needed)


def _interpolate(n: int, positions: list[tuple[int, float]], value: dict[int, float]) -> list[float]:
    return [value[lower] + fraction * (value[min(lower + 1, n - 1)] - value[lower]) if fraction else value[lower]
            for lower, fraction in positions]


def exact_quantiles(values: torch.Tensor, quantiles: list[float]) -> list[float]:
    """Quantiles of a flat, non-negative, finite tensor, linear interpolation between order statistics
    (the default of numpy.quantile and torch.quantile): h = (n − 1)·q, Q(q) = x₍⌊h⌋₎ + (h − ⌊h⌋)·(x₍⌊h⌋+1₎ − x₍⌊h⌋₎),
    x₍i₎ the i-th smallest (0-based). Exact for any size: float32 input goes through the radix select,
    float64 through torch.kthvalue."""
    n = values.numel()
    if n == 0:
        return [math.nan for _ in quantiles]
    flat = values.reshape(-1)
    positions, order = _quantile_positions(n, quantiles)
    if flat.dtype == torch.float64:
        found = [float(torch.kthvalue(flat.cpu(), i + 1).values) for i in order]
    else:
        found = order_statistics(flat, [i + 1 for i in order])
    value = dict(zip(order, found))
    return _interpolate(n, positions, value)


def histogram_edge(index: int) -> float:
    """Lower edge of histogram bin `index`: the float32 whose bit pattern is index << HIST_SHIFT."""
    return float(torch.tensor([index << HIST_SHIFT], dtype=torch.int32).view(torch.float32))


@dataclass
class Histogram:
    """Exact histogram of |δ| on float32 bit patterns: bin = bits >> HIST_SHIFT, i.e. 2^(23 − HIST_SHIFT)
    = 4 bins per power of two (edges 2^e·{1, 1.25, 1.5, 1.75}), found with one shift and one bincount.
    Exact zeros are counted apart (bin 0 would also hold subnormals)."""
    counts: dict[int, int] = field(default_factory=dict)
    zeros: int = 0

    def add(self, absolute: torch.Tensor) -> None:
        bits = absolute.to(torch.float32).contiguous().view(torch.int32)
        zeros = int((bits == 0).sum())
        self.zeros += zeros
        found = torch.bincount((bits >> HIST_SHIFT).reshape(-1).cpu(), minlength=1 << (31 - HIST_SHIFT))
        found[0] -= zeros
        self._add_found(found)

    def add_high_counts(self, high: torch.Tensor, zeros: int) -> None:
        """Add |δ| values given by the histogram of their float32 bit patterns >> 16 (HIGH_BINS int64
        counts, as the radix selection counts them) and their number of exact zeros: the same bins as
        `add`, without another pass over the values."""
        found = high.reshape(-1, 1 << (HIST_SHIFT - 16)).sum(1)
        found[0] -= zeros
        self.zeros += zeros
        self._add_found(found)

    def merge(self, other: "Histogram") -> None:
        self.zeros += other.zeros
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count

    def _add_found(self, found: torch.Tensor) -> None:
        indices = found.nonzero().reshape(-1)
        for index, count in zip(indices.tolist(), found[indices].tolist()):
            self.counts[index] = self.counts.get(index, 0) + count

    def to_json(self) -> dict:
        """Non-empty bins as [lower edge, upper edge, count], in increasing order, and the exact zeros."""
        return {"bins": [[histogram_edge(i), histogram_edge(i + 1), self.counts[i]] for i in sorted(self.counts)],
                "exact_zeros": self.zeros, "binning": "4 bins per power of two (float32 bit patterns)"}


def _chunks(tensor: torch.Tensor):
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, flat[start:start + CHUNK]


def tensor_statistics(delta: torch.Tensor, base: torch.Tensor, quantiles: list[float], rel_tol: float,
                      histogram: Histogram | None = None) -> dict:
    """Statistics of one task-vector tensor (δ in the computation dtype, θ_base of the same shape).

    numel; l2 = ‖δ‖₂; l1 = Σ|δ|; max_abs; mean; std = sample standard deviation √(Σ(δ−μ)²/(n−1));
    skewness g₁ = m₃/m₂^{3/2} and excess kurtosis g₂ = m₄/m₂² − 3 with population central moments
    m_r = Σ(δ−μ)^r/n (None when δ is constant); zero_fraction = #{δ = 0}/n; unchanged_fraction =
    #{|δ| ≤ rel_tol·|θ_base|}/n (exact zeros always count); base_l2 = ‖θ_base‖₂; relative_l2 = l2/base_l2;
    quantiles of |δ| (exact_quantiles). `histogram` receives |δ|. Raises NonFiniteDelta when δ holds a
    NaN or an infinity (found from max |δ| and Σδ, which propagate them, so no separate pass looks).
    Sums are taken per chunk of CHUNK elements in the computation dtype (torch's pairwise summation) and
    accumulated across chunks in Python floats (float64). In float32, |δ| is taken once for the whole
    tensor: one bincount of its bit patterns >> 16 serves the histogram and the radix selection of the
    quantiles (model_merging_methods/selection.py), which then only gathers the few bins it needs.
    """
    n = delta.numel()
    flat, base_flat = delta.reshape(-1), base.reshape(-1)
    radix = flat.dtype == torch.float32 and n > 0
    absolute_all = flat.abs()
    s1 = s_abs = s_sq = base_sq = 0.0
    max_abs, zeros, unchanged = 0.0, 0, 0
    for start in range(0, n, CHUNK):
        piece, absolute = flat[start:start + CHUNK], absolute_all[start:start + CHUNK]
        s1 += float(piece.sum())
        s_abs += float(absolute.sum())
        s_sq += float(torch.dot(piece, piece))
        max_abs = max(max_abs, float(absolute.max()))
        zeros += int(torch.count_nonzero(piece == 0))
        base_piece = base_flat[start:start + piece.numel()]
        piece_base_sq = float(torch.dot(base_piece, base_piece))
        base_sq += piece_base_sq
        tolerance = base_piece.abs().mul_(rel_tol)
        unchanged += int(torch.count_nonzero(absolute <= tolerance))
        if not math.isfinite(piece_base_sq):   # an exact zero beside a NaN base entry still counts as unchanged
            unchanged += int(torch.count_nonzero((piece == 0).logical_and_(tolerance.isnan())))
        if histogram is not None and not radix:
            histogram.add(absolute)
    if not (math.isfinite(max_abs) and math.isfinite(s1)):
        raise NonFiniteDelta("the task vector is not finite (NaN/Inf)")
    mean = s1 / n if n else math.nan
    m2 = m3 = m4 = 0.0
    for start in range(0, n, CHUNK):
        centred = flat[start:start + CHUNK] - mean
        squared = centred.square()
        m2 += float(squared.sum())
        m3 += float(torch.dot(squared, centred))
        m4 += float(torch.dot(squared, squared))
    variance = m2 / n if n else math.nan
    constant = n == 0 or variance <= 0.0 or variance <= (abs(mean) * 1e-12) ** 2
    base_l2 = math.sqrt(base_sq)
    if radix:
        bits = absolute_all.view(torch.int32)
        high = bits >> 16
        counts = torch.bincount(high, minlength=HIGH_BINS)
        if histogram is not None:
            histogram.add_high_counts(counts, zeros)
        positions, order = _quantile_positions(n, quantiles)
        found = select_in_high_counts(bits, high, counts, [i + 1 for i in order]) if order else []
        values = _interpolate(n, positions, dict(zip(order, found)))
    else:
        values = exact_quantiles(absolute_all, quantiles)
    return {
        "numel": n, "l2": math.sqrt(s_sq), "l1": s_abs, "max_abs": max_abs, "mean": mean,
        "std": math.sqrt(m2 / (n - 1)) if n > 1 else 0.0,
        "skewness": None if constant else (m3 / n) / variance ** 1.5,
        "excess_kurtosis": None if constant else (m4 / n) / variance ** 2 - 3.0,
        "zero_fraction": zeros / n if n else math.nan, "unchanged_fraction": unchanged / n if n else math.nan,
        "base_l2": base_l2, "relative_l2": math.sqrt(s_sq) / base_l2 if base_l2 > 0 else None,
        "quantiles": {quantile_key(q): v for q, v in zip(quantiles, values)},
    }


def quantile_key(q: float) -> str:
    return f"q{q:g}"


def pair_statistics(a: torch.Tensor, b: torch.Tensor) -> dict:
    """dot = ⟨δ_a, δ_b⟩ (float64 sums); agree = #{sign δ_a = sign δ_b ≠ 0}; both_nonzero = #{δ_a ≠ 0 ∧ δ_b ≠ 0}."""
    dot, agree, both = 0.0, 0, 0
    b_flat = b.reshape(-1)
    for start, piece in _chunks(a):
        other = b_flat[start:start + piece.numel()]
        dot += float(torch.dot(piece, other))
        product_sign = torch.sign(piece).mul_(torch.sign(other))
        agree += int(torch.count_nonzero(product_sign > 0))
        both += int(torch.count_nonzero(product_sign))
    return {"dot": dot, "agree": agree, "both_nonzero": both}


def cosine(dot: float, sq_a: float, sq_b: float) -> float | None:
    """⟨a, b⟩ / (‖a‖‖b‖), clamped to [−1, 1]; None when either vector is zero."""
    if sq_a <= 0.0 or sq_b <= 0.0:
        return None
    return max(-1.0, min(1.0, dot / math.sqrt(sq_a * sq_b)))
