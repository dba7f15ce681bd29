"""The data-free frontier methods as registry entries: their parameters (names, defaults, checks) and one
adapter per method from {name: tensor} dicts to the per-tensor functions.

Parameter names are FusionBench's where it has the method (tsv_merging `alpha`; iso_c / iso_cts
`scaling_factor`, `common_space_fraction`; wudi_merging `iter_num`; consensus `tall_mask_lambda`,
`scaling_factor`) and the papers' otherwise (consensus `prun_thre_k`, cart `rank_ratio`, lines `alpha`,
`beta`, pcb `pcb_ratio`); the few choices that are ours are marked. `scale_parameter` is the one
`--scaling_coefficient` sets. Values are checked once, by `resolve_parameters`, where they enter (flags,
recipes, the library's public entry); the functions below take resolved values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .options import MergeError


def _fraction(value: float) -> bool:       # (0, 1]
    return 0.0 < value <= 1.0


def _nonnegative(value: float) -> bool:
    return value >= 0


def _finite(value: float) -> bool:
    return math.isfinite(value)


@dataclass(frozen=True)
class FrontierParameter:
    name: str
    kind: type
    default: Any
    check: Callable[[Any], bool] = _finite
    requirement: str = "a finite number"
    help: str = ""
    choices: tuple[str, ...] = ()
    scope: str = "global"     # "non_base": one value per model (recipes: per-model parameters)

    def coerce(self, method: str, value: Any) -> Any:
        where = f"{method}: parameter {self.name!r}"
        if self.choices:
            if value not in self.choices:
                raise MergeError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if value is None and self.default is None:
            return None
        try:
            if self.kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            else:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
        except (TypeError, ValueError):
            raise MergeError(f"{where} must be {'an integer' if self.kind is int else 'a number'}, got {value!r}") from None
        if not self.check(value):
            raise MergeError(f"{where} must be {self.requirement}, got {value}")
        return value


_SCALE = "the method's overall scale"
_P = FrontierParameter
PARAMETERS: dict[str, tuple[FrontierParameter, ...]] = {
    "tsv_merging": (_P("alpha", float, 1.0, help=_SCALE + " α (FusionBench default 1)"),),
    "iso_c": (_P("scaling_factor", float, 1.0, help=_SCALE + " (FusionBench default 1; the paper tunes it)"),),
    "iso_cts": (_P("scaling_factor", float, 1.0, help=_SCALE + " (FusionBench default 1)"),
                _P("common_space_fraction", float, 0.8, _fraction, "in (0, 1]", "share of the rank kept from the common space")),
    "wudi_merging": (_P("iter_num", int, 400, _nonnegative, "≥ 0", "Adam steps per matrix (FusionBench config: 400)"),
                     _P("lr", float, 1e-5, lambda v: math.isfinite(v) and v > 0, "> 0",
                        "Adam learning rate (FusionBench hard-codes 1e-5 under torch's name lr)")),
    "cart": (_P("rank_ratio", float, 0.1, _fraction, "in (0, 1]", "kept rank fraction of each centred task matrix (our default)"),
             _P("scaling_factor", float, 1.0, help=_SCALE + " λ (our default; the paper tunes it)"),
             _P("svd", str, "exact", choices=("exact", "randomized"),
                help="how the rank-k truncation is found (randomized: ours, faster, approximate)")),
    "consensus_merging": (_P("tall_mask_lambda", float, 0.6, _nonnegative, "≥ 0", "λ of the TALL masks (FusionBench default 0.6)"),
                          _P("prun_thre_k", int, 2, _nonnegative, "≥ 0", "tasks a weight must serve to be kept (paper: 2)"),
                          _P("scaling_factor", float, 1.0, help=_SCALE + " α"),
                          _P("consensus_base", str, "task_arithmetic", choices=("task_arithmetic", "ties_merging"),
                             help="multi-task vector the masks are built from and applied to (our name)"),
                          _P("density", float, 0.2, _fraction, "in (0, 1]", "TIES density when consensus_base is ties_merging", scope="non_base")),
    "lines": (_P("alpha", float, None, _finite, "a finite number",
                 "scale of the first block and of non-block tensors (default: the authors' ‖Στ‖/(T‖τ_MTL‖), 1/T on task arithmetic)"),
              _P("beta", float, 1.0, help=_SCALE + ": added scale of the last block over the first"),
              _P("lines_base", str, "task_arithmetic", choices=("task_arithmetic", "ties_merging", "consensus_merging"),
                 help="method giving τ_MTL (our name)"),
              _P("density", float, 0.2, _fraction, "in (0, 1]", "TIES density when lines_base is ties_merging", scope="non_base")),
    "pcb_merging": (_P("pcb_ratio", float, 0.1, _fraction, "in (0, 1]", "kept share of each task's balanced scores (authors' default)"),
                    _P("scaling_factor", float, 1.0, help=_SCALE + " λ")),
}
SCALE_PARAMETER = {"tsv_merging": "alpha", "iso_c": "scaling_factor", "iso_cts": "scaling_factor", "cart": "scaling_factor",
                   "consensus_merging": "scaling_factor", "lines": "beta", "pcb_merging": "scaling_factor"}
FRONTIER_METHODS = tuple(PARAMETERS)


def frontier_parameters_help() -> str:
    """One line for --help: every frontier method's parameters and defaults."""
    return "; ".join(f"{method} " + ", ".join(f"{p.name}={p.default}" for p in declared) for method, declared in PARAMETERS.items())


