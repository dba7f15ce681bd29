"""Merge a recipe straight into a resident model's parameters: no shard writing, no re-reading.

``ResidentModels`` opens each input checkpoint once (utils/engine/reader.py) and keeps every tensor in memory
after its first read, so the trials of a search read nothing from disk after the first. ``merge_into`` plans
the recipe with the recipe planner (utils/recipes/planner.py: the same output tensors, sources, dtypes and
per-tensor parameters as a merge to disk), merges each planned tensor whole with the recipe method's function
(the streamed engine's pieces give the same bits as whole tensors: tests/test_recipes.py) with the same random
slots (seed, input index, tensor name), and copies the result into the resident model's parameter of that name.
Merging a recipe to disk and loading the folder gives the same parameters (tests/test_search_merge.py).

What a search varies (weights, densities) leaves two costly things unchanged from trial to trial, and they are
computed once and kept: the DARE / DELLA draws of each (seed, input, tensor) — they depend on nothing else — and,
for rank cuts (TIES' top-k, Breadcrumbs' window, ties in flat order), the sorted |δ| of each (input, tensor), from
which any density's cut-off and tie count (the RankStat radix selection would find) are read in O(log n). The
sparsification then applies the same KeepRule to δ (the streamed engine's own rule: same bits).

Tensors matched by ``exclude`` (e.g. GLUE task heads, which differ per task) are hidden from the planner: the
resident model keeps its own; so are tensors the resident model does not hold (``keep``: its state-dict names, e.g.
a base checkpoint's non-persistent ``position_ids`` buffer). ``prefix`` renames inputs whose tensors lack the resident model's prefix (a bare
encoder checkpoint, ``embeddings.*``, used as the base of task classifiers, ``bert.embeddings.*``).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from model_merging_methods import MergeError, dare_inputs
from model_merging_methods.merge import merge_tensor_group, options_from_parameters
from model_merging_methods.options import DEFAULT_TIE_ORDER
from model_merging_methods.randomness import RandomSlot, draws_below
from model_merging_methods.recipe_methods import RankCut, TensorGroupCall, passthrough, run_group
from model_merging_methods.registry import get_method
from model_merging_methods.selection import RankStat, as_mask
from utils.engine.reader import CheckpointError, CheckpointReader
from utils.recipes.architecture import infer_layout
from utils.recipes.planner import InputModel, plan_recipe
from utils.recipes.schema import ModelRef, Recipe, RecipeError


class _ResidentReader:
    """CheckpointReader's interface (names, info, get) over one input, under the resident names; each tensor
    is read from disk once and kept."""

    def __init__(self, reader: CheckpointReader, names: dict[str, str]):
        self.reader, self.source_of = reader, names          # resident name → the checkpoint's name
        self.cache: dict[str, torch.Tensor] = {}
        self.reads = 0

    def names(self) -> list[str]:
        return list(self.source_of)

    def info(self, name: str):
        return self.reader.info(self.source_of[name])

    def get(self, name: str, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        tensor = self.cache.get(name)
        if tensor is None:
            tensor = self.cache[name] = self.reader.get(self.source_of[name])
            self.reads += 1
        return tensor if start is None else tensor.reshape(-1)[start:stop]

    def describe_files(self) -> list[dict]:
        return self.reader.describe_files()


class _CachedSlot:
    """A RandomSlot whose draws for the whole tensor are made once (they depend only on seed, input, name)."""

    def __init__(self, slot: RandomSlot):
        self.slot, self.draws = slot, None

    def uniform(self, count: int) -> torch.Tensor:
        if self.draws is None:
            self.draws = self.slot.uniform(count)
        if self.draws.numel() != count:
            raise RuntimeError(f"cached draws of {self.slot.name!r}: {self.draws.numel()} kept, {count} asked")
        return self.draws

    def below(self, count: int, bound: float) -> np.ndarray:
        """RandomSlot.below from the cached draws (the same comparison)."""
        return draws_below(self.uniform(count), bound)


def _order_statistic(ascending: torch.Tensor, rank: int) -> RankStat:
    """The rank-th smallest (1-based) of sorted values, with the counts below it and equal to it."""
    value = ascending[rank - 1:rank]
    less = int(torch.searchsorted(ascending, value, right=False))
    return RankStat(float(value), less, int(torch.searchsorted(ascending, value, right=True)) - less)


class _RankCutSparsifier:
    """sparsify_magnitude / sparsify_outliers (no rescale) with what every density shares read from the kept
    sort of |δ| (ResidentModels.kept_sort): for tie_order "index" the sorted values, whose order statistics give
    δ ⊙ KeepRule.mask(|δ|) (the rule RankCut.rule builds); for "argsort" each entry's position in torch's own
    order (RankCut.argsort_ranks), of which a density keeps a window ([0, k) descending for TIES, [bottom,
    bottom + keep) ascending for Breadcrumbs) by one comparison, as the method's own argsort would."""

    def __init__(self, cut: RankCut, kept: torch.Tensor, tie_order: str):
        self.cut, self.kept, self.tie_order = cut, kept, tie_order

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        n = delta.numel()
        if self.cut.density >= 1:
            return delta
        if self.cut.kind == "magnitude" and (self.cut.density <= 0 or n == 0):
            return torch.zeros_like(delta)
        if self.tie_order == "index":
            rule = self.cut.rule(n, [_order_statistic(self.kept, rank) for rank in self.cut.ranks(n)])
            return delta * as_mask(rule.mask_of(delta), delta.dtype)
        return delta * self.cut.rank_mask(delta, self.kept)


