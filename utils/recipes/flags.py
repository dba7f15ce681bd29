"""merge_models.py's method flags as a recipe: one meaning per method name, whichever interface names it.

A flag merge with a mergekit-named method (`--method ties`, `linear`, `dare_ties`, `slerp`, ...) is the
recipe `{merge_method, base_model, models: [{model, parameters}], parameters}` with the flags' values:
FLAG_PARAMETERS declares which flag fills which parameter (per model or global); `--parameter KEY=VALUE`
sets any other parameter the method declares. The paper's own options (DARE, --ties_normalize,
--norm_*, ...) belong to the paper's methods and are refused here, naming the flag.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import yaml

from model_merging_methods.registry import MergeMethod

from .schema import Recipe, RecipeError, parse_recipe

# flag → (parameter name, per model?) for the flags that have a recipe parameter
FLAG_PARAMETERS = {"weights": ("weight", True), "density": ("density", True),
                   "scaling_coefficient": ("lambda", False), "slerp_t": ("t", False)}


@dataclass(frozen=True)
class FlagMerge:
    """The method flags of one merge (values as parsed; None / defaults where not given)."""
    method: MergeMethod
    base_model: Optional[str]
    models: Sequence[str]
    weights: Optional[Sequence[float]] = None
    density: Optional[Sequence[float]] = None
    scaling_coefficient: Optional[float] = None
    slerp_t: Optional[float] = None
    parameters: Sequence[str] = ()            # KEY=VALUE
    dtype: Optional[str] = None               # output dtype


def _per_model(values: Sequence[float], count: int, flag: str) -> list[float]:
    if len(values) == 1:
        return [float(values[0])] * count
    if len(values) != count:
        raise RecipeError(f"--{flag}: got {len(values)} values for {count} models")
    return [float(v) for v in values]


def recipe_from_flags(flags: FlagMerge) -> tuple[Recipe, str]:
    """The recipe these flags describe, and its YAML text (recorded in the output as mergekit_config.yml)."""
    method = flags.method
    inputs = list(flags.models)
    base = flags.base_model
    if base is not None and method.base == "ignored":
        inputs = [base] + inputs      # mergekit: a base of a method that ignores bases is one more input
        base = None
    per_model: dict[str, list[float]] = {}
    top: dict[str, Any] = {}
    for flag, (name, model_scoped) in FLAG_PARAMETERS.items():
        if flag == "scaling_coefficient":
            name = method.scale_parameter or name
        value = getattr(flags, flag)
        if value is None or method.parameter(name) is None:
            continue
        if model_scoped:
            per_model[name] = _per_model(value, len(inputs), flag)
        else:
            top[name] = value
    if method.parameter("weight") is not None and "weight" not in per_model:
        per_model["weight"] = [1.0] * len(inputs)     # mergekit requires weights; flags default to 1 each
    for item in flags.parameters:
        key, sep, text = item.partition("=")
        if not sep or method.parameter(key) is None:
            known = ", ".join(p.name for p in method.parameters) or "none"
            raise RecipeError(f"--parameter {item!r}: {method.name} has no parameter {key!r} (its parameters: {known})")
        top[key] = yaml.safe_load(text)
    document: dict[str, Any] = {"merge_method": method.name}
    if base is not None:
        document["base_model"] = base
    document["models"] = [{"model": model, **({"parameters": {k: v[i] for k, v in per_model.items()}}
                                               if per_model else {})} for i, model in enumerate(inputs)]
    if top:
        document["parameters"] = top
    if flags.dtype:
        document["out_dtype"] = flags.dtype
    text = yaml.safe_dump(document, sort_keys=False)
    return parse_recipe(document, "merge_models.py flags"), text
