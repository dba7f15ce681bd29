"""Merge methods with mergekit's semantics (mergekit 0.1.5), for recipes that name them.

A recipe's `merge_method: ties` is a contract with the recipe's author: it means mergekit's TIES
(normalisation by the sum of agreeing weights, magnitude top-k by torch's argsort, compute in the
load dtype), not the paper's `ties_merging`. These functions implement that contract from the formulas
in the project's mergekit notes; they are our own code, not mergekit's.

Every function merges ONE output tensor: `tensors` maps an input id (a model reference, in recipe
order) to that input's tensor, already cast to the compute dtype; `base` is the base input's id (or
None); `params` are the resolved global values and `per_input[id]` the resolved per-input values.
Randomised methods (dare_*, della*) draw their masks from `slots[id]` (model_merging_methods/randomness.py:
the draw depends only on seed, input position and tensor name), so masks differ from mergekit's
global-RNG draws by design; the deterministic ones reproduce mergekit's arithmetic operation by
operation (same dtypes, same reduction order), i.e. the same bits on the same torch.

One choice is ours: which of the entries tied at a rank cut-off (TIES' k-th largest |δ|, Breadcrumbs'
window ends) are kept. mergekit takes torch.argsort's order, which torch leaves unspecified for equal
values: on CUDA (more than 32 entries) the sort is stable, so the first ties in flat order are kept; on
the CPU it is an introsort whose order depends on the whole tensor. The default, tie_order "argsort",
makes mergekit's own call (torch.argsort on the whole tensor, on the merge's device): mergekit's tensors bit for
bit, at the cost of holding the tensor and an 8-byte index per element. tie_order "index" keeps the first
ties in flat order (a stable sort, mergekit on CUDA) and lets a tensor stream in pieces (selection.KeepRule).
Only entries equal to the cut-off can differ between the two.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from .options import DEFAULT_TIE_ORDER, REQUIRED, MergeError, MethodParameter
from .randomness import RandomSlot
from .selection import KeepRule, as_mask, RankStat, pieces_of, rank_statistics, rank_window_rule, top_k_rule
from .sort_window import argsort_window_keep

RecipeParameter = MethodParameter   # the parameter declaration lives in options.py (the registry loads without torch)


@dataclass(frozen=True)
class TensorGroupCall:
    """One output tensor's inputs and resolved parameters."""

    tensors: dict[str, torch.Tensor]            # input id → tensor, in recipe order
    base: str | None
    params: dict[str, Any] = field(default_factory=dict)
    per_input: dict[str, dict[str, Any]] = field(default_factory=dict)
    slots: dict[str, RandomSlot] = field(default_factory=dict)
    tie_order: str = DEFAULT_TIE_ORDER   # options.TIE_ORDERS (see the module docstring)
    # a streamed piece: per non-base input, its sparsification prepared from whole-tensor statistics
    piece_sparsifiers: Optional[dict[str, Callable[[torch.Tensor], torch.Tensor]]] = None
    piece_coefficients: Optional[tuple[torch.Tensor, torch.Tensor]] = None   # a streamed slerp piece
    # layer-aware methods (LiNeS): the output tensor's name, block index (None: outside the blocks), depth
    name: str = ""
    layer: Optional[int] = None
    num_layers: int = 1

    @property
    def non_base(self) -> list[str]:
        return [key for key in self.tensors if key != self.base]

    def values(self, name: str, keys: list[str]) -> list[Any]:
        return [self.per_input[key][name] for key in keys]


