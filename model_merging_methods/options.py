"""Option groups shared by every merge method, and the library's error type."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch

# a string forward reference: this module (and the registry) load without importing torch
StateDict = dict[str, "torch.Tensor"]

MASK_STRATEGIES = ("random", "magnitude")
WEIGHT_FORMATS = ("delta_weight", "finetuned_weight")
RESCALE_MODES = ("paper", "l1")
MAGNITUDE_RULES = ("exact_count", "original")
TIES_TRIMS = ("per_tensor", "global")
TIES_NORMALIZATIONS = ("count", "weights")
NORM_MODES = ("linear", "power", "exp")
# which entries tied at a rank cut-off (mergekit's ties / breadcrumbs*) are kept: torch.argsort's order on the
# merge's device (mergekit itself: on the CPU an introsort, bit for bit; holds whole tensors) or the first in flat
# order ("index": a stable sort, mergekit on CUDA; streams). The default is mergekit's own call.
TIE_ORDERS = ("argsort", "index")
DEFAULT_TIE_ORDER = "argsort"


class MergeError(ValueError):
    """Bad input to a merge: the message names the tensor, model or value at fault."""


REQUIRED = object()  # marks a parameter without a default


@dataclass(frozen=True)
class MethodParameter:
    """A method parameter as a recipe (and the flags translated to one) names it. scope: "global" (one
    value per tensor), "input" (per input, the base included) or "non_base" (per input other than the base).
    ``option``: for the paper's methods, the MergeOptions field it fills (per-input values become a list
    in model order); None for mergekit's methods, whose functions read the resolved values by name."""

    name: str
    kind: type
    scope: str = "global"
    default: Any = REQUIRED
    option: str | None = None
    choices: tuple = ()
    check: "Callable[[Any], bool] | None" = None   # a range check on the coerced value (e.g. a fraction in (0, 1])
    requirement: str = ""                          # what `check` demands, for the error message

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any, where: str) -> Any:
        """Coerce a recipe value to the parameter's type (as pydantic would: 1 → 1.0, "true" → True), then
        apply the parameter's range check."""
        value = self._coerce(value, where)
        if value is not None and self.check is not None and not self.check(value):
            raise MergeError(f"{where}: parameter {self.name!r} must be {self.requirement}, got {value!r}")
        return value

    def _coerce(self, value: Any, where: str) -> Any:
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
        elif self.kind is str and isinstance(value, str):
            if not self.choices or value in self.choices:
                return value
            raise MergeError(f"{where}: parameter {self.name!r} must be one of {', '.join(self.choices)}, got {value!r}")
        raise MergeError(f"{where}: parameter {self.name!r} must be a {self.kind.__name__}, got {value!r}")


