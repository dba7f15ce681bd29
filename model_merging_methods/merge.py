"""merge_state_dicts: validation, exclusion, DARE, then the registered method."""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from .dare import dare_tensors, dare_model, is_excluded
from .options import DareOptions, MergeError, MergeOptions, StateDict
from .registry import MergeMethod, get_method


def is_finite(tensor: torch.Tensor) -> bool:
    """NaN/Inf propagate into a float32 sum, so a finite sum proves a finite tensor (one fast pass);
    only a non-finite sum (or an overflow) pays for the elementwise check."""
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def _labelled(base: StateDict | None, models: list[StateDict]) -> list[tuple[str, StateDict]]:
    return ([("base", base)] if base is not None else []) + [(f"model {i}", m) for i, m in enumerate(models)]


def check_inputs(base: StateDict | None, models: list[StateDict], exclude_regex: Sequence[str] = ()) -> None:
    """Every input holds exactly the reference's names (base, else model 0), with the same shapes
    (excluded names may differ in shape: they are copied from the reference, e.g. task heads)."""
    inputs = _labelled(base, models)
    reference_label, reference = inputs[0]
    for label, state in inputs:
        extra = sorted(set(state) - set(reference))
        if extra:
            raise MergeError(f"tensor {extra[0]!r} is in {label} but not in {reference_label}")
        for name, expected in reference.items():
            if name not in state:
                raise MergeError(f"tensor {name!r} is missing from {label}")
            if state[name].shape != expected.shape and not is_excluded(name, exclude_regex):
                raise MergeError(f"shape mismatch for {name!r}: {tuple(expected.shape)} in "
                                 f"{reference_label} vs {tuple(state[name].shape)} in {label}")


def check_finite(base: StateDict | None, models: list[StateDict]) -> None:
    """Every float tensor is free of NaN and Inf."""
    for label, state in _labelled(base, models):
        for name, tensor in state.items():
            if tensor.is_floating_point() and not is_finite(tensor):
                raise MergeError(f"tensor {name!r} of {label} contains NaN or Inf")


def resolve_dare(method: MergeMethod, options: MergeOptions, dare: DareOptions | None,
                 num_models: int) -> tuple[DareOptions | None, MergeOptions]:
    """dare_linear / dare_ties: the DARE rate defaults to 1 − density per model, and TIES then trims nothing."""
    if method.dare_from_density:
        densities = options.densities(num_models)
        if dare is None or not any(dare.rates(num_models)):
            dare = replace(dare or DareOptions(), drop_rate=[1.0 - d for d in densities])
        options = replace(options, density=1.0)
    if dare is not None:
        dare.validate()
        if not any(dare.rates(num_models)):
            dare = None
    return dare, options


def check_method_inputs(method: MergeMethod, base: StateDict | None, models: list[StateDict],
                        statistics: list[StateDict] | None, dare: DareOptions | None) -> None:
    if method.needs_base and base is None:
        raise MergeError(f"{method.name} needs a base (pretrained) model")
    if dare is not None and base is None and dare.weight_format == "delta_weight":
        raise MergeError("DARE on delta weights needs a base (pretrained) model")
    if len(models) < method.min_models or (method.max_models and len(models) > method.max_models):
        bound = f"{method.min_models}..{method.max_models}" if method.max_models else f">= {method.min_models}"
        raise MergeError(f"{method.name} takes {bound} models, got {len(models)}")
    if method.statistics and (statistics is None or len(statistics) != len(models)):
        raise MergeError(f"{method.name} needs one {method.statistics} statistics dict per model")


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
    """
    spec = get_method(method)
    options.validate()
    if not models:
        raise MergeError("no models to merge")
    dare, options = resolve_dare(spec, options, dare, len(models))
    check_method_inputs(spec, base, models, statistics, dare)
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
    merged = spec.function(sub_base, sub_models, options, statistics)
    _check_outputs(merged)
    out = {}
    for name, tensor in reference.items():
        if name in merged:
            out[name] = merged[name].to(out_dtype or tensor.dtype)
        else:
            _check_identical(name, tensor, models)
            out[name] = tensor.to(out_dtype) if out_dtype and tensor.is_floating_point() else tensor
    return out


def _apply_dare(spec: MergeMethod, dare: DareOptions, base: StateDict, models: list[StateDict], seed: int,
                report: list[dict[str, float]] | None, offsets: dict[str, tuple[int, int]] | None) -> list[StateDict]:
    """DARE each model at its own rate; returns δ'_k for methods on deltas, else θ'_k."""
    reports = report if report is not None else []
    reports.extend({} for _ in range(len(models) - len(reports)))
    return [dare_one_model(model, base, p, dare, on_deltas=spec.on_deltas, seed=seed, model_index=index,
                           report=reports[index], offsets=offsets)
            for index, (model, p) in enumerate(zip(models, dare.rates(len(models))))]


def dare_one_model(model: StateDict, base: StateDict, p: float, dare: DareOptions, *, on_deltas: bool, seed: int,
                   model_index: int, report: dict[str, float] | None = None,
                   offsets: dict[str, tuple[int, int]] | None = None) -> StateDict:
    """One model's private float32 tensors after DARE: δ' (on_deltas) or θ'. Overwrites `model`.

    delta_weight on deltas masks δ directly; otherwise θ' = dare_model(θ) and δ' = θ' − θ_pre."""
    common = dict(seed=seed, model_index=model_index, report=report, offsets=offsets)
    if on_deltas and dare.weight_format == "delta_weight":
        return dare_tensors({n: t.sub_(base[n]) for n, t in model.items()}, p, dare, **common)
    dropped = dare_model(model, base, p, dare, **common)
    return {n: t.sub_(base[n]) for n, t in dropped.items()} if on_deltas else dropped


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
