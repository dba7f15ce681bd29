"""The one registry of merge methods: name → function, paper, semantics, parameters and capabilities.

Every name means one thing in every interface (merge_models.py flags, recipes, the library):
- mergekit's names (`linear`, `ties`, `dare_ties`, `dare_linear`, `slerp`, `breadcrumbs`, `breadcrumbs_ties`,
  `della`, `della_linear`, `model_stock`, `nearswap`, `passthrough`, `nuslerp`, `multislerp`, `karcher`, `sce`,
  `arcee_fusion`, `ram`, `ramplus_tl`) carry mergekit 0.1.5's semantics and defaults (recipe_methods.py: computed in the load dtype, mergekit's parameters);
- the paper's names (`average_merging`, `task_arithmetic`, `ties_merging`, `fisher_merging`,
  `regmean_merging`, `dare`) carry MergeLM's semantics (float32 arithmetic, the paper's DARE before any
  of them); `norm_adaptive` is the task-vector toolkits' adaptive merge, computed the same way.
  `task_arithmetic` is both MergeLM's and mergekit's name for θ_pre + λ Σ w_k δ_k; it keeps MergeLM's float32
  arithmetic (the same bits as mergekit's on float32 inputs; on bfloat16 it rounds once, at the end).
Functions are named as ``"module:function"`` inside this package and imported on first call, so that
listing methods and checking a job's options needs no torch (entry scripts answer --help at once).

How to add a method (what a new entry declares, and how it streams)
-------------------------------------------------------------------
1. Write a pure function in a new file of this package (no I/O, no global state; docstring = the formula).
   Pick one of the two calling conventions, and set ``kind`` accordingly:
   - ``kind="group"`` (preferred for new methods): ``f(call: TensorGroupCall) -> Tensor`` merges ONE output
     tensor. ``call.tensors`` maps input id → tensor (recipe order, the base included when ``base`` is
     "required"), already in the compute (load) dtype; ``call.base`` is the base's id; ``call.params`` the
     resolved global parameters, ``call.per_input[id]`` the per-input ones; ``call.slots[id]`` the input's
     RandomSlot when ``randomized`` (draws must depend only on seed, input index, tensor name, position).
     Return the merged tensor (any float dtype: the executor casts it to the output dtype).
   - ``kind="state_dict"`` (the paper's methods): ``f(base, models, options, statistics) -> {name: tensor}``
     over private float32 copies (merge.merge_resolved makes them and applies the paper's DARE first);
     ``on_deltas`` methods receive δ_k = θ_k − θ_pre instead of θ_k; options come from MergeOptions.
2. Declare its parameters (``parameters``: MethodParameter(name, type, scope, default[, option])): these
   are the recipe keys (per input: scope "input" / "non_base"; per tensor: "global"), and the flags map
   onto them (merge_models.py: --weights → weight, --density → density, --scaling_coefficient → lambda,
   --slerp_t → t, --parameter KEY=VALUE → anything else). For kind "state_dict", ``option`` names the
   MergeOptions field the value fills.
3. Declare its input contract: ``base`` ("required"; "ignored": a given base is one more input, as
   mergekit's linear; "optional": used for DARE's deltas only), ``min_models`` / ``max_models`` (inputs
   other than a required base).
4. Declare how it streams (the executor, utils/engine/streaming.py, decides from this alone):
   kind "group": ``streaming`` = "elementwise" (each output entry depends only on the same entry of the
   inputs: large tensors merge in independent flat pieces), "gta" / "slerp" (pieces after whole-tensor
   statistics: see piece_mode) or "whole" (the whole tensor at once; memory = a few tensors). A new
   method that is not elementwise declares "whole" unless it adds its statistics pass to
   utils/engine/statistics.py. ``missing_tensor`` says what happens when some inputs lack an optional tensor.
   kind "state_dict": ``elementwise`` (pieces), ``trim_thresholds`` (TIES: a streamed radix-selection pass
   first), ``global_norms`` (a first pass over the whole model), ``streamable=False`` (never streams).
5. Add the entry to ``_METHODS`` below, a closed-form test on tiny tensors, and a flags == recipe test
   (tests/test_one_registry.py iterates over every registered name).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

from .options import DEFAULT_TIE_ORDER, MergeError, MergeOptions, MethodParameter, ResolvedDare


@dataclass(frozen=True)
class Noop:
    """Settings under which a method is an exact no-op of a simpler one: the message names the flag to set.
    ``error``: refused unless the caller allows no-ops."""
    message: str
    error: bool = False


NoopPredicate = Callable[[MergeOptions, "tuple[ResolvedDare, ...] | None", int], "Noop | None"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable | str             # the function, or "module:function" in this package (lazy)
    paper: str
    url: str = ""
    pretty_name: str = ""
    semantics: str = "MergeLM"           # whose definition the name carries: "MergeLM" | "mergekit 0.1.5" | ...
    kind: str = "state_dict"             # "state_dict" (paper's convention) | "group" (one output tensor)
    base: str = "required"               # "required" | "optional" (DARE's deltas only) | "ignored" (one more input)
    min_models: int = 1                  # inputs other than a required base
    max_models: int | None = None
    parameters: tuple[MethodParameter, ...] = ()
    # kind "group" (mergekit's methods)
    accumulate_fp32: bool = False        # linear/slerp: float32 accumulator, result in the input dtype
    randomized: bool = False             # masks drawn per tensor from (seed, input, tensor name)
    missing_tensor: str = "error"        # "error" | "passthrough_singleton" | "passthrough_base_singleton" | "base_or_skip"
    streaming: str = "whole"             # "elementwise" | "whole" | "gta" | "slerp" | "ramplus" | "frontier" (piece_mode)
    sparsification: str | None = None    # GTA methods: None | "magnitude" | "outliers" | "random" | "della"
    float32_result: bool = False         # mergekit returns float32 for narrower compute (saved so unless out_dtype)
    # kind "state_dict" (the paper's methods)
    statistics: str | None = None        # "fisher" | "gram": per-model statistics the method needs
    streamable: bool = True              # can run one tensor at a time
    elementwise: bool = False            # each output entry depends only on the same entry of the inputs
    trim_thresholds: bool = False        # TIES trim: takes per-tensor trim thresholds (statistics) when density < 1
    on_deltas: bool = False              # the function receives task vectors δ_k = θ_k − θ_pre instead of θ_k
    options_used: tuple[str, ...] = ()   # MergeOptions fields the method reads (recorded in manifests)
    weights_normalized: bool = False     # divides by Σ w_k: weights summing to 0 are refused
    noop_when: NoopPredicate | None = None   # (resolved options, resolved DARE, models) → Noop or None
    global_norms: bool = False           # needs options.norms = the whole-model ‖δ_k‖₂ (computed when not given)
    scale_parameter: str | None = "lambda"   # the parameter merge_models.py --scaling_coefficient fills
    strict_parameters: bool = False      # a recipe parameter the method does not declare is an error, not a warning
    layer_aware: bool = False            # kind "group": the call carries the tensor's block index and the depth

    def implementation(self) -> Callable:
        """The method's function (imported on first use when registered by name)."""
        if callable(self.function):
            return self.function
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(f".{module}", __package__), attribute)

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def paper_dare(self) -> bool:
        """The paper's DARE (drop rate, strategy, rescale, weight format) may precede this method: every method
        that takes a base (a paper method drops inside its float32 merge; any other merges the DARE'd inputs,
        θ'_k = θ_pre + DARE(θ_k − θ_pre) rounded to θ_k's dtype, what dare_state_dict writes for model k),
        not one that treats a base as one more input."""
        return self.kind == "state_dict" or self.base != "ignored"

    def parameter(self, name: str) -> MethodParameter | None:
        return next((p for p in self.parameters if p.name == name), None)

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

    def piece_mode(self, params: dict, per_input: dict[str, dict], tie_order: str = DEFAULT_TIE_ORDER) -> str:
        """kind "group": how a large tensor can stream: "elementwise" (flat pieces merged independently),
        "statistics" (flat pieces, once whole-tensor statistics are known: each input's RankCut rule for
        magnitude / outlier cuts with tie_order "index" and L1 rescale factor; slerp's norms and dot
        product), or "whole"."""
        if self.streaming in ("slerp", "ramplus"):
            return "statistics"                      # slerp's norms and dot product; ramplus_tl's counts
        if self.streaming == "frontier":
            from .frontier import piece_mode
            return piece_mode(self.name, params)
        if self.streaming != "gta":
            return self.streaming
        if all(values.get("density", 1.0) >= 1 for values in per_input.values()):
            return "elementwise"                     # nothing is sparsified
        if self.sparsification == "random":
            return "statistics" if params.get("rescale") else "elementwise"   # draws depend on position only
        if self.sparsification in ("magnitude", "outliers") and tie_order == "index":
            return "statistics"
        return "whole"                               # della's per-row ranks; torch.argsort's tie order


