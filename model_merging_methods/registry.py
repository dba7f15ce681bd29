"""One registry of merge methods: name → function, with its paper, input contract and capabilities.

Functions are named as ``"module:function"`` inside this package and imported on first call, so that
listing methods and checking a job's options needs no torch (entry scripts answer --help at once).

This registry serves merge_models.py --method and the library (the paper's methods; `linear`/`ties` are
aliases of the paper's average_merging/ties_merging). A recipe's `merge_method:` is looked up in the recipe
namespace instead, `recipe_registry.get_recipe_method`: mergekit's names with mergekit's semantics.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

from .options import MergeError, MergeOptions, ResolvedDare


@dataclass(frozen=True)
class Noop:
    """Settings under which a method is an exact no-op of a simpler one: the message names the flag to set.
    ``error``: refused unless the caller allows no-ops (a dare_* method that drops nothing)."""
    message: str
    error: bool = False


NoopPredicate = Callable[[MergeOptions, "tuple[ResolvedDare, ...] | None", int], "Noop | None"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable | str             # the function, or "module:function" in this package (lazy)
    paper: str
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    statistics: str | None = None   # "fisher" | "gram": per-model statistics the method needs
    dare_from_density: bool = False  # DARE rate defaults to 1 − density (mergekit's dare_* methods)
    streamable: bool = True          # can run one tensor at a time
    elementwise: bool = False        # each output entry depends only on the same entry of the inputs
    trim_thresholds: bool = False    # TIES trim: takes per-tensor trim thresholds (statistics) when density < 1
    on_deltas: bool = False          # the function receives task vectors δ_k = θ_k − θ_pre instead of θ_k
    options_used: tuple[str, ...] = ()   # MergeOptions fields the method reads (recorded in manifests)
    weights_normalized: bool = False     # divides by Σ w_k: weights summing to 0 are refused
    noop_when: NoopPredicate | None = None   # (resolved options, resolved DARE, models) → Noop or None
    global_norms: bool = False       # needs options.norms = the whole-model ‖δ_k‖₂ (computed when not given)

    def implementation(self) -> Callable:
        """The method's function (imported on first use when registered by name)."""
        if callable(self.function):
            return self.function
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(f".{module}", __package__), attribute)

    def needs_whole_model(self, options: MergeOptions) -> bool:
        """True when these options make the merge depend on the whole model at once (so it cannot stream):
        a method marked not streamable, or TIES's trim over the whole model (ties_trim="global")."""
        return not self.streamable or (self.trim_thresholds and options.ties_trim == "global")

    def check_weights(self, options: MergeOptions, num_models: int) -> None:
        """One weight per model (or none), and a non-zero sum where the method divides by it."""
        if options.weights is None or "weights" not in self.options_used:
            return
        weights = options.model_weights(num_models, 1.0)
        if self.weights_normalized and sum(weights) == 0:
            raise MergeError(f"{self.name}: the model weights {weights} sum to 0 (the merge divides by their sum)")

    def noop(self, options: MergeOptions, dare: tuple[ResolvedDare, ...] | None, num_models: int) -> Noop | None:
        """Whether these resolved settings make the method an exact no-op of a simpler one (see Noop)."""
        return self.noop_when(options, dare, num_models) if self.noop_when else None


def _no_drop(dare: Sequence[ResolvedDare] | None) -> bool:
    return dare is None or not any(d.drop_rate for d in dare)


def _ties_noop(options: MergeOptions, dare, num_models: int) -> Noop | None:
    if all(d == 1.0 for d in options.densities(num_models)):
        return Noop("ties_merging with density 1 trims nothing (sign election and disjoint mean only); "
                    "set --density below 1 (the paper keeps 0.2) to trim")
    return None


def _dare_from_density_noop(parent: str) -> NoopPredicate:
    def predicate(options: MergeOptions, dare, num_models: int) -> Noop | None:
        if _no_drop(dare):
            return Noop(f"without --drop_rate > 0 or --density below 1 nothing is dropped: the result is "
                        f"bit-identical to {parent}; set one of them (or pass --allow_noop)", error=True)
        return None
    return predicate


def _dare_single_noop(options: MergeOptions, dare, num_models: int) -> Noop | None:
    if _no_drop(dare):
        return Noop("dare with --drop_rate 0 drops nothing: the output is the model as it is; set --drop_rate")
    return None


_TA = ("weights", "scaling_coefficient")
_METHODS = [
    MergeMethod("average_merging", "linear:average_merging", "Wortsman et al. 2022, Model soups (arXiv 2203.05482)",
                needs_base=False, elementwise=True, options_used=("weights",), weights_normalized=True),
    MergeMethod("task_arithmetic", "linear:task_arithmetic",
                "Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)", elementwise=True,
                on_deltas=True, options_used=_TA),
    MergeMethod("ties_merging", "ties:ties_merging", "Yadav et al. 2023, TIES-Merging (arXiv 2306.01708)",
                elementwise=True, trim_thresholds=True, on_deltas=True,
                options_used=_TA + ("density", "ties_trim", "ties_normalize"), noop_when=_ties_noop),
    MergeMethod("dare_linear", "linear:task_arithmetic", "Yu et al. 2024, DARE (arXiv 2311.03099) + task arithmetic",
                dare_from_density=True, elementwise=True, on_deltas=True, options_used=_TA + ("density",),
                noop_when=_dare_from_density_noop("task_arithmetic")),
    MergeMethod("dare_ties", "ties:ties_merging", "Yu et al. 2024, DARE (arXiv 2311.03099) + TIES",
                dare_from_density=True, elementwise=True, trim_thresholds=True, on_deltas=True,
                options_used=_TA + ("density", "ties_normalize"),
                noop_when=_dare_from_density_noop("ties_merging at density 1")),
    MergeMethod("slerp", "slerp:slerp_merging", "Shoemake 1985, spherical linear interpolation", min_models=1,
                max_models=1, options_used=("slerp_t",)),
    MergeMethod("fisher_merging", "fisher_regmean:fisher_merging",
                "Matena & Raffel 2022, Fisher merging (arXiv 2111.09832)", needs_base=False, statistics="fisher",
                streamable=False, options_used=("fisher_coefficients", "fisher_normalize", "fisher_eps")),
    MergeMethod("regmean_merging", "fisher_regmean:regmean_merging", "Jin et al. 2023, RegMean (arXiv 2212.09849)",
                needs_base=False, statistics="gram", options_used=("regmean_alpha",)),
    MergeMethod("norm_adaptive", "norm_adaptive:norm_adaptive_merging",
                "task-vector toolkits' adaptive merge: task arithmetic weighted by a decreasing function of ‖δ_k‖₂",
                elementwise=True, on_deltas=True, global_norms=True,
                options_used=("scaling_coefficient", "norm_mode", "norm_alpha", "norm_beta", "norms")),
    MergeMethod("dare", "linear:passthrough_single", "Yu et al. 2024, DARE on a single model (arXiv 2311.03099)",
                max_models=1, elementwise=True, noop_when=_dare_single_noop),
]
REGISTRY: dict[str, MergeMethod] = {method.name: method for method in _METHODS}
ALIASES = {"linear": "average_merging", "ties": "ties_merging"}


def available_methods() -> list[str]:
    return sorted(REGISTRY) + sorted(ALIASES)


def get_method(name: str) -> MergeMethod:
    """Look a method up by name or alias; an unknown name lists the valid ones."""
    method = REGISTRY.get(ALIASES.get(name, name))
    if method is None:
        raise MergeError(f"unknown merge method {name!r}; valid: {', '.join(available_methods())}")
    return method
