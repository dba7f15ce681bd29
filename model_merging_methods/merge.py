"""merge_state_dicts: validation, exclusion, DARE, then the registered method."""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from .dare import dare_one_model, resolve_dare
from .options import DEFAULT_TIE_ORDER, DareOptions, MergeError, MergeOptions, ResolvedDare, StateDict
from .registry import MergeMethod, get_method
from .norm_adaptive import task_vector_norms
from .validation import check_finite, check_inputs, is_excluded, is_finite


def check_dare_base(dare: tuple[ResolvedDare, ...] | None, has_base: bool) -> None:
    """DARE on delta weights drops entries of θ_k − θ_pre, so it needs the base (finetuned_weight does not)."""
    if dare is not None and not has_base and dare[0].weight_format == "delta_weight":
        raise MergeError("DARE on delta weights needs a base (pretrained) model")


def check_method_inputs(method: MergeMethod, has_base: bool, num_models: int, num_statistics: int | None,
                        dare: tuple[ResolvedDare, ...] | None, options: MergeOptions | None = None) -> None:
    """The method's input contract: a base when it needs one, its model count, one statistics dict per model,
    and (given `options`) one weight per model with a non-zero sum where the method divides by it."""
    if method.needs_base and not has_base:
        raise MergeError(f"{method.name} needs a base (pretrained) model")
    check_dare_base(dare, has_base)
    if num_models < method.min_models or (method.max_models and num_models > method.max_models):
        bound = f"{method.min_models}..{method.max_models}" if method.max_models else f">= {method.min_models}"
        raise MergeError(f"{method.name} takes {bound} models, got {num_models}")
    if method.statistics and num_statistics != num_models:
        raise MergeError(f"{method.name} needs one {method.statistics} statistics dict per model")
    if options is not None:
        method.check_weights(options, num_models)


def merge_state_dicts(method: str, base: StateDict | None, models: list[StateDict],
                      options: MergeOptions = MergeOptions(), *, dare: DareOptions | None = None,
                      seed: int = 0, exclude_regex: Sequence[str] = (),
                      statistics: list[StateDict] | None = None,
                      report: list[dict[str, float]] | None = None,
                      out_dtype: torch.dtype | None = None,
                      offsets: dict[str, tuple[int, int]] | None = None,
                      parameters: dict | None = None, tie_order: str = DEFAULT_TIE_ORDER,
                      layers: tuple[dict[str, int], int] | None = None) -> StateDict:
    """Merge `models` (and `base`) with a registered method; DARE, when given, is applied first.

    mergekit's methods (kind "group": `ties`, `linear`, `slerp`, ...) take their parameters as in a recipe:
    `parameters = {name: value}` (a list for a per-model value, one per model in order; the base included
    first for scope "input"), computed in the tensors' dtype; `options`, `dare` and `statistics` are the
    paper methods' and are refused for them. Layer-aware methods (LiNeS) need `layers` = ({tensor name: block
    index ℓ}, depth L), e.g. utils/recipes/architecture.block_layers; tensors absent from the map are outside
    the blocks.

    Merged tensors are computed in float32 and returned in `out_dtype` (default: the reference's
    dtype, i.e. the base's, or models[0]'s without a base).
    Excluded names (re.match on any of `exclude_regex`) and non-float tensors are copied from the
    reference. `report`, when given, receives per model the kept fraction of every DARE'd tensor.
    `offsets[name] = (start, total)` marks a tensor as the flat piece [start, start + n) of a larger
    one (the streaming engine's pieces); only elementwise methods may be given pieces.
    The options are validated and resolved here, once; merge_resolved does the work. Methods that need
    the global task-vector norms (norm_adaptive) get ‖θ_k − θ_pre‖₂ over the merged tensors, before DARE,
    when options.norms is None.
    """
    spec = get_method(method)
    if not models:
        raise MergeError("no models to merge")
    if spec.kind == "group":
        if options != MergeOptions() or dare is not None or statistics is not None:
            raise MergeError(f"{method} is mergekit's method: give its parameters (parameters={{...}}); MergeOptions "
                             f"and DARE are the paper's (average_merging, task_arithmetic, ties_merging, ...)")
        if spec.layer_aware and layers is None:
            raise MergeError(f"{method} scales each tensor by its block's depth: give layers=({{name: block index}}, "
                             f"depth), e.g. from utils/recipes/architecture.block_layers")
        return _merge_group_method(spec, base, models, parameters or {}, seed, exclude_regex, out_dtype, tie_order,
                                   layers or ({}, 1))
    if parameters:
        raise MergeError(f"{method} is a paper method: give MergeOptions, not parameters")
    options.validate()
    resolved, options = resolve_dare(spec, options, dare, len(models))
    check_method_inputs(spec, base is not None, len(models), None if statistics is None else len(statistics),
                        resolved, options)
    if spec.global_norms and options.norms is None:
        check_inputs(base, models, exclude_regex)
        options = replace(options, norms=task_vector_norms(base, models, exclude_regex))
    return merge_resolved(spec, base, models, options, resolved, seed=seed, exclude_regex=exclude_regex,
                          statistics=statistics, report=report, out_dtype=out_dtype, offsets=offsets)


