"""One registry of merge methods: name → function, with its paper and input contract."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .fisher_regmean import fisher_merging, regmean_merging
from .linear import average_merging, passthrough_single, task_arithmetic
from .options import MergeError, MergeOptions
from .slerp import slerp_merging
from .ties import ties_merging


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable
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

    def needs_whole_model(self, options: MergeOptions) -> bool:
        """True when these options make the merge depend on the whole model at once (so it cannot stream):
        a method marked not streamable, or TIES's trim over the whole model (ties_trim="global")."""
        return not self.streamable or (self.trim_thresholds and options.ties_trim == "global")


_METHODS = [
    MergeMethod("average_merging", average_merging, "Wortsman et al. 2022, Model soups (arXiv 2203.05482)",
                needs_base=False, elementwise=True),
    MergeMethod("task_arithmetic", task_arithmetic,
                "Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)", elementwise=True,
                on_deltas=True),
    MergeMethod("ties_merging", ties_merging, "Yadav et al. 2023, TIES-Merging (arXiv 2306.01708)",
                elementwise=True, trim_thresholds=True, on_deltas=True),
    MergeMethod("dare_linear", task_arithmetic, "Yu et al. 2024, DARE (arXiv 2311.03099) + task arithmetic",
                dare_from_density=True, elementwise=True, on_deltas=True),
    MergeMethod("dare_ties", ties_merging, "Yu et al. 2024, DARE (arXiv 2311.03099) + TIES",
                dare_from_density=True, elementwise=True, trim_thresholds=True, on_deltas=True),
    MergeMethod("slerp", slerp_merging, "Shoemake 1985, spherical linear interpolation", min_models=1, max_models=1),
    MergeMethod("fisher_merging", fisher_merging, "Matena & Raffel 2022, Fisher merging (arXiv 2111.09832)",
                needs_base=False, statistics="fisher", streamable=False),
    MergeMethod("regmean_merging", regmean_merging, "Jin et al. 2023, RegMean (arXiv 2212.09849)",
                needs_base=False, statistics="gram"),
    MergeMethod("dare", passthrough_single, "Yu et al. 2024, DARE on a single model (arXiv 2311.03099)",
                max_models=1, elementwise=True),
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
