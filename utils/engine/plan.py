"""The merge plan: one PlannedGroup per output tensor, whichever interface made it.

merge_models.py flags (utils/engine/streaming.py: flag_groups), recipes (utils/recipes/planner.py) and
--from_manifest all become a list of groups — output tensor → its sources (input id → that input's tensor
name), the base, the method's resolved parameters, dtypes — that one executor (streaming.execute_plan)
runs. `sources` is the complete account of where an output tensor comes from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class PlannedGroup:
    name: str                                  # output tensor name
    sources: dict[str, str]                    # input id → that input's tensor name (input order)
    base: Optional[str]
    params: dict[str, Any]                     # the method's resolved global parameters
    per_input: dict[str, dict[str, Any]]       # input id → its resolved per-input parameters
    shape: tuple[int, ...]
    dtype: torch.dtype                         # output dtype
    compute_dtype: torch.dtype                 # the load dtype: inputs are cast to it before the merge
    vocab: bool = False                        # rows follow a vocabulary (permuted / padded before the merge)
    passthrough: bool = False                  # copied from its single source (an optional tensor, an exclusion)
    dare: Optional[Any] = None                 # the paper's DARE before the merge (DareOptions), None: none
    options: Optional[Any] = None              # a paper method's MergeOptions as given (flags); None: from params
    layer: Optional[int] = None                # the output block index of a layer tensor (None: before / after the blocks)

    @property
    def models(self) -> list[str]:
        """The inputs other than the base, in input order (the paper's model order: DARE's draws use it)."""
        return [ref for ref in self.sources if ref != self.base]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)
