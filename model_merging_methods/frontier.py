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
             _P("scaling_factor", float, 1.0, help=_SCALE + " λ (our default; the paper tunes it)")),
    "consensus_merging": (_P("tall_mask_lambda", float, 0.6, _nonnegative, "≥ 0", "λ of the TALL masks (FusionBench default 0.6)"),
                          _P("prun_thre_k", int, 2, _nonnegative, "≥ 0", "tasks a weight must serve to be kept (paper: 2)"),
                          _P("scaling_factor", float, 1.0, help=_SCALE + " α"),
                          _P("consensus_base", str, "task_arithmetic", choices=("task_arithmetic", "ties_merging"),
                             help="multi-task vector the masks are built from and applied to (our name)"),
                          _P("density", float, 0.2, _fraction, "in (0, 1]", "TIES density when consensus_base is ties_merging")),
    "lines": (_P("alpha", float, None, _finite, "a finite number",
                 "scale of the first block and of non-block tensors (default: the authors' ‖Στ‖/(T‖τ_MTL‖), 1/T on task arithmetic)"),
              _P("beta", float, 1.0, help=_SCALE + ": added scale of the last block over the first"),
              _P("lines_base", str, "task_arithmetic", choices=("task_arithmetic", "ties_merging", "consensus_merging"),
                 help="method giving τ_MTL (our name)"),
              _P("density", float, 0.2, _fraction, "in (0, 1]", "TIES density when lines_base is ties_merging")),
    "pcb_merging": (_P("pcb_ratio", float, 0.1, _fraction, "in (0, 1]", "kept share of each task's balanced scores (authors' default)"),
                    _P("scaling_factor", float, 1.0, help=_SCALE + " λ")),
}
SCALE_PARAMETER = {"tsv_merging": "alpha", "iso_c": "scaling_factor", "iso_cts": "scaling_factor", "cart": "scaling_factor",
                   "consensus_merging": "scaling_factor", "lines": "beta", "pcb_merging": "scaling_factor"}
FRONTIER_METHODS = tuple(PARAMETERS)


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
        return subspace.cart_tensor(deltas, params["rank_ratio"], params["scaling_factor"], what)
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
            mtl = consensus.consensus_tensor(deltas, **{k: v for k, v in resolve_parameters("consensus_merging").items()
                                                        if k not in ("scaling_factor",)}, scaling_factor=1.0)
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
