"""merge_state_dicts: validation, exclusion, DARE, then the registered method."""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from .dare import dare_one_model, resolve_dare
from .options import DareOptions, MergeError, MergeOptions, ResolvedDare, StateDict
from .registry import MergeMethod, get_method
from .norm_adaptive import task_vector_norms
from .validation import check_finite, check_inputs, is_excluded, is_finite


def check_method_inputs(method: MergeMethod, has_base: bool, num_models: int, num_statistics: int | None,
                        dare: tuple[ResolvedDare, ...] | None, options: MergeOptions | None = None) -> None:
    """The method's input contract: a base when it needs one, its model count, one statistics dict per model,
    and (given `options`) one weight per model with a non-zero sum where the method divides by it."""
    if method.needs_base and not has_base:
        raise MergeError(f"{method.name} needs a base (pretrained) model")
    if dare is not None and not has_base and dare[0].weight_format == "delta_weight":
        raise MergeError("DARE on delta weights needs a base (pretrained) model")
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
                      offsets: dict[str, tuple[int, int]] | None = None) -> StateDict:
    """Merge `models` (and `base`) with a registered method; DARE, when given, is applied first.

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
    options.validate()
    if not models:
        raise MergeError("no models to merge")
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