def merge_resolved(spec: MergeMethod, base: StateDict | None, models: list[StateDict], options: MergeOptions,
                   dare: tuple[ResolvedDare, ...] | None, *, seed: int = 0, exclude_regex: Sequence[str] = (),
                   statistics: list[StateDict] | None = None,
                   report: list[dict[str, float]] | None = None,
                   out_dtype: torch.dtype | None = None,
                   offsets: dict[str, tuple[int, int]] | None = None) -> StateDict:
    """merge_state_dicts after its option checks: `options` and `dare` come from resolve_dare (one
    ResolvedDare per model, or None) and the method's input contract holds (check_method_inputs).
    The tensors themselves are still checked here (names, shapes, finiteness): the streaming engine
    calls this once per tensor or piece."""
    reference = base if base is not None else models[0]
    names = [n for n, t in reference.items() if t.is_floating_point() and not is_excluded(n, exclude_regex)]
    check_inputs(base, models, exclude_regex)
    check_finite(None, [{n: t for n, t in reference.items() if n not in names}])
    # private float32 copies: the method functions may reuse their storage
    sub_base = {n: base[n].to(torch.float32, copy=True) for n in names} if base is not None else None
    sub_models = [{n: m[n].to(torch.float32, copy=True) for n in names} for m in models]
    check_finite(sub_base, sub_models)  # on the float32 copies: a float32 sum is cheap, a bfloat16 one is not
    if dare is not None:
        sub_models = _apply_dare(spec, dare, sub_base, sub_models, seed, report, offsets)
    elif spec.on_deltas:
        sub_models = [{n: m[n].sub_(sub_base[n]) for n in names} for m in sub_models]
    merged = spec.implementation()(sub_base, sub_models, options, statistics)
    _check_outputs(merged)
    out = {}
    for name, tensor in reference.items():
        if name in merged:
            out[name] = merged[name].to(out_dtype or tensor.dtype)
        else:
            _check_identical(name, tensor, models)
            out[name] = tensor.to(out_dtype) if out_dtype and tensor.is_floating_point() else tensor
    return out


def _apply_dare(spec: MergeMethod, dare: tuple[ResolvedDare, ...], base: StateDict, models: list[StateDict],
                seed: int, report: list[dict[str, float]] | None,
                offsets: dict[str, tuple[int, int]] | None) -> list[StateDict]:
    """DARE each model with its own resolved setting; returns δ'_k for methods on deltas, else θ'_k."""
    reports = report if report is not None else []
    reports.extend({} for _ in range(len(models) - len(reports)))
    return [dare_one_model(model, base, model_dare, on_deltas=spec.on_deltas, seed=seed, model_index=index,
                           report=reports[index], offsets=offsets)
            for index, (model, model_dare) in enumerate(zip(models, dare))]


def _check_outputs(merged: StateDict) -> None:
    """Finite inputs can still give a non-finite merge (overflow, 0/0 in Fisher weights)."""
    for name, tensor in merged.items():
        if not is_finite(tensor):
            raise MergeError(f"merged tensor {name!r} is Inf/NaN although its inputs are finite")


def _check_identical(name: str, tensor: torch.Tensor, models: list[StateDict]) -> None:
    if tensor.is_floating_point():
        return
    for index, model in enumerate(models):
        if not torch.equal(model[name], tensor):
            raise MergeError(f"non-float tensor {name!r} differs in model {index}; it cannot be merged")