# ----------------------------------------------------------------------------------------------
# linear, slerp: fp32 (fp64 for fp64 inputs) accumulation, result in the input dtype


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch (and mergekit's float32 scratch) accumulates `dtype` values in: float64 for float64,
    else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


WIDEN_CHUNK = 1 << 16   # entries per chunk of add_widened's conversion (a 256 KiB float32 temporary)


def add_widened(total: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """total += term for a wider `total` (float32 accumulator, bfloat16 / float16 term): the term is converted
    to total's dtype chunk by chunk and added, the bits of torch's mixed-dtype in-place add (every value is
    widened exactly first) at a quarter of its time on CPUs, with a chunk-sized temporary."""
    narrower = term.dtype.is_floating_point and term.dtype.itemsize < total.dtype.itemsize   # (exact widening)
    if not narrower or total.device.type != "cpu" or not total.is_contiguous() or term.shape != total.shape:
        return total.add_(term)
    flat_total, flat_term = total.view(-1), term.reshape(-1)
    for start in range(0, flat_total.numel(), WIDEN_CHUNK):
        flat_total[start:start + WIDEN_CHUNK] += flat_term[start:start + WIDEN_CHUNK].to(total.dtype)
    return total


CHUNK = 1 << 20   # elements per float32 scratch chunk (mergekit's slerp chunk; elementwise results do not depend on it)


def linear_tensor(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """y = Σ w_i x_i (/ Σ w_i when normalize), accumulated in float32 in input order, cast back.

    No guard against Σ w_i = 0 (as mergekit). Computed in flat chunks: float32 scratch stays small."""
    first = tensors[0]
    acc_dtype = accumulator_dtype(first.dtype)
    w = torch.tensor(weights, dtype=acc_dtype)
    coefficients = w.unbind(0)
    total = w.sum()
    flats = [t.reshape(-1) for t in tensors]
    out = torch.empty(first.numel(), dtype=first.dtype, device=first.device)
    for start in range(0, first.numel(), CHUNK):
        stop = start + CHUNK
        result = torch.zeros(flats[0][start:stop].shape, dtype=acc_dtype, device=first.device)
        for flat, coefficient in zip(flats, coefficients):
            result.addcmul_(flat[start:stop].to(acc_dtype), coefficient)  # upcast first: same bits, 2x faster
        if normalize:
            result.div_(total)
        out[start:stop] = result
    return out.reshape(first.shape)


def linear(call: TensorGroupCall) -> torch.Tensor:
    keys = list(call.tensors)
    return linear_tensor([call.tensors[k] for k in keys], call.values("weight", keys), call.params["normalize"])


SLERP_DOT_THRESHOLD = 0.9995


def slerp_chunk_norms(a: torch.Tensor, b: torch.Tensor) -> tuple[list[float], list[float]]:
    """‖·‖ of each 2^20-element chunk of the flattened a and b (computed in float32; float64 for float64),
    in order, as Python floats (exact: a streamed run keeps them, and 0-dim tensors kept between large
    temporaries fragment the heap)."""
    dtype = accumulator_dtype(a.dtype)
    x, y = a.reshape(-1), b.reshape(-1)
    starts = range(0, x.numel(), CHUNK)
    return ([float(torch.linalg.vector_norm(x[s:s + CHUNK].to(dtype))) for s in starts],
            [float(torch.linalg.vector_norm(y[s:s + CHUNK].to(dtype))) for s in starts])


def slerp_norm(chunk_norms: list[float], dtype: torch.dtype, eps: float = 1e-8) -> torch.Tensor:
    """The norm of the chunks' norms (mergekit's reduction order); a norm ≤ eps counts as 1."""
    norm = torch.linalg.vector_norm(torch.tensor(chunk_norms, dtype=dtype))
    return torch.where(norm > eps, norm, 1)


def slerp_chunk_dots(a: torch.Tensor, b: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> list[float]:
    """⟨a_c/‖a‖, b_c/‖b‖⟩ of each 2^20-element chunk c, in order (Python floats, exact)."""
    dtype = accumulator_dtype(a.dtype)
    x, y = a.reshape(-1), b.reshape(-1)
    return [float(((x[s:s + CHUNK].to(dtype) / norm_a) * (y[s:s + CHUNK].to(dtype) / norm_b)).sum())
            for s in range(0, x.numel(), CHUNK)]


def slerp_coefficients(chunk_dots: list[float], t: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """d = clamp(Σ chunk dots, −1, 1); |d| > 0.9995 → (1−t, t), else (sin((1−t)θ)/sin θ, sin(tθ)/sin θ), θ = acos d."""
    t_ = torch.tensor(t, dtype=dtype)
    dot = torch.tensor(chunk_dots, dtype=dtype).sum().clamp(-1, 1)
    if bool(dot.abs() > SLERP_DOT_THRESHOLD):
        return 1 - t_, t_
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t_) * theta) / sin_theta, torch.sin(t_ * theta) / sin_theta


def slerp_apply(a: torch.Tensor, b: torch.Tensor, coef_a: torch.Tensor, coef_b: torch.Tensor) -> torch.Tensor:
    """coef_a·a + coef_b·b, chunk by chunk in the accumulation dtype (elementwise: any flat piece of a, b)."""
    dtype = accumulator_dtype(a.dtype)
    x, y = a.reshape(-1), b.reshape(-1)
    out = torch.empty_like(x)
    for s in range(0, x.numel(), CHUNK):
        out[s:s + CHUNK] = coef_a * x[s:s + CHUNK].to(dtype) + coef_b * y[s:s + CHUNK].to(dtype)
    return out.reshape(a.shape)


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's slerp of whole tensors, computed in float32: norms ≤ eps count as 1,
    d = clamp(⟨a/‖a‖, b/‖b‖⟩, −1, 1); |d| > 0.9995 → (1−t)a + tb, else
    sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b with θ = acos d (unnormalised a, b). t = 0 gives a.

    Norms and the dot product are reduced over chunks of 2^20 elements exactly as mergekit does (the norm
    of the chunks' norms; the sum of the chunks' dots), so large tensors round the same way; the streamed
    form (utils/engine/statistics.py) computes the same chunk values piece by piece."""
    dtype = accumulator_dtype(a.dtype)
    if a.numel() == 0:
        t_ = torch.tensor(t, dtype=dtype)
        return ((1 - t_) * a.reshape(-1).to(dtype) + t_ * b.reshape(-1).to(dtype)).reshape(a.shape).to(a.dtype)
    norms_a, norms_b = slerp_chunk_norms(a, b)
    dots = slerp_chunk_dots(a, b, slerp_norm(norms_a, dtype, eps), slerp_norm(norms_b, dtype, eps))
    return slerp_apply(a, b, *slerp_coefficients(dots, t, dtype))


def slerp(call: TensorGroupCall) -> torch.Tensor:
    other = call.non_base[0]
    if call.piece_coefficients is not None:       # a streamed piece: coefficients from the whole tensor
        return slerp_apply(call.tensors[call.base], call.tensors[other], *call.piece_coefficients)
    return slerp_tensor(call.tensors[call.base], call.tensors[other], call.params["t"])


# ----------------------------------------------------------------------------------------------
# generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*): in the compute dtype


def abs_sum(piece: torch.Tensor) -> float:
    """Σ|x| of one flat piece, accumulated in float64. On the CPU NumPy's pairwise float64 sum of the
    float32 values: torch's float64-accumulated sum of a bfloat16 / float32 tensor is ~3× slower (it was
    a seventh of a dare_ties merge). The two agree wherever the sum is exact (bfloat16 task vectors: a few
    dozen bits) and otherwise round differently in the last bit, which the L1 rescale factor (rounded to
    the tensor's dtype) does not see."""
    if piece.device.type != "cpu":
        return float(piece.abs().sum(dtype=torch.float64))
    return float(_abs_values(piece).sum(dtype=np.float64))


def _abs_values(piece: torch.Tensor) -> np.ndarray:
    """|x| of a CPU piece as a flat NumPy array: float64 for float64, float32 otherwise (exact), a new array."""
    values = piece.reshape(-1)
    values = values if values.dtype == torch.float64 else values.float()
    return np.abs(values.numpy())


def l1_norm(values: torch.Tensor) -> float:
    """Σ|x|, accumulated in float64 (abs_sum) over flat 2^20-element pieces in order (so a streamed tensor,
    whose pieces are the same, gets the same sum)."""
    return sum(abs_sum(piece) for piece in pieces_of(values)())


def rescale_factor(before: float, after: float, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """mergekit's L1 rescale Σ|δ| / Σ|δ ⊙ m| as a 0-dim tensor of `dtype` (both sums rounded to it first);
    None (no rescale) when either rounded sum is < 1e-7."""
    before_t, after_t = torch.tensor(before, dtype=dtype), torch.tensor(after, dtype=dtype)
    if before_t < 1e-7 or after_t < 1e-7:
        return None
    return before_t / after_t


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool, mergekit_sums: bool = False) -> torch.Tensor:
    """δ ⊙ m, times Σ|δ| / Σ|δ ⊙ m| when rescaling (skipped when either sum is < 1e-7).

    mergekit_sums (the whole-tensor "argsort" cuts): the sums are mergekit's own calls, torch.sum in the
    tensor's dtype on the whole tensor, so the factor is mergekit's to the bit (torch splits a sum over
    > 32768 entries across intra-op threads; the executors run one). Otherwise (cuts that stream, random
    masks) the sums are float64 over flat pieces (l1_norm), which a streamed tensor reproduces exactly; the
    factor can then differ from mergekit's in its last bit."""
    masked = delta * mask
    if not rescale:
        return masked
    if mergekit_sums:
        before, after = delta.abs().sum(), masked.abs().sum()
        return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)
    factor = rescale_factor(l1_norm(delta), l1_norm(masked), delta.dtype)
    return masked if factor is None else masked * factor


def _sorted_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """What mergekit's rank cuts sort: |δ| flat, in float32 on the CPU (a new tensor)."""
    magnitudes = delta.abs().reshape(-1)
    return magnitudes.float() if magnitudes.device.type == "cpu" else magnitudes


@dataclass(frozen=True)
class RankCut:
    """A sparsifier that keeps entries by the rank of |δ| in the whole tensor.

    magnitude (TIES): the k = max(1, int(density·n)) largest; outliers (Model Breadcrumbs): keep =
    int(density·n), top = int(gamma·n), bottom = max(0, n − keep − top), ascending positions
    [bottom, bottom + keep) (drops the smallest and the largest). `ranks(n)` are the order statistics
    (1-based, ascending) it needs; `rule(n, stats)` turns them into a KeepRule (ties in flat order)."""

    kind: str              # "magnitude" | "outliers"
    density: float
    gamma: float = 0.0

    def ranks(self, n: int) -> list[int]:
        if self.kind == "magnitude":
            return [n - max(1, int(self.density * n)) + 1] if self.density > 0 else []
        bottom, keep = self._window(n)
        return [bottom + 1, bottom + keep] if keep else []

    def rule(self, n: int, stats: list[RankStat]) -> KeepRule:
        if self.kind == "magnitude":
            return top_k_rule(n, max(1, int(self.density * n)), stats[0]) if self.density > 0 else KeepRule.nothing()
        bottom, keep = self._window(n)
        return rank_window_rule(bottom, keep, *stats) if keep else KeepRule.nothing()

    def _window(self, n: int) -> tuple[int, int]:
        keep, top = int(self.density * n), int(self.gamma * n)
        return max(0, n - keep - top), keep

    def argsort_order(self, delta: torch.Tensor) -> torch.Tensor:
        """torch's order of |δ|'s flat entries as mergekit calls it (tie_order "argsort"): argsort descending for
        magnitude, sort ascending for outliers, on float32 magnitudes on the CPU. It does not depend on density."""
        magnitudes = _sorted_magnitudes(delta)
        if self.kind == "magnitude":
            return torch.argsort(magnitudes, descending=True)
        return torch.sort(magnitudes, descending=False).indices

    def argsort_window(self, n: int) -> slice:
        """The positions of argsort_order this cut keeps: [0, k) for magnitude, [bottom, bottom + keep) for outliers."""
        if self.kind == "magnitude":
            return slice(0, max(1, int(self.density * n)))
        bottom, keep = self._window(n)
        return slice(bottom, bottom + keep)

    def argsort_mask(self, delta: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """The keep-mask (delta's dtype and shape) of the entries argsort_window selects from `order`."""
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        mask[order[self.argsort_window(delta.numel())]] = 1
        return mask.reshape_as(delta)

    def argsort_keep(self, delta: torch.Tensor) -> torch.Tensor:
        """argsort_mask(delta, argsort_order(delta)) — the same entries — without the sort on the CPU: the
        partitions of torch's sort that decide the window, replayed (sort_window; 2–3× faster, checked
        against torch's sort once per process, torch's own sort where that check fails)."""
        magnitudes = _sorted_magnitudes(delta)
        window = self.argsort_window(delta.numel())
        keep = argsort_window_keep(magnitudes, window.start, window.stop, descending=self.kind == "magnitude",
                                   owned=True)   # |δ| is a new tensor: the replay may permute it
        return as_mask(keep, delta.dtype).reshape_as(delta)

    def argsort_ranks(self, delta: torch.Tensor) -> torch.Tensor:
        """Each flat entry's position in argsort_order (the inverse permutation; int32 below 2^31 entries): any
        density's argsort_mask is then one comparison (rank_mask) instead of a scatter of k positions."""
        order = self.argsort_order(delta)
        dtype = torch.int32 if order.numel() < 2**31 else torch.int64
        ranks = torch.empty(order.numel(), dtype=dtype, device=order.device)
        ranks[order] = torch.arange(order.numel(), dtype=dtype, device=order.device)
        return ranks

    def rank_mask(self, delta: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """argsort_mask read from argsort_ranks: the entries whose position lies in argsort_window (the same bits)."""
        window = self.argsort_window(delta.numel())
        keep = ranks < window.stop if window.start == 0 else (ranks >= window.start) & (ranks < window.stop)
        return keep.to(delta.dtype).reshape_as(delta)

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        """The whole tensor's keep-mask (ties in flat order), by radix selection: no sort."""
        return self.rule(delta.numel(), rank_statistics(delta, self.ranks(delta.numel()))).mask_of(delta)


def sparsify_magnitude(delta: torch.Tensor, density: float, rescale: bool = False,
                       tie_order: str = DEFAULT_TIE_ORDER) -> torch.Tensor:
    """Keep the k = max(1, int(density·n)) largest |δ| of the flattened tensor (RankCut "magnitude");
    of the entries equal to the k-th largest, the first in flat order (tie_order "index") or the first
    of torch.argsort(|δ|, descending) on this device ("argsort", mergekit's own call); density ≥ 1
    returns δ, density ≤ 0 zeros."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    cut = RankCut("magnitude", density)
    if tie_order == "index":
        return _rescaled(delta, as_mask(cut.mask(delta), delta.dtype), rescale)
    return _rescaled(delta, cut.argsort_keep(delta), rescale, mergekit_sums=True)


def sparsify_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False,
                      tie_order: str = DEFAULT_TIE_ORDER) -> torch.Tensor:
    """Model Breadcrumbs (RankCut "outliers"): keep = int(density·n), top = int(gamma·n), bottom =
    max(0, n − keep − top); keep ascending positions [bottom, bottom + keep) of |δ| (drops the smallest
    and the largest), ties in flat order ("index") or in torch.sort's order ("argsort", mergekit's)."""
    if density >= 1:
        return delta
    cut = RankCut("outliers", density, gamma)
    if tie_order == "index":
        return _rescaled(delta, as_mask(cut.mask(delta), delta.dtype), rescale)
    return _rescaled(delta, cut.argsort_keep(delta), rescale, mergekit_sums=True)


def _draw_dtype(delta: torch.Tensor) -> torch.dtype:
    """mergekit draws CPU masks in float32 unless the tensor is bfloat16."""
    return delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 else torch.float32


def sparsify_random(delta: torch.Tensor, density: float, slot: RandomSlot, rescale: bool = False) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (u ~ U[0,1) from `slot`, keep iff u < density);
    rescale is mergekit's L1-norm match, not the paper's 1/density. density ≥ 1 returns δ."""
    if density >= 1:
        return delta
    work = _draw_dtype(delta)
    return _rescaled(delta.to(work), _random_mask(delta, slot, density), rescale).to(delta.dtype)


def _random_keep(delta: torch.Tensor, slot: RandomSlot, density: float) -> np.ndarray:
    """[u < density] (flat, bool) for the draws u of `slot` (delta's positions): the comparison torch makes,
    float32 draws against the density rounded to float32, made in NumPy on the generator's bits
    (RandomSlot.below; torch's boolean ops and bool → bfloat16 conversion cost ~8× more on CPUs)."""
    return slot.below(delta.numel(), density)


def _keep_to_mask(keep: np.ndarray, delta: torch.Tensor) -> torch.Tensor:
    """A flat keep array (bool, or 0/1 uint8 as np.unpackbits gives) as delta's 0/1 mask in the draw dtype."""
    return as_mask(torch.from_numpy(keep).view(delta.shape).to(delta.device), _draw_dtype(delta))


def _random_mask(delta: torch.Tensor, slot: RandomSlot, density: float) -> torch.Tensor:
    """[u < density] for the draws u of `slot` (delta's positions), in the draw dtype."""
    return _keep_to_mask(_random_keep(delta, slot, density), delta)


# the integer dtype of each float dtype's width (bit-pattern arithmetic on masks)
_SAME_WIDTH_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}


@dataclass(frozen=True)
class PieceSparsifier:
    """One input's sparsification of one flat piece of a tensor, prepared from whole-tensor statistics
    (the streamed form of sparsify_magnitude / sparsify_outliers / sparsify_random, same bits):
    `rule` (a RankCut's KeepRule) with `tie_offsets(counts)` giving, per tie window, the entries equal to
    its value in the earlier pieces; or DARE draws from `slot` (the piece's positions) at `density`.
    `factor` is the whole tensor's L1 rescale factor (rescale_factor), None for none. `packed_mask`: the
    DARE keep mask of the piece already drawn (np.packbits of it), read instead of drawing again."""

    rule: Optional[KeepRule] = None
    tie_offsets: Optional[Callable[[list[int]], list[int]]] = None
    slot: Optional[RandomSlot] = None
    density: float = 1.0
    factor: Optional[torch.Tensor] = None
    packed_mask: Optional[np.ndarray] = None

    def l1_sums(self, delta: torch.Tensor) -> tuple["PieceSparsifier", float, float]:
        """(this sparsifier carrying the piece's DARE keep mask bit-packed (n/8 bytes), Σ|δ|, Σ|δ ⊙ m|) for the
        L1 rescale: abs_sum of δ and of masked(δ) in the work dtype. The statistics pass draws the mask once and
        the merge pass reads the bits (the same mask). On the CPU both sums come from one |δ| (|δ ⊙ m| = |δ|·m
        exactly: the same values, the same NumPy sums) and the masked piece is never formed."""
        carrying, keep = self, None
        if self.slot is not None and self.packed_mask is None:
            keep = _random_keep(delta, self.slot, self.density)
            carrying = replace(self, packed_mask=np.packbits(keep))
        work = self.work_dtype(delta)
        if delta.device.type != "cpu":
            return carrying, abs_sum(delta.to(work)), abs_sum(carrying.masked(delta))
        magnitudes = _abs_values(delta.to(work))
        if self.rule is not None:
            wide = torch.from_numpy(magnitudes) if magnitudes.dtype == np.float32 else delta.abs().float()
            keep = self.rule.mask(wide.view(delta.shape), self.tie_offsets).numpy().reshape(-1)
        elif keep is None:
            keep = carrying._keep_bits(delta).view(bool)
        before = float(magnitudes.sum(dtype=np.float64))
        return carrying, before, float(np.multiply(magnitudes, keep, out=magnitudes).sum(dtype=np.float64))

    def _keep_bits(self, delta: torch.Tensor) -> np.ndarray:
        """DARE's flat keep bits of the piece (0/1 uint8): the carried ones, else drawn from `slot`."""
        if self.packed_mask is None:
            return _random_keep(delta, self.slot, self.density).view(np.uint8)
        return np.unpackbits(self.packed_mask, count=delta.numel())

    def _keep_mask(self, delta: torch.Tensor) -> torch.Tensor:
        """DARE's keep mask of the piece in the draw dtype."""
        return _keep_to_mask(self._keep_bits(delta), delta)

    def _scaled_keep_mask(self, delta: torch.Tensor) -> torch.Tensor:
        """m·f (the kept entries f, the others +0) in the draw dtype, built from f's bit pattern times the 0/1
        keep bits (an integer product: no float pass). δ·(m·f) has the bits of (δ·m)·f: δ·1·f and δ·f round
        once alike, and for f > 0 (an L1 ratio) δ·0·f and δ·(+0) are both the zero of δ's sign (NaN for ±inf
        or NaN δ)."""
        work = _draw_dtype(delta)
        integer = _SAME_WIDTH_INT[work]
        pattern = int(self.factor.to(work).view(integer))
        return torch.from_numpy(self._keep_bits(delta)).view(delta.shape).to(integer).mul_(pattern).view(work).to(delta.device)

    def masked(self, delta: torch.Tensor) -> torch.Tensor:
        """δ ⊙ m of the piece, in the dtype the rescale works in (see work_dtype)."""
        if self.rule is not None:
            return delta * as_mask(self.rule.mask_of(delta, self.tie_offsets), delta.dtype)
        return delta.to(_draw_dtype(delta)) * self._keep_mask(delta)

    def work_dtype(self, delta: torch.Tensor) -> torch.dtype:
        return delta.dtype if self.rule is not None else _draw_dtype(delta)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        if self.rule is None and self.factor is not None and self.factor > 0 and _draw_dtype(delta) in _SAME_WIDTH_INT:
            return (delta.to(_draw_dtype(delta)) * self._scaled_keep_mask(delta)).to(delta.dtype)   # one product
        masked = self.masked(delta)
        if self.factor is not None:
            masked = masked * self.factor
        return masked.to(delta.dtype)


def sparsify_della(delta: torch.Tensor, density: float, epsilon: float, slot: RandomSlot,
                   rescale: bool = False) -> torch.Tensor:
    """DELLA magnitude-ranked sampling, per row (last axis; 1-D = one row): ranks of |δ| min-max normalised
    to r ∈ [0, 1], keep probability p = density − ε + 2ε·r (u < p from `slot`); whole-tensor L1 rescale."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(f"della: density ± epsilon must lie in (0, 1); got density {density}, epsilon {epsilon}")
    work = _draw_dtype(delta)
    shape = delta.shape
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    probabilities = (density - epsilon) + rank_norm * 2 * epsilon
    draws = slot.uniform(rows.numel()).view(rows.shape).to(rows.device)
    mask = (draws < probabilities.float()).to(work)
    return _rescaled(rows.to(work), mask, rescale).to(delta.dtype).reshape(shape)


def _accumulate(terms: list[torch.Tensor]) -> torch.Tensor:
    """t_0 + t_1 + … in list order in the terms' dtype, a new tensor: sum_in_order's sum before its rounding,
    except that a sum of zeros may be −0 where that gives +0 (callers that use it say why that is harmless)."""
    total = terms[0] + terms[1] if len(terms) > 1 else terms[0].clone()
    for term in terms[2:]:
        total += term
    return total


def sum_in_order(terms: Iterable[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Σ terms (shaped like `like`) accumulated from 0 in torch's accumulation dtype for like's dtype, in
    order, one term at a time, rounded once to like's dtype: the bits of torch.stack(terms).sum(dim=0)
    (tests/test_recipe_methods.py checks it), without the stack."""
    total = torch.zeros(like.shape, dtype=accumulator_dtype(like.dtype), device=like.device)
    for term in terms:
        add_widened(total, term)
    return total.to(like.dtype)


# elements per block of elementwise cross-model arithmetic on the CPU (gta_tensor, RAM): its dozens of
# elementwise passes run on blocks that stay in cache (one 2^20-entry piece of 3 models in isolation: TIES
# election 21 → 9.5 ms, RAM 61 → 28 ms; in a whole two-worker merge the gain is mostly peak memory), with the
# same bits: every operation is per entry
ELEMENTWISE_BLOCK = 1 << 17


def in_blocks(combine: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor], base: torch.Tensor,
              others: list[torch.Tensor]) -> torch.Tensor:
    """combine(base, others) for an entrywise `combine`, computed on flat blocks of ELEMENTWISE_BLOCK entries
    on the CPU (one call elsewhere, or for small tensors); the result has base's shape and combine's dtype."""
    if base.device.type != "cpu" or base.numel() <= ELEMENTWISE_BLOCK:
        return combine(base, others)
    flat_base, flat = base.reshape(-1), [other.reshape(-1) for other in others]
    return by_blocks(lambda s: combine(flat_base[s], [other[s] for other in flat]).reshape(-1), flat_base).view(base.shape)


def by_blocks(function: Callable[[slice], torch.Tensor], like: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = function(s) over the flat_blocks s of a 1-D tensor shaped like `like`, for steps that are
    elementwise: the same bits as one call, without whole-tensor temporaries (a fresh 1-D `out` if None)."""
    for s in flat_blocks(like):
        part = function(s)
        if out is None:
            out = torch.empty(like.numel(), dtype=part.dtype, device=part.device)
        out[s] = part
    return out if out is not None else function(slice(0, 0))


def flat_blocks(like: torch.Tensor) -> list[slice]:
    """Cache-sized flat slices of a 1-D tensor (ELEMENTWISE_BLOCK entries on the CPU; one slice elsewhere)."""
    numel = like.numel()
    step = ELEMENTWISE_BLOCK if like.device.type == "cpu" else max(numel, 1)
    return [slice(start, min(start + step, numel)) for start in range(0, numel, step)]


def gta_tensor(base: torch.Tensor, others: list[torch.Tensor], weights: list[float],
               sparsify: Callable[[int, torch.Tensor], torch.Tensor] | None, consensus: bool,
               normalize: bool, lam: float = 1.0, int8_mask: bool = False) -> torch.Tensor:
    """Generalized task arithmetic in the tensors' dtype:
    δ_i = sparsify_i(x_i − b); Δ_i = w_i δ_i (w cast to the dtype);
    consensus (TIES "sum" election): s = sign(Σ Δ_i) (0 → +), m_i = [sign Δ_i = s], mixed = Σ m_i Δ_i,
    div = Σ m_i w_i (0 → 1); otherwise mixed = Σ Δ_i, div = Σ w_i (|div| < 1e-8 → 1);
    normalize: mixed /= div; y = b + λ·mixed. Each cross-model sum is accumulated in torch's reduction
    dtype in model order and rounded once, as mergekit's sum over the stacked models (same bits, one
    tensor per model instead of the stack). int8_mask (mergekit's memory option) changes nothing here.
    Everything after the sparsification is entrywise, so it runs in blocks (in_blocks)."""
    if not others:
        return base
    dtype = base.dtype
    w = torch.tensor(weights, dtype=dtype, device=base.device)
    deltas = []
    for index, other in enumerate(others):
        delta = other - base
        delta = sparsify(index, delta) if sparsify is not None else delta
        if weights[index] != 1:                # (× 1 changes no bit: one pass fewer at the default weight)
            delta = delta.mul_(w[index]) if delta is not other else delta * w[index]
        deltas.append(delta)
    return in_blocks(lambda b, d: _gta_combine(b, d, w, consensus, normalize, lam), base, deltas)


def _gta_combine(base: torch.Tensor, deltas: list[torch.Tensor], w: torch.Tensor, consensus: bool,
                 normalize: bool, lam: float) -> torch.Tensor:
    """gta_tensor after the sparsification: the election (or plain sum), the divisor and b + λ·mixed."""
    dtype = base.dtype
    if consensus:
        # In the accumulation dtype (exact copies of the Δ_i). With s the elected ±1, sign(Δ_i) = s exactly
        # when Δ_i·s > 0 (0 and NaN never agree), so the agreeing terms are relu(Δ_i·s) and
        # Σ m_i Δ_i = s · Σ relu(Δ_i·s): negation commutes with every rounding, so this is the same sum.
        # Only float arithmetic below: on CPUs, torch's boolean masks cost several float ops each.
        # Passes saved, same bits: (1) the sums start from the first term, not from a zero (0 + x = x but for
        # x = −0, and a zero sum elects + and ends as +0 either way); (2) the election reads the unrounded
        # sum: every Δ_i is a `dtype` value, so a sum of them is 0 or at least dtype's smallest subnormal in
        # magnitude and rounds to a nonzero of the same sign; (3) s·Σ + 0 (the + 0 turns the −0 of an empty sum
        # with s = −1 back into mergekit's +0) is one fused pass before the rounding, for the same reason.
        wide = [delta.to(accumulator_dtype(dtype)) for delta in deltas]   # (float32: the Δ_i themselves)
        majority = _accumulate(wide).sign_().add_(0.5).sign_()    # ±1, with 0 (and −0) electing +1
        agreeing = [term.mul_(majority).clamp_(min=0) for term in wide]
        mixed = torch.addcmul(majority.new_zeros(()), _accumulate(agreeing), majority).to(dtype)
        if normalize:   # (only when used; dare_ties does not normalize by default)
            weights = w.tolist()
            if all(weight == 1 for weight in weights) and len(weights) <= 2 / torch.finfo(dtype).eps:
                # the divisor is the number of agreeing models: an integer every dtype holds exactly (no
                # rounding to do), and max(count, 1) is the 0 → 1 rule (a −0 count is 0 too); 5 passes fewer
                divisor = _accumulate([term.sign_() for term in agreeing]).clamp_(min=1)
            else:
                divisor = torch.zeros_like(majority)
                for weight, term in zip(weights, agreeing):
                    divisor.add_(term.sign_(), alpha=weight)             # sign: 1 where the model agrees, else 0
                divisor = divisor.to(dtype).to(majority.dtype)
                divisor.add_(1 - divisor.abs().sign())                   # Σ = 0 → 1
            mixed /= divisor.to(dtype)
    else:
        mixed = sum_in_order(deltas, base)
        if normalize:
            divisor = w.sum(dim=0, keepdim=True)
            divisor[divisor.abs() < 1e-8] = 1
            mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(dtype)


@dataclass(frozen=True)
class GtaVariant:
    sparsification: str | None   # None | "magnitude" | "random" | "outliers" | "della"
    consensus: bool


def gta(variant: GtaVariant) -> Callable[[TensorGroupCall], torch.Tensor]:
    def merge(call: TensorGroupCall) -> torch.Tensor:
        others = call.non_base
        p = call.params
        density = call.values("density", others)
        rescale = p["rescale"]

        def sparsify(index: int, delta: torch.Tensor) -> torch.Tensor:
            key = others[index]
            if call.piece_sparsifiers is not None:
                return call.piece_sparsifiers[key](delta)
            kind = variant.sparsification
            if kind == "magnitude":
                return sparsify_magnitude(delta, density[index], rescale, call.tie_order)
            if kind == "random":
                return sparsify_random(delta, density[index], call.slots[key], rescale)
            if kind == "outliers":
                return sparsify_outliers(delta, density[index], call.per_input[key]["gamma"], rescale, call.tie_order)
            return sparsify_della(delta, density[index], call.per_input[key]["epsilon"], call.slots[key], rescale)

        return gta_tensor(call.tensors[call.base], [call.tensors[k] for k in others], call.values("weight", others),
                          sparsify if variant.sparsification else None, variant.consensus, p["normalize"],
                          p["lambda"], p["int8_mask"])

    merge.__doc__ = f"gta_tensor with sparsification={variant.sparsification}, consensus={variant.consensus}"
    return merge


# ----------------------------------------------------------------------------------------------
# model_stock, nearswap, passthrough: in the compute dtype


def model_stock_tensor(base: torch.Tensor, others: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: δ_i = x_i − b (whole tensor, or per row with filter_wise); c = mean over pairs i<j of
    cos(δ_i, δ_j) (norm product clamped at 1e-6, cos clamped to [−1, 1]); t = n c / (1 + (n−1) c)
    (t = 0 when |1 + (n−1)c| < 1e-6); y = t·mean(x_i) + (1−t)·b."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in others]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in others]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


def model_stock(call: TensorGroupCall) -> torch.Tensor:
    return model_stock_tensor(call.tensors[call.base], [call.tensors[k] for k in call.non_base],
                              call.params["filter_wise"])


def nearswap_tensor(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """w = clamp(t / max(|b − x|, 1e-6), 0, 1); y = w·x + (1 − w)·b (entries closer than t are swapped in)."""
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def nearswap(call: TensorGroupCall) -> torch.Tensor:
    return nearswap_tensor(call.tensors[call.base], call.tensors[call.non_base[0]], call.params["t"])


def passthrough(call: TensorGroupCall) -> torch.Tensor:
    """y = x (times `scale` when given) for the single input."""
    key = next(iter(call.tensors))
    scale = call.per_input.get(key, {}).get("scale")
    tensor = call.tensors[key]
    return tensor if scale is None else tensor * scale


# ----------------------------------------------------------------------------------------------


def run_group(function: Callable[[TensorGroupCall], torch.Tensor], call: TensorGroupCall) -> torch.Tensor:
    """Non-float tensors (integer buffers) are copied when identical in every input, else refused."""
    tensors = list(call.tensors.values())
    if not tensors[0].is_floating_point():
        for key, tensor in call.tensors.items():
            if not torch.equal(tensor, tensors[0]):
                raise MergeError(f"non-float tensor differs in {key}; it cannot be merged")
        return tensors[0]
    return function(call)


# mergekit's GTA methods, one function each (the registry names them "recipe_methods:gta_ties", ...)
gta_ties = gta(GtaVariant("magnitude", True))
gta_dare_ties = gta(GtaVariant("random", True))
gta_dare_linear = gta(GtaVariant("random", False))
gta_breadcrumbs = gta(GtaVariant("outliers", False))
gta_breadcrumbs_ties = gta(GtaVariant("outliers", True))
gta_della = gta(GtaVariant("della", True))
gta_della_linear = gta(GtaVariant("della", False))

__all__ = ["GtaVariant", "PieceSparsifier", "RankCut", "RecipeParameter", "TensorGroupCall", "abs_sum", "l1_norm",
           "rescale_factor", "gta", "gta_tensor", "linear",
           "linear_tensor", "model_stock", "model_stock_tensor", "nearswap", "nearswap_tensor", "passthrough",
           "run_group", "slerp", "slerp_tensor", "sparsify_della", "sparsify_magnitude", "sparsify_outliers",
           "sparsify_random", "REQUIRED"]
