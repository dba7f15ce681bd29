"""DARE over a whole model (paper §3): per-tensor drop-and-rescale of deltas or fine-tuned weights."""
from __future__ import annotations

import re
from typing import Sequence

import torch

from .options import DareOptions, StateDict
from .randomness import RandomSlot
from .sparsify import dare_tensor


def is_excluded(name: str, exclude_regex: Sequence[str]) -> bool:
    """A name is excluded when any pattern matches it from the start (``re.match``, as MergeLM)."""
    return any(re.match(pattern, name) for pattern in exclude_regex)


def dare_tensors(tensors: StateDict, p: float, options: DareOptions, *, seed: int, model_index: int,
                 report: dict[str, float] | None = None,
                 offsets: dict[str, tuple[int, int]] | None = None) -> StateDict:
    """x' = DARE(x) for every tensor x of one model (its deltas, or its weights for finetuned_weight).

    The tensors are overwritten (callers pass private copies). Random masks come from
    RandomSlot(seed, model_index, name); `offsets[name] = (start, total)` says that the tensor is the
    flat piece [start, start + n) of a tensor of `total` elements (streaming). `report` receives the
    kept fraction per tensor.
    """
    out = {}
    offsets = offsets or {}
    for name, tensor in tensors.items():
        slot = RandomSlot(seed, model_index, name, *offsets.get(name, (0, None)))
        out[name], kept = dare_tensor(tensor, p, options, slot, in_place=True)
        if report is not None:
            report[name] = kept / max(tensor.numel(), 1)
    return out


def dare_model(finetuned: StateDict, base: StateDict, p: float, options: DareOptions, *, seed: int,
               model_index: int, report: dict[str, float] | None = None,
               offsets: dict[str, tuple[int, int]] | None = None) -> StateDict:
    """θ' = θ_pre + DARE(θ_ft − θ_pre) (delta_weight) or θ' = DARE(θ_ft) (finetuned_weight).

    The tensors of `finetuned` are overwritten; draws as dare_tensors."""
    common = dict(seed=seed, model_index=model_index, report=report, offsets=offsets)
    if options.weight_format == "finetuned_weight":
        return dare_tensors(finetuned, p, options, **common)
    deltas = {name: weight.sub_(base[name]) for name, weight in finetuned.items()}
    return {name: delta.add_(base[name]) for name, delta in dare_tensors(deltas, p, options, **common).items()}


def dare_state_dict(finetuned: StateDict, base: StateDict, options: DareOptions, *, seed: int = 0,
                    model_index: int = 0, exclude_regex: Sequence[str] = ()) -> StateDict:
    """DARE applied to one fine-tuned model; excluded and non-float tensors are returned unchanged."""
    from .merge import check_inputs  # merge imports this module

    options.validate()
    p = options.rates(1)[0]
    check_inputs(base, [finetuned], exclude_regex)
    selected = {name: t for name, t in finetuned.items()
                if t.is_floating_point() and not is_excluded(name, exclude_regex)}
    dropped = dare_model({n: t.to(torch.float32, copy=True) for n, t in selected.items()},
                         {n: base[n].float() for n in selected}, p, options,
                         seed=seed, model_index=model_index)
    return {name: dropped[name].to(t.dtype) if name in dropped else t for name, t in finetuned.items()}