def per_model(value: float | Sequence[float], num_models: int, what: str) -> list[float]:
    """Broadcast a scalar option to one value per model, or check a given list's length."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_models
    values = [float(v) for v in value]
    if len(values) != num_models:
        raise MergeError(f"{what}: got {len(values)} values for {num_models} models")
    return values


@dataclass(frozen=True)
class DareOptions:
    """DARE (Drop And REscale, arXiv 2311.03099) applied to each model before a merge.

    For each tensor x (a delta δ = θ_ft − θ_pre, or θ_ft itself with ``finetuned_weight``):
    ``random``: m ~ Bernoulli(p) elementwise, x̃ = x ⊙ (1 − m);
    ``magnitude``: k = int(n·p); ``magnitude_rule="exact_count"`` (default) drops exactly k entries of
    smallest |x| (ties: lower flat index first); ``"original"`` (MergeLM's rule) drops every entry with
    |x| ≤ t, t = the k-th smallest |x|, so ties at t are all dropped (more than k entries when |x| repeats,
    e.g. fp16 deltas; nothing is dropped when k = 0, where MergeLM's ``kthvalue`` raised);
    rescale ``paper``: x̂ = x̃ / (1 − p); ``l1`` (mergekit): x̂ = x̃ · Σ|x| / Σ|x̃|.
    ``rescale=False`` is the paper's "DropOnly". p = 0 is the identity.
    """

    drop_rate: float | Sequence[float] = 0.0
    rescale: bool = True
    strategy: str = "random"
    weight_format: str = "delta_weight"
    rescale_mode: str = "paper"
    magnitude_rule: str = "exact_count"

    def resolve(self, num_models: int) -> tuple[ResolvedDare, ...]:
        """Validate once and resolve to one ResolvedDare per model (a scalar rate is broadcast)."""
        _check_choice("mask_strategy", self.strategy, MASK_STRATEGIES)
        _check_choice("weight_format", self.weight_format, WEIGHT_FORMATS)
        _check_choice("rescale_mode", self.rescale_mode, RESCALE_MODES)
        _check_choice("magnitude_rule", self.magnitude_rule, MAGNITUDE_RULES)
        rates = per_model(self.drop_rate, num_models, "drop_rate")
        for index, p in enumerate(rates):
            if not 0.0 <= p < 1.0:
                raise MergeError(f"drop rate {p} for model {index} is outside [0, 1)")
        return tuple(ResolvedDare(p, bool(self.rescale), self.strategy, self.weight_format, self.rescale_mode,
                                  self.magnitude_rule) for p in rates)


@dataclass(frozen=True)
class ResolvedDare:
    """DARE for one model, validated (made only by DareOptions.resolve): one drop rate p in [0, 1)."""

    drop_rate: float
    rescale: bool
    strategy: str
    weight_format: str
    rescale_mode: str
    magnitude_rule: str = "exact_count"


@dataclass(frozen=True)
class MergeOptions:
    """Hyperparameters of the merge methods; each method reads the fields it documents."""

    weights: Sequence[float] | None = None
    scaling_coefficient: float = 1.0
    density: float | Sequence[float] = 1.0
    ties_trim: str = "per_tensor"
    ties_normalize: str = "count"
    slerp_t: float = 0.5
    fisher_coefficients: Sequence[float] | None = None
    fisher_normalize: bool = False
    fisher_eps: float = 1e-6
    regmean_alpha: float = 1.0
    norm_mode: str = "exp"                   # norm_adaptive: linear | power | exp
    norm_alpha: float = 1.5                  # norm_adaptive power: w ∝ L^(−α)
    norm_beta: float = 1.0                   # norm_adaptive exp: w ∝ exp(−β·L/mean(L))
    norms: Sequence[float] | None = None     # norm_adaptive: global ‖δ_k‖₂ (None: computed from the models)

    def model_weights(self, num_models: int, default: float) -> list[float]:
        if self.weights is None:
            return [default] * num_models
        return per_model(self.weights, num_models, "weights")

    def densities(self, num_models: int) -> list[float]:
        densities = per_model(self.density, num_models, "density")
        for index, d in enumerate(densities):
            if not 0.0 <= d <= 1.0:
                raise MergeError(f"density {d} for model {index} is outside [0, 1]")
        return densities

    def validate(self) -> None:
        _check_choice("ties_trim", self.ties_trim, TIES_TRIMS)
        _check_choice("ties_normalize", self.ties_normalize, TIES_NORMALIZATIONS)
        if not 0.0 <= self.slerp_t <= 1.0:
            raise MergeError(f"slerp t = {self.slerp_t} is outside [0, 1]")
        if not 0.0 <= self.regmean_alpha <= 1.0:
            raise MergeError(f"regmean alpha = {self.regmean_alpha} is outside [0, 1]")
        _check_choice("norm_mode", self.norm_mode, NORM_MODES)
        for index, norm in enumerate(self.norms or ()):
            if not math.isfinite(norm) or norm < 0:
                raise MergeError(f"norm {norm} of model {index} is not a finite number ≥ 0")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise MergeError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")