def _no_drop(dare: Sequence[ResolvedDare] | None) -> bool:
    return dare is None or not any(d.drop_rate for d in dare)


def _ties_noop(options: MergeOptions, dare, num_models: int) -> Noop | None:
    if all(d == 1.0 for d in options.densities(num_models)):
        return Noop("ties_merging with density 1 trims nothing (sign election and disjoint mean only); "
                    "set --density below 1 (the paper keeps 0.2) to trim")
    return None


def _dare_single_noop(options: MergeOptions, dare, num_models: int) -> Noop | None:
    if _no_drop(dare):
        return Noop("dare with --drop_rate 0 drops nothing: the output is the model as it is; set --drop_rate")
    return None


P = MethodParameter
# the paper's methods: recipe keys → MergeOptions fields
_WEIGHT = P("weight", float, "non_base", 1.0, option="weights")
_LAMBDA = P("lambda", float, "global", 1.0, option="scaling_coefficient")
_DENSITY = P("density", float, "non_base", 1.0, option="density")
# mergekit's GTA parameters and defaults
GTA_PARAMETERS = (P("int8_mask", bool, default=False), P("lambda", float, default=1.0),
                  P("weight", float, "non_base"), P("density", float, "non_base", 1.0))
GAMMA = (P("gamma", float, "non_base", 0.01),)
EPSILON = (P("epsilon", float, "non_base", 0.15),)


