"""Recipe parameter values: scalars, gradients and filtered lists, with mergekit's precedence.

A setting is evaluated for one tensor name at one position t ∈ [0, 1] of its slice:
- a scalar is itself;
- a gradient (list of numbers) is interpolated piecewise-linearly at t·(len − 1); a list whose values are
  not all numbers (after coercion to the parameter's type, e.g. booleans) picks element int(t·(len − 1));
- a conditional list `[{filter, value}, ...]`: the first entry whose filter is a substring of the tensor
  name (no filter, or "*", matches everything) gives the value (itself a scalar or a gradient); no match
  means "not set here".
Precedence, highest first: the source's (model's) own parameters → the slice's → the top level's → the
method's default; a parameter still unset and without a default is an error naming model and tensor.
Tensors outside the layers (embeddings, final norm, lm_head) are evaluated at t = 0, as mergekit does.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from model_merging_methods.options import MethodParameter as RecipeParameter

from .schema import RecipeError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate_setting(setting: Any, tensor_name: str, t: float, parameter: RecipeParameter, where: str) -> Any:
    """The value of one setting for `tensor_name` at `t`, coerced to the parameter's type (None = unset)."""
    validate = lambda value: _validate(parameter, value, where)  # noqa: E731
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if isinstance(setting, list):
        if all(isinstance(v, (bool, int, float, str)) for v in setting):
            values = [validate(v) for v in setting]
            if not all(_is_number(v) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            low = int(scaled)
            high = min(len(values) - 1, low + 1)
            fraction = scaled - low
            return validate((1 - fraction) * values[low] + fraction * values[high])
        for condition in setting:
            filt = condition.get("filter")
            if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
                return evaluate_setting(condition["value"], tensor_name, t, parameter, where)
        return None
    raise RecipeError(f"{where}: unexpected setting {setting!r}")


def _validate(parameter: RecipeParameter, value: Any, where: str) -> Any:
    try:
        return parameter.validate(value, where)
    except ValueError as error:
        raise RecipeError(str(error)) from None


def resolve(parameter: RecipeParameter, scopes: Iterable[tuple[str, Optional[dict]]], *, tensor_name: str,
            t: float, model: str | None = None) -> Any:
    """First value set in `scopes` ((key path, parameters) from highest to lowest precedence), else the
    default; a required parameter with no value raises a RecipeError naming model and tensor."""
    for path, settings in scopes:
        if settings is not None and parameter.name in settings:
            value = evaluate_setting(settings[parameter.name], tensor_name, t, parameter,
                                     f"{path}.{parameter.name}")
            if value is not None:
                return value
    if parameter.required:
        whose = f"model {model!r}, " if model is not None else ""
        raise RecipeError(f"missing required parameter {parameter.name!r} for {whose}tensor {tensor_name!r}")
    return parameter.default
