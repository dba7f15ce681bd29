"""Merge a recipe straight into a resident model's parameters: no shard writing, no re-reading.

``ResidentModels`` opens each input checkpoint once (utils/engine/reader.py) and keeps every tensor in memory
after its first read, so the trials of a search read nothing from disk after the first. ``merge_into`` plans
the recipe with the recipe planner (utils/recipes/planner.py: the same output tensors, sources, dtypes and
per-tensor parameters as a merge to disk), merges each planned tensor whole with the recipe method's function
(the streamed engine's pieces give the same bits as whole tensors: tests/test_recipes.py) with the same random
slots (seed, input index, tensor name), and copies the result into the resident model's parameter of that name.
Merging a recipe to disk and loading the folder gives the same parameters (tests/test_search_merge.py).

Tensors matched by ``exclude`` (e.g. GLUE task heads, which differ per task) are hidden from the planner: the
resident model keeps its own. ``prefix`` renames inputs whose tensors lack the resident model's prefix (a bare
encoder checkpoint, ``embeddings.*``, used as the base of task classifiers, ``bert.embeddings.*``).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from model_merging_methods import MergeError
from model_merging_methods.randomness import RandomSlot
from model_merging_methods.recipe_methods import TensorGroupCall, passthrough, run_group
from model_merging_methods.recipe_registry import get_recipe_method
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


class ResidentModels:
    """Input checkpoints opened once, their tensors kept in memory after the first read."""

    def __init__(self, exclude: tuple[str, ...] = (), prefix: Optional[str] = None, allow_pickle: bool = False):
        self.exclude = [re.compile(pattern) for pattern in exclude]
        self.prefix, self.allow_pickle = prefix, allow_pickle
        self._open: dict[str, tuple[Path, _ResidentReader, object]] = {}

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
                if not self._excluded(resident):
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
               tie_order: str = "index") -> MergeReport:
    """Merge ``recipe`` into ``model``'s parameters and buffers of the same names (see the module docstring)."""
    if recipe.tokenizer_source or recipe.tokenizer or recipe.slices:
        raise RecipeError("in-memory merges take recipes without tokenizer / tokenizer_source / slices (the resident "
                          "model's shapes and layers stay as they are)")
    started, reads = time.perf_counter(), resident.disk_reads
    inputs = resident.inputs(recipe)
    plan = plan_recipe(recipe, inputs, None)
    method = get_recipe_method(recipe.merge_method)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing = [g.name for g in plan.groups if g.name not in targets]
    if missing:
        raise RecipeError(f"the resident model has no tensor {missing[0]!r} (a merge output); is it the inputs' "
                          f"architecture?")
    with torch.no_grad():
        for group in plan.groups:
            tensors = {ref: inputs[ref].reader.get(name) for ref, name in group.sources.items()}
            tensors = {ref: t.to(group.compute_dtype) if t.is_floating_point() else t for ref, t in tensors.items()}
            slots = {ref: RandomSlot(seed, inputs[ref].index, group.name, 0, None) for ref in group.sources} \
                if method.randomized else {}
            call = TensorGroupCall(tensors, group.base, group.params, group.per_input, slots, tie_order)
            try:
                merged = run_group(passthrough if group.passthrough else method.function, call)
            except MergeError as error:
                raise RecipeError(f"{error} (while merging tensor {group.name!r})") from None
            target = targets[group.name]
            if tuple(target.shape) != tuple(merged.shape):
                raise RecipeError(f"tensor {group.name!r}: merged shape {tuple(merged.shape)} but the resident "
                                  f"model's is {tuple(target.shape)}")
            # the dtype a merge to disk writes, then the model's own (what loading that folder does)
            target.copy_(merged.to(group.dtype) if merged.is_floating_point() else merged)
    return MergeReport(len(plan.groups), time.perf_counter() - started, resident.disk_reads - reads)