def gta_parameters(normalize: bool, rescale: bool, extra: tuple = ()) -> tuple[MethodParameter, ...]:
    return (P("normalize", bool, default=normalize), P("rescale", bool, default=rescale)) + GTA_PARAMETERS + extra


def _gta(name: str, pretty: str, paper: tuple[str, str], sparsification: str | None, consensus: bool,
         normalize: bool, rescale: bool, extra: tuple = ()) -> MergeMethod:
    return MergeMethod(name, f"recipe_methods:gta_{name}", *paper, pretty_name=pretty, semantics="mergekit 0.1.5",
                       kind="group", parameters=gta_parameters(normalize, rescale, extra),
                       randomized=sparsification in ("random", "della"), streaming="gta",
                       sparsification=sparsification)


_SOUPS = ("Wortsman et al. 2022, Model soups (arXiv 2203.05482)", "https://arxiv.org/abs/2203.05482")
_TA = ("Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)", "https://arxiv.org/abs/2212.04089")
_TIES = ("Yadav et al. 2023, TIES-Merging (arXiv 2306.01708)", "https://arxiv.org/abs/2306.01708")
_DARE = ("Yu et al. 2024, Language Models are Super Mario / DARE (arXiv 2311.03099)", "https://arxiv.org/abs/2311.03099")
_CRUMBS = ("Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795)", "https://arxiv.org/abs/2312.06795")
_DELLA = ("Deep et al. 2024, DELLA-Merging (arXiv 2406.11617)", "https://arxiv.org/abs/2406.11617")
_MK = "mergekit 0.1.5"