def resolve_parameters(method: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The method's parameters with defaults filled in; an unknown name or a bad value is a MergeError naming it."""
    declared = {p.name: p for p in PARAMETERS[method]}
    given = dict(given or {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise MergeError(f"{method}: unknown parameter(s) {', '.join(map(repr, unknown))}; valid: {', '.join(declared)}")
    return {name: (p.coerce(method, given[name]) if name in given else p.default) for name, p in declared.items()}


def merge_tensor(method: str, deltas: Sequence, params: Mapping[str, Any], *, name: str = "",
                 layer: int | None = None, num_layers: int = 1, device: str = "cpu", lines_alpha: float | None = None):
    """The merged task vector τ* of ONE tensor (θ* = θ_pre + τ*) from its task vectors, with resolved `params`.

    `layer` / `num_layers`: the tensor's block index and the depth (LiNeS only; None = outside the blocks).
    `lines_alpha`: LiNeS's α when the caller computed the authors' norm rule (else params' alpha, else 1/T)."""
    from . import consensus, lines, pcb, subspace, wudi

    what = f"{method} on {name!r}" if name else method
    if method == "tsv_merging":
        return subspace.tsv_merge_tensor(deltas, params["alpha"], what)
    if method == "iso_c":
        return subspace.iso_c_tensor(deltas, params["scaling_factor"], what)
    if method == "iso_cts":
        return subspace.iso_cts_tensor(deltas, params["scaling_factor"], params["common_space_fraction"], what)
    if method == "cart":
        return subspace.cart_tensor(deltas, params["rank_ratio"], params["scaling_factor"], what, params["svd"])
    if method == "wudi_merging":
        return wudi.wudi_tensor(deltas, params["iter_num"], params["lr"], device, what)
    if method == "consensus_merging":
        return consensus.consensus_tensor(deltas, params["tall_mask_lambda"], params["prun_thre_k"], params["scaling_factor"],
                                          params["consensus_base"], params["density"])
    if method == "pcb_merging":
        return pcb.pcb_tensor(deltas, params["pcb_ratio"], params["scaling_factor"])
    if method == "lines":
        base = params["lines_base"]
        if base == "consensus_merging":
            defaults = resolve_parameters("consensus_merging")
            mtl = consensus.consensus_tensor(deltas, defaults["tall_mask_lambda"], defaults["prun_thre_k"], 1.0)
        else:
            mtl = consensus.multi_task_vector(deltas, base, params["density"])
        alpha = params["alpha"] if params["alpha"] is not None else lines_alpha
        if alpha is None:
            if base != "task_arithmetic":
                raise MergeError(f"lines on {base}: set alpha (the authors' rule ‖Σ_t τ_t‖ / (T·‖τ_MTL‖) needs the whole "
                                 "model's norms, computed only for task arithmetic, where it is 1/T)")
            alpha = lines.lines_default_alpha(len(deltas))
        return lines.lines_tensor(mtl, layer, num_layers, alpha, params["beta"])
    raise MergeError(f"unknown frontier method {method!r}")


# ----------------------------------------------------------------------------------------------
# the registry's "group" convention: one output tensor from a TensorGroupCall


def compute_dtype(dtype) -> "torch.dtype":
    """float64 inputs stay float64; everything else is merged in float32 (FusionBench's float32 models)."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_group(method: str, call) -> "torch.Tensor":
    """θ* = θ_pre + τ* for one output tensor of a recipe / flag merge (recipe_methods.TensorGroupCall).

    τ_t = w_t (θ_t − θ_pre), w_t the input's `weight` (default 1: the papers' unweighted merges; FusionBench's
    per-model TSV-M α is this weight). Parameters are read from call.params (resolved by resolve_parameters
    where they entered). Optional call attributes: `name` (error messages), `layer` / `num_layers` (LiNeS),
    `device` (where WUDI optimises; default the tensors' device), `lines_alpha` (LiNeS's norm rule).
    A non-finite result (overflow) is a MergeError naming the method and tensor."""
    import torch

    base = call.tensors[call.base]
    dtype = compute_dtype(base.dtype)
    base32 = base.to(dtype)
    deltas = []
    for key in call.non_base:
        delta = call.tensors[key].to(dtype) - base32
        weight = call.per_input.get(key, {}).get("weight", 1.0)
        deltas.append(delta.mul_(weight) if weight != 1.0 else delta)
    params = {}
    for p in PARAMETERS[method]:
        if p.scope == "non_base":
            params[p.name] = [call.per_input.get(key, {}).get(p.name, p.default) for key in call.non_base]
        else:
            params[p.name] = call.params.get(p.name, p.default)
    name = getattr(call, "name", "")
    merged = merge_tensor(method, deltas, params, name=name, layer=getattr(call, "layer", None),
                          num_layers=getattr(call, "num_layers", 1), device=getattr(call, "device", None) or base.device,
                          lines_alpha=getattr(call, "lines_alpha", None)).add_(base32)
    if not bool(torch.isfinite(merged).all()):
        raise MergeError(f"{method}: the merged tensor {name!r} is Inf/NaN although its inputs are finite")
    return merged


def tsv_merging(call):
    return merge_group("tsv_merging", call)


def iso_c(call):
    return merge_group("iso_c", call)


def iso_cts(call):
    return merge_group("iso_cts", call)


def wudi_merging(call):
    return merge_group("wudi_merging", call)


def cart(call):
    return merge_group("cart", call)


def consensus_merging(call):
    return merge_group("consensus_merging", call)


def lines(call):
    return merge_group("lines", call)


def pcb_merging(call):
    return merge_group("pcb_merging", call)


PAPERS = {
    "tsv_merging": ("Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR 2025, arXiv 2412.00081)",
                    "https://arxiv.org/abs/2412.00081", "TSV-M"),
    "iso_c": ("Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces (ICML 2025, arXiv 2502.04959)",
              "https://arxiv.org/abs/2502.04959", "Iso-C"),
    "iso_cts": ("Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces (ICML 2025, arXiv 2502.04959)",
                "https://arxiv.org/abs/2502.04959", "Iso-CTS"),
    "wudi_merging": ("Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task Vectors (ICML 2025, arXiv 2503.08099)",
                     "https://arxiv.org/abs/2503.08099", "WUDI-merging"),
    "cart": ("Choi et al. 2024, Revisiting Weight Averaging for Model Merging (arXiv 2412.12153)", "https://arxiv.org/abs/2412.12153", "CART"),
    "consensus_merging": ("Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression (ICML 2024, arXiv 2405.07813)",
                          "https://arxiv.org/abs/2405.07813", "Consensus (TALL masks)"),
    "lines": ("Wang et al. 2025, LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging (ICLR 2025, arXiv 2410.17146)",
              "https://arxiv.org/abs/2410.17146", "LiNeS"),
    "pcb_merging": ("Du et al. 2024, Parameter Competition Balancing for Model Merging (NeurIPS 2024, arXiv 2410.02396)",
                    "https://arxiv.org/abs/2410.02396", "PCB-merging"),
}


# methods that are elementwise (stream in flat pieces) when the parameter names one of these bases: consensus
# and LiNeS over task arithmetic (LiNeS's consensus base uses consensus's defaults: task arithmetic); over TIES
# the per-tensor trim threshold needs the whole tensor
ELEMENTWISE_OVER = {"consensus_merging": ("consensus_base", ("task_arithmetic",)),
                    "lines": ("lines_base", ("task_arithmetic", "consensus_merging"))}


def piece_mode(method: str, params: Mapping[str, Any]) -> str:
    """How a large tensor of this frontier method streams: "elementwise" (flat pieces, the same bits as the
    whole tensor) or "whole" (one matrix across the models at a time)."""
    if method in ELEMENTWISE_OVER:
        key, bases = ELEMENTWISE_OVER[method]
        if params.get(key, resolve_parameters(method)[key]) in bases:
            return "elementwise"
    return "whole"


def registry_methods(method_class, parameter_class) -> list:
    """The eight registry entries (kind "group": one output tensor per call, whole tensors, float32), built
    from PARAMETERS so that the registry and the per-tensor functions share one declaration. Every entry
    also takes a per-model `weight`; `--scaling_coefficient` fills SCALE_PARAMETER[method]."""
    entries = []
    for method, declared in PARAMETERS.items():
        paper, url, pretty = PAPERS[method]
        parameters = [parameter_class("weight", float, "non_base", 1.0)]
        for p in declared:
            parameters.append(parameter_class(p.name, p.kind, p.scope, p.default, choices=p.choices,
                                              check=None if p.choices else p.check, requirement=p.requirement))
        entries.append(method_class(method, f"frontier:{method}", paper, url, pretty_name=pretty,
                                    semantics="FusionBench 0.2.33" if method in ("tsv_merging", "iso_c", "iso_cts", "wudi_merging")
                                    else "the authors' code", kind="group", min_models=2, parameters=tuple(parameters),
                                    streaming="frontier" if method in ELEMENTWISE_OVER else "whole",
                                    scale_parameter=SCALE_PARAMETER.get(method),
                                    strict_parameters=True, layer_aware=method == "lines"))
    return entries
