"""The recipe namespace of the registry: mergekit's method names with mergekit's semantics.

`get_method` (registry.py) keeps serving merge_models.py's --method names (the paper's methods and their
aliases: `ties` → the paper's ties_merging). A recipe's `merge_method` is looked up here instead, so
`merge_method: ties` means mergekit's TIES. Each entry carries the capabilities callers branch on:
the base-model policy, the input counts, the parameters (scope, default, required), the compute dtype
rule, whether masks are random, and what happens when an optional tensor is missing from some inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import mergekit_consensus as mc
from . import mergekit_spherical as ms
from . import recipe_methods as rm
from .options import MergeError
from .recipe_methods import RecipeParameter, TensorGroupCall


@dataclass(frozen=True)
class RecipeMethod:
    name: str
    function: Callable[[TensorGroupCall], torch.Tensor]
    pretty_name: str
    paper: str
    url: str
    base: str = "required"            # "required" | "ignored" (a given base is one more input) | "optional"
    min_inputs: int = 1               # counting the base
    max_inputs: int | None = None
    min_non_base: int = 0             # inputs other than the base (mergekit's min_non_base / max_non_base)
    max_non_base: int | None = None
    parameters: tuple[RecipeParameter, ...] = ()
    accumulate_fp32: bool = False     # linear/slerp: float32 accumulator, result in the input dtype
    randomized: bool = False          # masks drawn per tensor from (seed, input, tensor name)
    missing_tensor: str = "error"     # "error" | "passthrough_singleton" | "passthrough_base_singleton" | "base_or_skip"
    streaming: str = "whole"          # "elementwise" (each output entry depends only on the same entry of the
                                      # inputs: flat pieces merge separately), "whole", or "gta" / "slerp"
                                      # / "ramplus" (pieces once whole-tensor statistics are known: see piece_mode)
    sparsification: Optional[str] = None   # GTA methods: None | "magnitude" | "outliers" | "random" | "della"
    float32_result: bool = False      # mergekit returns float32 for narrower compute (saved so unless out_dtype)

    def parameter(self, name: str) -> RecipeParameter | None:
        return next((p for p in self.parameters if p.name == name), None)

    def piece_mode(self, params: dict, per_input: dict[str, dict], tie_order: str = "index") -> str:
        """How a large tensor of this method can stream: "elementwise" (flat pieces merged independently),
        "statistics" (flat pieces, once whole-tensor statistics are known: each input's RankCut rule for
        magnitude / outlier cuts with tie_order "index" and L1 rescale factor; slerp's norms and dot
        product), or "whole"."""
        if self.streaming in ("slerp", "ramplus"):
            return "statistics"                      # slerp's norms and dot product; ramplus_tl's counts
        if self.streaming != "gta":
            return self.streaming
        if all(values.get("density", 1.0) >= 1 for values in per_input.values()):
            return "elementwise"                     # nothing is sparsified
        if self.sparsification == "random":
            return "statistics" if params.get("rescale") else "elementwise"   # draws depend on position only
        if self.sparsification in ("magnitude", "outliers") and tie_order == "index":
            return "statistics"
        return "whole"                               # della's per-row ranks; torch.argsort's tie order


def _gta(name: str, pretty: str, paper: str, url: str, sparsification: str | None, consensus: bool,
         normalize: bool, rescale: bool, extra: tuple = ()) -> RecipeMethod:
    return RecipeMethod(name, rm.gta(rm.GtaVariant(sparsification, consensus)), pretty, paper, url,
                        parameters=rm.gta_parameters(normalize, rescale, extra),
                        randomized=sparsification in ("random", "della"), streaming="gta",
                        sparsification=sparsification)


_TA = ("Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)", "https://arxiv.org/abs/2212.04089")
_TIES = ("Yadav et al. 2023, TIES-Merging (arXiv 2306.01708)", "https://arxiv.org/abs/2306.01708")
_DARE = ("Yu et al. 2024, Language Models are Super Mario / DARE (arXiv 2311.03099)", "https://arxiv.org/abs/2311.03099")
_CRUMBS = ("Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795)", "https://arxiv.org/abs/2312.06795")
_DELLA = ("Deep et al. 2024, DELLA-Merging (arXiv 2406.11617)", "https://arxiv.org/abs/2406.11617")

_SCE = ("Wan et al. 2024, FuseChat: SCE merging (arXiv 2408.07990)", "https://arxiv.org/abs/2408.07990")
_RAM = ("Reinforced Agent Merging (arXiv 2601.13572)", "https://arxiv.org/abs/2601.13572")
P = RecipeParameter

_METHODS = [
    RecipeMethod("linear", rm.linear, "Linear", "Wortsman et al. 2022, Model soups (arXiv 2203.05482)",
                 "https://arxiv.org/abs/2203.05482", base="ignored",
                 parameters=(RecipeParameter("weight", float, "input"), RecipeParameter("normalize", bool, default=True)),
                 accumulate_fp32=True, streaming="elementwise"),
    RecipeMethod("slerp", rm.slerp, "SLERP", "Shoemake 1985, spherical linear interpolation",
                 "https://en.wikipedia.org/wiki/Slerp", min_inputs=2, max_inputs=2,
                 parameters=(RecipeParameter("t", float),), accumulate_fp32=True,
                 missing_tensor="passthrough_singleton", streaming="slerp"),
    _gta("task_arithmetic", "Task Arithmetic", *_TA, None, False, False, False),
    _gta("ties", "TIES", *_TIES, "magnitude", True, True, False),
    _gta("dare_ties", "DARE TIES", *_DARE, "random", True, False, True),
    _gta("dare_linear", "Linear DARE", *_DARE, "random", False, False, True),
    _gta("breadcrumbs", "Model Breadcrumbs", *_CRUMBS, "outliers", False, False, False, rm.GAMMA),
    _gta("breadcrumbs_ties", "Model Breadcrumbs with TIES", *_CRUMBS, "outliers", True, False, False, rm.GAMMA),
    _gta("della", "DELLA", *_DELLA, "della", True, True, True, rm.EPSILON),
    _gta("della_linear", "Linear DELLA", *_DELLA, "della", False, False, True, rm.EPSILON),
    RecipeMethod("model_stock", rm.model_stock, "Model Stock", "Jang et al. 2024, Model Stock (arXiv 2403.19522)",
                 "https://arxiv.org/abs/2403.19522", min_inputs=3,
                 parameters=(RecipeParameter("filter_wise", bool, default=False),), missing_tensor="base_or_skip"),
    RecipeMethod("nearswap", rm.nearswap, "NearSwap", "NearSwap (model card of alchemonaut/QuartetAnemoi-70B)",
                 "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", min_inputs=2, max_inputs=2,
                 parameters=(RecipeParameter("t", float),), missing_tensor="passthrough_base_singleton",
                 streaming="elementwise"),
    RecipeMethod("passthrough", rm.passthrough, "Passthrough", "copies its single input (layer stacking)", "",
                 base="ignored", max_inputs=1, parameters=(RecipeParameter("scale", float, "input", None),),
                 streaming="elementwise"),
    # mergekit 0.1.5's remaining methods (model_merging_methods/mergekit_spherical.py, mergekit_consensus.py)
    RecipeMethod("nuslerp", ms.nuslerp, "NuSLERP", "mergekit's NuSLERP (slerp of two models or task vectors, "
                 "optionally per row)", "https://github.com/arcee-ai/mergekit", base="optional",
                 min_non_base=2, max_non_base=2,
                 parameters=(P("weight", float, "non_base"), P("nuslerp_row_wise", bool, default=False),
                             P("nuslerp_flatten", bool, default=True)), missing_tensor="passthrough_singleton"),
    RecipeMethod("multislerp", ms.multislerp, "Multi-SLERP", "Goddard 2025, Multi-SLERP (barycentric "
                 "interpolation on the hypersphere)", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
                 base="optional", min_non_base=1,
                 parameters=(P("weight", float, "non_base"), P("normalize_weights", bool, default=True),
                             P("eps", float, default=1e-8))),
    RecipeMethod("karcher", ms.karcher, "Karcher Mean", "Karcher mean on the hypersphere (arXiv 2603.04972)",
                 "https://arxiv.org/abs/2603.04972", base="ignored",
                 parameters=(P("max_iter", int, default=10), P("tol", float, default=1e-5))),
    RecipeMethod("sce", mc.sce, "SCE", *_SCE,
                 parameters=(P("int8_mask", bool, default=False), P("select_topk", float, default=1.0))),
    RecipeMethod("arcee_fusion", mc.arcee_fusion, "Arcee Fusion", "Arcee Fusion (mergekit; dynamic-threshold "
                 "importance selection)", "https://arcee.ai", min_inputs=2, max_inputs=2,
                 missing_tensor="passthrough_singleton", float32_result=True),
    RecipeMethod("ram", mc.ram, "Reinforced Agent Merging", *_RAM, parameters=(P("epsilon", float, default=1e-5),),
                 streaming="elementwise"),
    RecipeMethod("ramplus_tl", mc.ramplus_tl, "Reinforced Agent Merging Plus (Tensor-Local)", *_RAM,
                 parameters=(P("r", float, default=0.1), P("alpha", float, default=0.2),
                             P("epsilon", float, default=1e-5)), float32_result=True, streaming="ramplus"),
]
RECIPE_METHODS: dict[str, RecipeMethod] = {method.name: method for method in _METHODS}


def get_recipe_method(name: str) -> RecipeMethod:
    """A recipe's merge_method (mergekit's name and semantics); an unknown name lists the valid ones."""
    method = RECIPE_METHODS.get(name)
    if method is None:
        raise MergeError(f"unknown merge_method {name!r}; valid: {', '.join(sorted(RECIPE_METHODS))}")
    return method