class ResidentModels:
    """Input checkpoints opened once, their tensors kept in memory after the first read."""

    def __init__(self, exclude: tuple[str, ...] = (), prefix: Optional[str] = None, allow_pickle: bool = False,
                 keep: Optional[set[str]] = None):
        self.exclude = [re.compile(pattern) for pattern in exclude]
        self.prefix, self.allow_pickle = prefix, allow_pickle
        self.keep = keep     # the resident model's state-dict names: other tensors of an input play no part
        self._open: dict[str, tuple[Path, _ResidentReader, object]] = {}
        self._slots: dict[tuple, _CachedSlot] = {}
        self._sorted: dict[tuple, torch.Tensor] = {}

    def slot(self, seed: int, index: int, name: str) -> _CachedSlot:
        key = (seed, index, name)
        if key not in self._slots:
            self._slots[key] = _CachedSlot(RandomSlot(seed, index, name, 0, None))
        return self._slots[key]

    def kept_sort(self, key: tuple, delta: Optional[torch.Tensor], cut: RankCut, tie_order: str) -> torch.Tensor:
        """The sort of |δ| every density of a rank cut reads (_RankCutSparsifier), made once per key: the
        ascending values (tie_order index) or RankCut.argsort_ranks (positions in the method's own argsort)."""
        if key not in self._sorted:
            self._sorted[key] = (torch.sort(delta.abs().float().reshape(-1)).values if tie_order == "index"
                                 else cut.argsort_ranks(delta))
        return self._sorted[key]

    def _excluded(self, name: str) -> bool:
        return any(pattern.fullmatch(name) for pattern in self.exclude)

    def open(self, ref: str) -> tuple[Path, _ResidentReader, object]:
        if ref not in self._open:
            try:
                folder = Path(ModelRef.parse(ref).path)
                reader = CheckpointReader(folder, self.allow_pickle)
            except (CheckpointError, ValueError) as error:
                raise RecipeError(f"model {ref}: {error}") from None
            names = {}
            bare = self.prefix and not any(n.startswith(self.prefix + ".") for n in reader.names())
            for name in reader.names():
                resident = f"{self.prefix}.{name}" if bare else name
                if not self._excluded(resident) and (self.keep is None or resident in self.keep):
                    names[resident] = name
            resident_reader = _ResidentReader(reader, names)
            self._open[ref] = (folder, resident_reader, infer_layout(folder, list(names), f"model {ref}"))
        return self._open[ref]

    def inputs(self, recipe: Recipe) -> dict[str, InputModel]:
        inputs = {}
        for index, ref in enumerate(recipe.referenced_models()):
            folder, reader, layout = self.open(ref)
            inputs[ref] = InputModel(ref, folder, reader, layout, index)
        return inputs

    @property
    def disk_reads(self) -> int:
        return sum(reader.reads for _, reader, _ in self._open.values())


@dataclass
class MergeReport:
    tensors: int
    seconds: float
    disk_reads: int            # tensors read from disk during this merge (0 after the first trial)


