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
operation (same dtypes, same reduction order, same torch sort), i.e. the same bits on the same torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .options import MergeError
from .randomness import RandomSlot

REQUIRED = object()  # marks a parameter without a default


@dataclass(frozen=True)
class RecipeParameter:
    """A method parameter as a recipe names it. scope: "global" (one value per tensor), "input" (per
    input, the base included) or "non_base" (per input other than the base)."""

    name: str
    kind: type
    scope: str = "global"
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any, where: str) -> Any:
        """Coerce a recipe value to the parameter's type (as pydantic would: 1 → 1.0, "true" → True)."""
        if value is None:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                return value.lower() in ("true", "yes", "1", "on")
        elif self.kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif self.kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        raise MergeError(f"{where}: parameter {self.name!r} must be a {self.kind.__name__}, got {value!r}")


@dataclass(frozen=True)
class TensorGroupCall:
    """One output tensor's inputs and resolved parameters."""

    tensors: dict[str, torch.Tensor]            # input id → tensor, in recipe order
    base: str | None
    params: dict[str, Any] = field(default_factory=dict)
    per_input: dict[str, dict[str, Any]] = field(default_factory=dict)
    slots: dict[str, RandomSlot] = field(default_factory=dict)

    @property
    def non_base(self) -> list[str]:
        return [key for key in self.tensors if key != self.base]

    def values(self, name: str, keys: list[str]) -> list[Any]:
        return [self.per_input[key][name] for key in keys]


# ----------------------------------------------------------------------------------------------
# linear, slerp: fp32 (fp64 for fp64 inputs) accumulation, result in the input dtype


def _accumulator_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


CHUNK = 1 << 20   # elements per float32 scratch chunk (mergekit's slerp chunk; elementwise results do not depend on it)


