"""From a validated recipe and its inputs' headers to the list of output tensors, before any tensor is read.

Each output tensor is a TensorGroup plan: which input supplies which of its tensors, the base, the resolved
parameters, the output name/shape/dtype. Layers are assembled slice after slice and renumbered
consecutively; tensors before the layers come from the first slice's sources, those after them from the
last slice's (as mergekit). `models:` is one slice covering every layer of every model (the base added
when it is not listed).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from model_merging_methods.options import DareOptions, MergeError, MethodParameter
from model_merging_methods.registry import MergeMethod, get_method

from utils.engine.plan import PlannedGroup

from .architecture import Layout, output_layers
from .parameters import resolve
from .schema import Recipe, RecipeError, SliceSource

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


@dataclass
class InputModel:
    ref: str                      # the recipe's reference (the input's id)
    folder: Path
    reader: Any                   # utils.engine CheckpointReader
    layout: Layout
    index: int                    # position in the recipe's referenced models (random draws use it)


@dataclass
class Plan:
    groups: list[PlannedGroup]
    donor: str                                 # input whose config (and, by default, tokenizer) the output takes
    num_layers: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Slice:
    path: str                                  # key path for messages
    sources: list[tuple[str, SliceSource]]     # (key path, source)
    base: Optional[str]
    parameters: Optional[dict]
    num_layers: int


def _slices(recipe: Recipe, inputs: dict[str, InputModel]) -> list[_Slice]:
    if recipe.slices:
        slices = []
        for i, piece in enumerate(recipe.slices):
            sources = [(f"slices[{i}].sources[{j}]", s) for j, s in enumerate(piece.sources)]
            for path, source in sources:
                layers = inputs[source.model].layout.num_layers
                if source.layer_range[1] > layers:
                    raise RecipeError(f"{path}.layer_range: {list(source.layer_range)} goes beyond the "
                                      f"{layers} layers of {source.model}")
            slices.append(_Slice(f"slices[{i}]", sources, piece.base_model or recipe.base_model, piece.parameters,
                                 piece.num_layers))
        return slices
    sources, counts = [], {}
    listed = [m.model for m in recipe.models]
    entries = [(f"models[{j}]", m.model, m.parameters) for j, m in enumerate(recipe.models)]
    if recipe.base_model and recipe.base_model not in listed:
        entries.append(("base_model", recipe.base_model, None))
    for path, ref, parameters in entries:
        layers = inputs[ref].layout.num_layers
        counts[ref] = layers
        sources.append((path, SliceSource(model=ref, layer_range=(0, layers), parameters=parameters)))
    if len(set(counts.values())) > 1:
        raise RecipeError(f"models: every model must have the same number of layers; got "
                          f"{', '.join(f'{r}: {n}' for r, n in counts.items())} (use slices to combine layer ranges)")
    return [_Slice("models", sources, recipe.base_model, None, next(iter(counts.values())))]


def dropped_layers(slices: list[_Slice], inputs: dict[str, InputModel], output_layers: int) -> list[str]:
    """One warning per input whose layers the slices do not all take: a recipe written for another depth
    (an example's [0, 2] on a 30-layer model) must not pass silently."""
    taken: dict[str, set[int]] = {}
    for piece in slices:
        for _, source in piece.sources:
            taken.setdefault(source.model, set()).update(range(*source.layer_range))
    warnings = []
    for ref, layers in taken.items():
        total = inputs[ref].layout.num_layers
        if len(layers) < total:
            left = sorted(set(range(total)) - layers)
            warnings.append(f"model {ref} has {total} layers; the output ({output_layers} layers) takes {len(layers)} "
                            f"of them: layers {_spans(left)} are dropped (check the slices' layer_range)")
    return warnings


def _spans(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0-2, 5, 7-8'."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def _check_method(method: MergeMethod, piece: _Slice) -> Optional[str]:
    """The slice's inputs satisfy the method's contract; returns the base used by the method."""
    models = [s.model for _, s in piece.sources]
    duplicate = next((m for m in models if models.count(m) > 1), None)
    if duplicate:
        raise RecipeError(f"{piece.path}: model {duplicate!r} is listed twice")
    if method.statistics:
        raise RecipeError(f"merge_method {method.name} needs {method.statistics} statistics collected from data; "
                          f"run it from merge_plms_glue.py")
    if not method.streamable:
        raise RecipeError(f"merge_method {method.name} needs the whole model in memory; use the library "
                          f"(model_merging_methods.merge_state_dicts)")
    base = piece.base if method.base in ("required", "optional") else None
    if method.base == "required" and base is None:
        raise RecipeError(f"{piece.path}: merge_method {method.name} needs a base_model")
    if base is not None and base not in models:
        raise RecipeError(f"{piece.path}: base_model {base!r} must be one of this slice's sources for "
                          f"{method.name}")
    count = len(models) - (base is not None and method.base != "ignored")
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        need = (f"exactly {method.min_models}" if method.min_models == method.max_models else
                f"at most {method.max_models}" if method.max_models is not None and count > method.max_models
                else f"at least {method.min_models}")
        besides = " besides the base_model" if base is not None else ""
        raise RecipeError(f"{piece.path}: merge_method {method.name} takes {need} input models{besides}; got "
                          f"{count}: {', '.join(m for m in models if m != base or method.base == 'ignored')}")
    return base


def _scopes(recipe: Recipe, piece: _Slice, model: Optional[str]) -> list[tuple[str, Optional[dict]]]:
    scopes = []
    if model is not None:
        scopes += [(f"{path}.parameters", s.parameters) for path, s in piece.sources if s.model == model]
    if piece.parameters is not None:
        scopes.append((f"{piece.path}.parameters", piece.parameters))
    scopes.append(("parameters", recipe.parameters))
    if recipe.dare is not None:
        scopes.append(("dare", {"drop_rate": recipe.dare.drop_rate}))
    return scopes


def plan_recipe(recipe: Recipe, inputs: dict[str, InputModel], vocab_rows: Optional[int] = None) -> Plan:
    """Every output tensor of the recipe; raises RecipeError for anything that would fail later.

    `vocab_rows`: the output vocabulary size when a tokenizer is built (vocabulary tensors are then
    permuted into it), else None (their shapes must agree)."""
    method = get_method(recipe.merge_method)
    slices = _slices(recipe, inputs)
    bases = [_check_method(method, piece) for piece in slices]
    donor = recipe.base_model or recipe.referenced_models()[0]
    out = inputs[donor].layout
    plan = Plan([], donor, sum(p.num_layers for p in slices))
    if recipe.slices:
        plan.warnings += dropped_layers(slices, inputs, plan.num_layers)
    _warn_unknown_parameters(recipe, method, plan)
    compute = DTYPES.get(recipe.dtype) if recipe.dtype else None
    out_dtype = DTYPES.get(recipe.out_dtype) if recipe.out_dtype else None

    def add(name: str, names: dict[str, str], piece: _Slice, base: Optional[str], t: float,
            layer: Optional[int] = None) -> None:
        group = _group(name, names, piece, base, t, method, recipe, inputs, compute, out_dtype, vocab_rows, plan)
        if group is not None:
            group.layer = layer
            plan.groups.append(group)

    first, last = slices[0], slices[-1]
    for name in out.pre:
        add(name, {s.model: name for _, s in first.sources}, first, bases[0], 0.0)
    out_index = 0
    for piece, base in zip(slices, bases):
        lead = piece.sources[0][1]
        for offset in range(piece.num_layers):
            t = offset / (piece.num_layers - 1) if piece.num_layers > 1 else 1.0
            lead_layout = inputs[lead.model].layout
            for suffix in lead_layout.layer_suffixes[lead.layer_range[0] + offset]:
                names = {s.model: inputs[s.model].layout.layer_name(s.layer_range[0] + offset, suffix)
                         for _, s in piece.sources}
                add(out.layer_name(out_index, suffix), names, piece, base, t, out_index)
            out_index += 1
    post = list(out.post)
    if out.output_embedding and out.output_embedding not in post and any(
            out.output_embedding in inputs[s.model].layout.names for _, s in last.sources):
        post.append(out.output_embedding)   # the donor is tied but another input has an lm_head
    for name in post:
        add(name, {s.model: name for _, s in last.sources}, last, bases[-1], 0.0)
    return plan


def _group(name: str, names: dict[str, str], piece: _Slice, base: Optional[str], t: float, method: MergeMethod,
           recipe: Recipe, inputs: dict[str, InputModel], compute: Optional[torch.dtype],
           out_dtype: Optional[torch.dtype], vocab_rows: Optional[int], plan: Plan) -> Optional[PlannedGroup]:
    present = {}
    for ref, tensor_name in names.items():
        layout = inputs[ref].layout
        if tensor_name in layout.names:
            present[ref] = tensor_name
        elif tensor_name == layout.output_embedding and layout.input_embedding in layout.names:
            present[ref] = layout.input_embedding   # tied embeddings: the input embedding serves as lm_head
    passthrough = False
    if len(present) < len(names):
        missing = next(r for r in names if r not in present)
        if not present:
            return None
        only = next(iter(present))
        if len(present) == 1 and (method.missing_tensor == "passthrough_singleton" or (
                method.missing_tensor in ("passthrough_base_singleton", "base_or_skip") and only == base)):
            passthrough = True
        elif method.missing_tensor == "base_or_skip" and len(present) < method.min_models + method.needs_base:
            plan.warnings.append(f"skipping tensor {name!r}: too few inputs have it for {method.name}")
            return None
        else:
            raise RecipeError(f"tensor {names[missing]!r} is missing from {missing} (needed for output tensor "
                              f"{name!r} by {piece.path})")
    infos = {ref: inputs[ref].reader.info(tensor_name) for ref, tensor_name in present.items()}
    vocab = any(tensor_name in inputs[ref].layout.vocab for ref, tensor_name in present.items())
    shapes = {ref: shape for ref, (_, shape) in infos.items()}
    first_ref, shape = next(iter(shapes.items()))
    if vocab and vocab_rows is not None:
        shape = (vocab_rows,) + tuple(shape[1:])
        odd = next((r for r, s in shapes.items() if tuple(s[1:]) != shape[1:]), None)
    else:
        odd = next((r for r, s in shapes.items() if s != shapes[first_ref]), None)
    if odd is not None and vocab and vocab_rows is None:
        raise RecipeError(f"vocabulary sizes differ: tensor {name!r} has {shapes[first_ref][0]} rows in {first_ref} "
                          f"but {shapes[odd][0]} in {odd}; set tokenizer_source (union, base or a model's name) or "
                          f"tokenizer in the recipe to build one vocabulary")
    if odd is not None:
        raise RecipeError(f"shape mismatch for tensor {name!r}: {tuple(shapes[first_ref])} in {first_ref} vs "
                          f"{tuple(shapes[odd])} in {odd}")
    dtypes = [dtype for dtype, _ in infos.values()]
    floating = all(d.is_floating_point for d in dtypes)
    if floating:
        promoted = dtypes[0]
        for d in dtypes[1:]:
            promoted = torch.promote_types(promoted, d)
        compute_dtype = compute or promoted
        dtype = out_dtype or compute_dtype
        if method.float32_result and not passthrough and out_dtype is None:   # mergekit saves its float32 result
            dtype = torch.promote_types(compute_dtype, torch.float32)
    else:
        compute_dtype = dtype = dtypes[0]
    params, per_input = {}, {}
    parameters = method.parameters + ((DROP_RATE,) if method.paper_dare else ())
    if not passthrough:
        for parameter in parameters:
            if parameter.scope == "global":
                params[parameter.name] = resolve(parameter, _scopes(recipe, piece, None), tensor_name=name, t=t)
        for ref, tensor_name in present.items():
            per_input[ref] = {p.name: resolve(p, _scopes(recipe, piece, ref), tensor_name=tensor_name, t=t, model=ref)
                              for p in parameters
                              if p.scope == "input" or (p.scope == "non_base" and ref != base)}
    group = PlannedGroup(name, present, base if base in present else None, params, per_input, tuple(shape), dtype,
                         compute_dtype, vocab, passthrough)
    if method.paper_dare and not passthrough and floating:
        group.dare = _group_dare(recipe, group, method)
    return group


# the paper's DARE in a recipe: a per-model parameter (scalar, gradient or filtered like any), default the
# `dare:` block's drop_rate
DROP_RATE = MethodParameter("drop_rate", float, "non_base", 0.0)


def _group_dare(recipe: Recipe, group: PlannedGroup, method: MergeMethod) -> Optional[DareOptions]:
    """The DareOptions of one tensor (one drop rate per model), or None when nothing is dropped."""
    rates = [group.per_input[ref]["drop_rate"] for ref in group.models]
    if not any(rates):
        return None
    block = recipe.dare
    if group.base is None and (block is None or block.weight_format == "delta_weight"):
        raise RecipeError(f"DARE on delta weights needs a base_model (tensor {group.name!r}); or set "
                          f"dare.weight_format: finetuned_weight")
    settings = block.model_dump(exclude={"drop_rate"}) if block is not None else {}
    dare = DareOptions(drop_rate=rates, **settings)
    try:
        dare.resolve(len(rates))
    except MergeError as error:
        raise RecipeError(f"dare: {error} (tensor {group.name!r})") from None
    return dare


def _warn_unknown_parameters(recipe: Recipe, method: MergeMethod, plan: Plan) -> None:
    known = {p.name for p in method.parameters} | ({"drop_rate"} if method.paper_dare else set())
    if recipe.dare is not None and not method.paper_dare:
        raise RecipeError(f"dare: the paper's DARE block applies to methods that take a base_model; "
                          f"{method.name} treats a base as one more input")
    used = set(recipe.parameters or {})
    for model in recipe.models or []:
        used |= set(model.parameters or {})
    for piece in recipe.slices or []:
        used |= set(piece.parameters or {})
        for source in piece.sources:
            used |= set(source.parameters or {})
    unknown = sorted(used - known)
    if unknown and method.strict_parameters:
        raise RecipeError(f"parameter {unknown[0]!r} is not a parameter of merge_method {method.name} "
                          f"(its parameters: {', '.join(sorted(known))})")
    for name in unknown:
        plan.warnings.append(f"parameter {name!r} is not used by merge_method {method.name} "
                             f"(its parameters: {', '.join(sorted(known)) or 'none'})")


def warn(messages: list[str]) -> None:
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)


def output_config(recipe: Recipe, plan: Plan, inputs: dict[str, InputModel], vocab_size: Optional[int]) -> dict:
    """The donor's config with the output's layers (architecture.output_layers), vocabulary size and dtype."""
    config = output_layers(recipe, inputs, plan.donor, inputs[plan.donor].layout.config)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    dtype = recipe.out_dtype or recipe.dtype
    if dtype:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    return config