_METHODS = [
    # ---- the paper's methods (MergeLM semantics: float32, the paper's DARE first)
    MergeMethod("average_merging", "linear:average_merging", *_SOUPS, pretty_name="Average merging", base="optional",
                parameters=(_WEIGHT,), elementwise=True, options_used=("weights",), weights_normalized=True),
    MergeMethod("task_arithmetic", "linear:task_arithmetic", *_TA, pretty_name="Task arithmetic",
                parameters=(_WEIGHT, _LAMBDA), elementwise=True, on_deltas=True,
                options_used=("weights", "scaling_coefficient")),
    MergeMethod("ties_merging", "ties:ties_merging", *_TIES, pretty_name="TIES-Merging (MergeLM)",
                parameters=(_WEIGHT, _LAMBDA, _DENSITY,
                            P("ties_normalize", str, "global", "count", "ties_normalize", ("count", "weights"))),
                elementwise=True, trim_thresholds=True, on_deltas=True,
                options_used=("weights", "scaling_coefficient", "density", "ties_trim", "ties_normalize"),
                noop_when=_ties_noop),
    MergeMethod("fisher_merging", "fisher_regmean:fisher_merging",
                "Matena & Raffel 2022, Fisher merging (arXiv 2111.09832)", "https://arxiv.org/abs/2111.09832",
                pretty_name="Fisher merging", base="optional", statistics="fisher", streamable=False,
                options_used=("fisher_coefficients", "fisher_normalize", "fisher_eps")),
    MergeMethod("regmean_merging", "fisher_regmean:regmean_merging", "Jin et al. 2023, RegMean (arXiv 2212.09849)",
                "https://arxiv.org/abs/2212.09849", pretty_name="RegMean", base="optional", statistics="gram",
                options_used=("regmean_alpha",)),
    MergeMethod("norm_adaptive", "norm_adaptive:norm_adaptive_merging",
                "task-vector toolkits' adaptive merge: task arithmetic weighted by a decreasing function of ‖δ_k‖₂",
                pretty_name="Norm-adaptive task arithmetic", semantics="task-vector toolkits",
                parameters=(_LAMBDA, P("norm_mode", str, "global", "exp", "norm_mode", ("linear", "power", "exp")),
                            P("norm_alpha", float, "global", 1.5, "norm_alpha"),
                            P("norm_beta", float, "global", 1.0, "norm_beta"),
                            P("norm", float, "non_base", None, "norms")),
                elementwise=True, on_deltas=True, global_norms=True,
                options_used=("scaling_coefficient", "norm_mode", "norm_alpha", "norm_beta", "norms")),
    MergeMethod("dare", "linear:passthrough_single", "Yu et al. 2024, DARE on a single model (arXiv 2311.03099)",
                _DARE[1], pretty_name="DARE (one model)", max_models=1, elementwise=True, noop_when=_dare_single_noop),
    # ---- mergekit's methods (mergekit 0.1.5 semantics and defaults: computed in the load dtype)
    MergeMethod("linear", "recipe_methods:linear", *_SOUPS, pretty_name="Linear", semantics=_MK, kind="group",
                base="ignored", parameters=(P("weight", float, "input"), P("normalize", bool, default=True)),
                accumulate_fp32=True, streaming="elementwise"),
    MergeMethod("slerp", "recipe_methods:slerp", "Shoemake 1985, spherical linear interpolation",
                "https://en.wikipedia.org/wiki/Slerp", pretty_name="SLERP", semantics=_MK, kind="group",
                max_models=1, parameters=(P("t", float),), accumulate_fp32=True,
                missing_tensor="passthrough_singleton", streaming="slerp"),
    _gta("ties", "TIES", _TIES, "magnitude", True, True, False),
    _gta("dare_ties", "DARE TIES", _DARE, "random", True, False, True),
    _gta("dare_linear", "Linear DARE", _DARE, "random", False, False, True),
    _gta("breadcrumbs", "Model Breadcrumbs", _CRUMBS, "outliers", False, False, False, GAMMA),
    _gta("breadcrumbs_ties", "Model Breadcrumbs with TIES", _CRUMBS, "outliers", True, False, False, GAMMA),
    _gta("della", "DELLA", _DELLA, "della", True, True, True, EPSILON),
    _gta("della_linear", "Linear DELLA", _DELLA, "della", False, False, True, EPSILON),
    MergeMethod("model_stock", "recipe_methods:model_stock", "Jang et al. 2024, Model Stock (arXiv 2403.19522)",
                "https://arxiv.org/abs/2403.19522", pretty_name="Model Stock", semantics=_MK, kind="group",
                min_models=2, parameters=(P("filter_wise", bool, default=False),), missing_tensor="base_or_skip"),
    MergeMethod("nearswap", "recipe_methods:nearswap", "NearSwap (model card of alchemonaut/QuartetAnemoi-70B)",
                "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", pretty_name="NearSwap", semantics=_MK,
                kind="group", max_models=1, parameters=(P("t", float),),
                missing_tensor="passthrough_base_singleton", streaming="elementwise"),
    MergeMethod("passthrough", "recipe_methods:passthrough", "copies its single input (layer stacking)",
                pretty_name="Passthrough", semantics=_MK, kind="group", base="ignored", max_models=1,
                parameters=(P("scale", float, "input", None),), streaming="elementwise"),
]
_SCE = ("Wan et al. 2024, FuseChat: SCE merging (arXiv 2408.07990)", "https://arxiv.org/abs/2408.07990")
_RAM = ("Reinforced Agent Merging (arXiv 2601.13572)", "https://arxiv.org/abs/2601.13572")
_METHODS += [
    # mergekit 0.1.5's remaining methods (mergekit_spherical.py, mergekit_consensus.py)
    MergeMethod("nuslerp", "mergekit_spherical:nuslerp", "mergekit's NuSLERP (slerp of two models or task vectors, "
                "optionally per row)", "https://github.com/arcee-ai/mergekit", pretty_name="NuSLERP", semantics=_MK,
                kind="group", base="optional", min_models=2, max_models=2,
                parameters=(P("weight", float, "non_base"), P("nuslerp_row_wise", bool, default=False),
                            P("nuslerp_flatten", bool, default=True)), missing_tensor="passthrough_singleton"),
    MergeMethod("multislerp", "mergekit_spherical:multislerp", "Goddard 2025, Multi-SLERP (barycentric "
                "interpolation on the hypersphere)", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
                pretty_name="Multi-SLERP", semantics=_MK, kind="group", base="optional",
                parameters=(P("weight", float, "non_base"), P("normalize_weights", bool, default=True),
                            P("eps", float, default=1e-8))),
    MergeMethod("karcher", "mergekit_spherical:karcher", "Karcher mean on the hypersphere (arXiv 2603.04972)",
                "https://arxiv.org/abs/2603.04972", pretty_name="Karcher Mean", semantics=_MK, kind="group",
                base="ignored", parameters=(P("max_iter", int, default=10), P("tol", float, default=1e-5))),
    MergeMethod("sce", "mergekit_consensus:sce", *_SCE, pretty_name="SCE", semantics=_MK, kind="group",
                parameters=(P("int8_mask", bool, default=False), P("select_topk", float, default=1.0))),
    MergeMethod("arcee_fusion", "mergekit_consensus:arcee_fusion", "Arcee Fusion (mergekit; dynamic-threshold "
                "importance selection)", "https://arcee.ai", pretty_name="Arcee Fusion", semantics=_MK, kind="group",
                max_models=1, missing_tensor="passthrough_singleton", float32_result=True),
    MergeMethod("ram", "mergekit_consensus:ram", *_RAM, pretty_name="Reinforced Agent Merging", semantics=_MK,
                kind="group", parameters=(P("epsilon", float, default=1e-5),), streaming="elementwise"),
    MergeMethod("ramplus_tl", "mergekit_consensus:ramplus_tl", *_RAM,
                pretty_name="Reinforced Agent Merging Plus (Tensor-Local)", semantics=_MK, kind="group",
                parameters=(P("r", float, default=0.1), P("alpha", float, default=0.2), P("epsilon", float, default=1e-5)),
                float32_result=True, streaming="ramplus"),
]
# ---- the data-free frontier (2024–2025): FusionBench's / the authors' semantics, one matrix at a time (frontier.py)
from .frontier import registry_methods  # noqa: E402  (torch-free: the declarations only)

_METHODS += registry_methods(MergeMethod, MethodParameter)
REGISTRY: dict[str, MergeMethod] = {method.name: method for method in _METHODS}


def register(method: MergeMethod) -> None:
    """Add a method (a new name: one name, one meaning)."""
    if method.name in REGISTRY:
        raise MergeError(f"merge method {method.name!r} is already registered")
    REGISTRY[method.name] = method


def available_methods() -> list[str]:
    return sorted(REGISTRY)


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; an unknown name lists the valid ones."""
    method = REGISTRY.get(name)
    if method is None:
        raise MergeError(f"unknown merge method {name!r}; valid: {', '.join(available_methods())}")
    return method
