"""Checks on merge inputs shared by the DARE and merge entry points: exclusion, names, shapes, finiteness."""
from __future__ import annotations

import re
from typing import Sequence

import torch

from .options import MergeError, StateDict


def is_excluded(name: str, exclude_regex: Sequence[str]) -> bool:
    """A name is excluded when any pattern matches it from the start (``re.match``, as MergeLM)."""
    return any(re.match(pattern, name) for pattern in exclude_regex)


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