def options_from_parameters(spec: MergeMethod, params: dict, per_input: dict[str, dict],
                            models: list[str]) -> MergeOptions:
    """A paper method's MergeOptions from resolved recipe parameters (MethodParameter.option names the field;
    per-model values become one value per model, in `models` order; unset values keep the defaults)."""
    values: dict = {}
    for parameter in spec.parameters:
        if parameter.option is None:
            continue
        if parameter.scope == "global":
            if params.get(parameter.name) is not None:
                values[parameter.option] = params[parameter.name]
            continue
        given = [per_input[key].get(parameter.name) for key in models]
        if all(value is not None for value in given):
            values[parameter.option] = tuple(given)
    options = MergeOptions(**values)
    options.validate()
    return options


def merge_tensor_group(spec: MergeMethod, name: str, tensors: dict[str, torch.Tensor], base: str | None,
                       options: MergeOptions, dare: tuple[ResolvedDare, ...] | None, *, seed: int = 0,
                       offset: tuple[int, int] | None = None, out_dtype: torch.dtype | None = None,
                       statistics: list[StateDict] | None = None,
                       report: list[dict[str, float]] | None = None) -> torch.Tensor:
    """One output tensor of a paper (kind "state_dict") method: `tensors` maps input id → tensor (the base's
    id is `base`; the others are the models, in order: DARE's draws use that index and `name`).
    `offset = (start, total)` marks a flat piece of a larger tensor (elementwise methods only)."""
    models = [key for key in tensors if key != base]
    merged = merge_resolved(spec, {name: tensors[base]} if base is not None else None,
                            [{name: tensors[key]} for key in models], options, dare, seed=seed, report=report,
                            out_dtype=out_dtype, offsets={name: offset} if offset else None, statistics=statistics)
    return merged[name]


def _merge_group_method(spec: MergeMethod, base: StateDict | None, models: list[StateDict], parameters: dict,
                        seed: int, exclude_regex: Sequence[str], out_dtype: torch.dtype | None,
                        tie_order: str, layers: tuple[dict[str, int], int]) -> StateDict:
    """merge_state_dicts for mergekit's methods: one TensorGroupCall per tensor (inputs: base first)."""
    from .randomness import RandomSlot
    from .recipe_methods import TensorGroupCall, run_group

    if spec.needs_base and base is None:
        raise MergeError(f"{spec.name} needs a base (pretrained) model")
    inputs = ([base] if base is not None else []) + list(models)
    keys = ["base"] * (base is not None) + [f"model {i}" for i in range(len(models))]
    base_key = "base" if base is not None and spec.base != "ignored" else None
    count = len(inputs) - (base_key is not None)
    if count < spec.min_models or (spec.max_models and count > spec.max_models):
        bound = f"{spec.min_models}..{spec.max_models}" if spec.max_models else f">= {spec.min_models}"
        raise MergeError(f"{spec.name} takes {bound} models, got {count}")
    unknown = sorted(set(parameters) - {p.name for p in spec.parameters})
    if unknown:
        raise MergeError(f"{spec.name} has no parameter {unknown[0]!r}; its parameters: "
                         f"{', '.join(p.name for p in spec.parameters)}")

    def value(parameter, index: int | None):
        given = parameters.get(parameter.name)
        if isinstance(given, (list, tuple)):
            scoped = [k for k in keys if parameter.scope == "input" or k != base_key]
            if len(given) != len(scoped):
                raise MergeError(f"{spec.name}: parameter {parameter.name!r} has {len(given)} values for "
                                 f"{len(scoped)} inputs")
            given = given[scoped.index(keys[index])] if index is not None else None
        if given is None:
            if parameter.required:
                raise MergeError(f"{spec.name}: missing required parameter {parameter.name!r}")
            return parameter.default
        return parameter.validate(given, spec.name)

    params = {p.name: value(p, None) for p in spec.parameters if p.scope == "global"}
    per_input = {key: {p.name: value(p, index) for p in spec.parameters
                       if p.scope == "input" or (p.scope == "non_base" and key != base_key)}
                 for index, key in enumerate(keys)}
    check_inputs(base, list(models), exclude_regex)
    check_finite(base, list(models))
    out = {}
    for name, tensor in inputs[0].items():
        if not tensor.is_floating_point() or is_excluded(name, exclude_regex):
            out[name] = tensor
            continue
        slots = {key: RandomSlot(seed, index, name) for index, key in enumerate(keys)} if spec.randomized else {}
        call = TensorGroupCall({key: model[name] for key, model in zip(keys, inputs)}, base_key, params, per_input,
                               slots, tie_order, name=name, layer=layers[0].get(name), num_layers=layers[1])
        out[name] = run_group(spec.implementation(), call).to(out_dtype or tensor.dtype)
    _check_outputs(out)
    return out