def merge_into(model: torch.nn.Module, recipe: Recipe, resident: ResidentModels, *, seed: int = 0,
               tie_order: str = DEFAULT_TIE_ORDER) -> MergeReport:
    """Merge ``recipe`` into ``model``'s parameters and buffers of the same names (see the module docstring)."""
    if recipe.tokenizer_source or recipe.tokenizer or recipe.slices:
        raise RecipeError("in-memory merges take recipes without tokenizer / tokenizer_source / slices (the resident "
                          "model's shapes and layers stay as they are)")
    started, reads = time.perf_counter(), resident.disk_reads
    inputs = resident.inputs(recipe)
    plan = plan_recipe(recipe, inputs, None)
    method = get_method(recipe.merge_method)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing = [g.name for g in plan.groups if g.name not in targets]
    if missing:
        raise RecipeError(f"the resident model has no tensor {missing[0]!r} (a merge output); is it the inputs' "
                          f"architecture?")
    with torch.no_grad():
        for group in plan.groups:
            tensors = {ref: inputs[ref].reader.get(name) for ref, name in group.sources.items()}
            if group.dare is not None and method.kind != "state_dict":   # as the executor: DARE'd inputs first
                tensors = dare_inputs(tensors, group.base, group.models, group.name,
                                      group.dare.resolve(len(group.models)), seed=seed)
            tensors = {ref: t.to(group.compute_dtype) if t.is_floating_point() else t for ref, t in tensors.items()}
            slots = {ref: resident.slot(seed, inputs[ref].index, group.name) for ref in group.sources} \
                if method.randomized else {}
            call = TensorGroupCall(tensors, group.base, group.params, group.per_input, slots, tie_order,
                                   piece_sparsifiers=_rank_cuts(method, group, tensors, resident, tie_order),
                                   name=group.name, layer=group.layer, num_layers=plan.num_layers)
            try:
                if method.kind == "state_dict" and not group.passthrough:     # a paper method (MergeLM's float32)
                    dare = group.dare.resolve(len(group.models)) if group.dare is not None else None
                    merged = merge_tensor_group(method, group.name, tensors, group.base, options_from_parameters(
                        method, group.params, group.per_input, group.models), dare, seed=seed, out_dtype=group.dtype)
                else:
                    merged = run_group(passthrough if group.passthrough else method.implementation(), call)
            except MergeError as error:
                raise RecipeError(f"{error} (while merging tensor {group.name!r})") from None
            target = targets[group.name]
            if tuple(target.shape) != tuple(merged.shape):
                raise RecipeError(f"tensor {group.name!r}: merged shape {tuple(merged.shape)} but the resident "
                                  f"model's is {tuple(target.shape)}")
            # the dtype a merge to disk writes, then the model's own (what loading that folder does)
            target.copy_(merged.to(group.dtype) if merged.is_floating_point() else merged)
    return MergeReport(len(plan.groups), time.perf_counter() - started, resident.disk_reads - reads)


def _paper_merge(method, group, tensors: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """A paper method's whole tensor (kind "state_dict"): the library's merge_tensor_group with the options and
    the paper's DARE the plan resolved, as the recipe engine calls it."""
    models = group.models
    options = options_from_parameters(method, group.params, group.per_input, models)
    dare = group.dare.resolve(len(models)) if group.dare is not None else None
    return merge_tensor_group(method, group.name, tensors, group.base, options, dare, seed=seed, offset=None,
                              out_dtype=group.dtype)


def _rank_cuts(method, group, tensors: dict[str, torch.Tensor], resident: ResidentModels, tie_order: str):
    """Per non-base input, a _RankCutSparsifier for methods that cut by rank (no rescale); None (the method's
    own path) otherwise."""
    kind = getattr(method, "sparsification", None)
    if group.passthrough or kind not in ("magnitude", "outliers") or group.params.get("rescale") or group.base is None:
        return None
    sparsifiers = {}
    for ref in group.sources:
        if ref == group.base:
            continue
        values = group.per_input[ref]
        cut = RankCut(kind, values.get("density", 1.0), values.get("gamma", 0.0) if kind == "outliers" else 0.0)
        key = (ref, group.base, group.name, str(group.compute_dtype), tie_order, kind)
        delta = None if key in resident._sorted else tensors[ref] - tensors[group.base]   # as gta_tensor does
        sparsifiers[ref] = _RankCutSparsifier(cut, resident.kept_sort(key, delta, cut, tie_order), tie_order)
    return sparsifiers