def linear_tensor(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """y = Σ w_i x_i (/ Σ w_i when normalize), accumulated in float32 in input order, cast back.

    No guard against Σ w_i = 0 (as mergekit). Computed in flat chunks: float32 scratch stays small."""
    first = tensors[0]
    acc_dtype = _accumulator_dtype(first)
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


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's slerp of whole tensors, computed in float32: norms ≤ eps count as 1,
    d = clamp(⟨a/‖a‖, b/‖b‖⟩, −1, 1); |d| > 0.9995 → (1−t)a + tb, else
    sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b with θ = acos d (unnormalised a, b). t = 0 gives a.

    Norms and the dot product are reduced over chunks of 2^20 elements exactly as mergekit does (the norm
    of the chunks' norms; the sum of the chunks' dots), so large tensors round the same way."""
    dtype = _accumulator_dtype(a)
    x_all, y_all = a.reshape(-1), b.reshape(-1)
    t_ = torch.tensor(t, dtype=dtype)
    if x_all.numel() == 0:
        return ((1 - t_) * x_all.to(dtype) + t_ * y_all.to(dtype)).reshape(a.shape).to(a.dtype)
    starts = range(0, x_all.numel(), CHUNK)
    chunk = lambda v, s: v[s:s + CHUNK].to(dtype)  # noqa: E731
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(chunk(x_all, s)) for s in starts]))
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(chunk(y_all, s)) for s in starts]))
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((chunk(x_all, s) / norm_a) * (chunk(y_all, s) / norm_b)).sum() for s in starts]).sum()
    dot = dot.clamp(-1, 1)
    if bool(dot.abs() > SLERP_DOT_THRESHOLD):
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a, coef_b = torch.sin((1 - t_) * theta) / sin_theta, torch.sin(t_ * theta) / sin_theta
    out = torch.empty_like(x_all)
    for s in starts:
        out[s:s + CHUNK] = coef_a * chunk(x_all, s) + coef_b * chunk(y_all, s)
    return out.reshape(a.shape)


def slerp(call: TensorGroupCall) -> torch.Tensor:
    other = call.non_base[0]
    return slerp_tensor(call.tensors[call.base], call.tensors[other], call.params["t"])


# ----------------------------------------------------------------------------------------------
# generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*): in the compute dtype


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """δ ⊙ m, times Σ|δ| / Σ|δ ⊙ m| when rescaling (skipped when either sum is < 1e-7)."""
    masked = delta * mask
    if not rescale:
        return masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def sparsify_magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the k = max(1, int(density·n)) largest |δ| (first k of torch.argsort(|δ|, descending) over the
    flattened tensor: torch's tie order, as mergekit); density ≥ 1 returns δ, density ≤ 0 zeros."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    mask[torch.argsort(magnitudes, descending=True)[:k]] = 1
    return _rescaled(delta, mask.reshape_as(delta), rescale)


def sparsify_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: keep = int(density·n), top = int(gamma·n), bottom = max(0, n − keep − top); keep
    positions [bottom, bottom + keep) of |δ| sorted ascending (drops the smallest and the largest)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    order = torch.sort(magnitudes, descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[bottom:bottom + keep]] = 1
    return _rescaled(delta, mask.reshape_as(delta), rescale)


def _draw_dtype(delta: torch.Tensor) -> torch.dtype:
    """mergekit draws CPU masks in float32 unless the tensor is bfloat16."""
    return delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 else torch.float32


def sparsify_random(delta: torch.Tensor, density: float, slot: RandomSlot, rescale: bool = False) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (u ~ U[0,1) from `slot`, keep iff u < density);
    rescale is mergekit's L1-norm match, not the paper's 1/density. density ≥ 1 returns δ."""
    if density >= 1:
        return delta
    work = _draw_dtype(delta)
    mask = (slot.uniform(delta.numel()).view(delta.shape).to(delta.device) < density).to(work)
    return _rescaled(delta.to(work), mask, rescale).to(delta.dtype)


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


def gta_tensor(base: torch.Tensor, others: list[torch.Tensor], weights: list[float],
               sparsify: Callable[[int, torch.Tensor], torch.Tensor] | None, consensus: bool,
               normalize: bool, lam: float = 1.0, int8_mask: bool = False) -> torch.Tensor:
    """Generalized task arithmetic in the tensors' dtype:
    δ_i = sparsify_i(x_i − b); Δ_i = w_i δ_i (w cast to the dtype);
    consensus (TIES "sum" election): s = sign(Σ Δ_i) (0 → +), m_i = [sign Δ_i = s], mixed = Σ m_i Δ_i,
    div = Σ m_i w_i (0 → 1); otherwise mixed = Σ Δ_i, div = Σ w_i (|div| < 1e-8 → 1);
    normalize: mixed /= div; y = b + λ·mixed. Cross-model sums are single reductions over the stack.
    int8_mask only changes the sign tensors' dtype (memory), never the result."""
    if not others:
        return base
    deltas = base.new_empty((len(others), *base.shape))
    for index, other in enumerate(others):
        delta = other - base
        deltas[index] = sparsify(index, delta) if sparsify is not None else delta
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        mask_dtype = torch.int8 if int8_mask else base.dtype
        signs = deltas.sign().to(mask_dtype)
        majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
        mask = signs == majority
        del signs
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


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
            kind = variant.sparsification
            if kind == "magnitude":
                return sparsify_magnitude(delta, density[index], rescale)
            if kind == "random":
                return sparsify_random(delta, density[index], call.slots[key], rescale)
            if kind == "outliers":
                return sparsify_outliers(delta, density[index], call.per_input[key]["gamma"], rescale)
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


GTA_PARAMETERS = (RecipeParameter("int8_mask", bool, default=False), RecipeParameter("lambda", float, default=1.0),
                  RecipeParameter("weight", float, "non_base"), RecipeParameter("density", float, "non_base", 1.0))


def gta_parameters(normalize: bool, rescale: bool, extra: tuple = ()) -> tuple[RecipeParameter, ...]:
    return (RecipeParameter("normalize", bool, default=normalize),
            RecipeParameter("rescale", bool, default=rescale)) + GTA_PARAMETERS + extra


GAMMA = (RecipeParameter("gamma", float, "non_base", 0.01),)
EPSILON = (RecipeParameter("epsilon", float, "non_base", 0.15),)
__all__ = ["GtaVariant", "RecipeParameter", "TensorGroupCall", "gta", "gta_parameters", "gta_tensor", "linear",
           "linear_tensor", "model_stock", "model_stock_tensor", "nearswap", "nearswap_tensor", "passthrough",
           "run_group", "slerp", "slerp_tensor", "sparsify_della", "sparsify_magnitude", "sparsify_outliers",
           "sparsify_random", "REQUIRED", "GAMMA", "EPSILON"]
