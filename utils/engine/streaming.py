"""The one streaming merge executor, and merge_models.py's flag front-end to it.

Every merge — method flags, a recipe (utils/recipes/job.py), --from_manifest — becomes one plan: a list of
PlannedGroup (utils/engine/plan.py: output tensor → its sources, base, resolved parameters, dtypes), run by
execute_plan: each output tensor is read from its inputs, merged (whole, or in flat pieces after streamed
whole-tensor statistics where the method needs them) and written straight into pre-laid-out shards
(writer.py), so peak memory is a few pieces per worker, not the model size. Output goes to a staging folder
beside the target that is published (utils/records.py) only when everything is written.

The flag front-end (run_stream_merge) validates and resolves a job's options once (resolve_job), plans one
group per tensor of the reference checkpoint (flag_groups: same names in every input, `--exclude` copies,
`pad_mean` rows), runs the executor and writes the manifest (inputs' sha256, a rerun record).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from model_merging_methods import (SEGMENT, DareOptions, MergeError, MergeMethod, MergeOptions, RadixSelect,
                                   ResolvedDare, check_dare_base, check_method_inputs, dare_inputs, dare_one_model,
                                   get_method, is_excluded, norm_adaptive_weights, resolve_dare, select_streamed,
                                   trim_rank)
from model_merging_methods.merge import merge_tensor_group, options_from_parameters
from model_merging_methods.options import DEFAULT_TIE_ORDER, TIE_ORDERS
from model_merging_methods.norm_adaptive import squared_norm
from model_merging_methods.options import per_model
from model_merging_methods.randomness import RandomSlot
from model_merging_methods.recipe_methods import TensorGroupCall, passthrough, run_group
from utils.cli import resolve_device
from utils.manifest import copy_model_files, hash_beside, input_record, run_manifest
from utils.records import OutputExistsError, OutputRefusedError, check_output_folder, write_folder_atomic

from .accounting import DropRule, UnaccountedTensors, account
from .allocator import tune_allocator
from .choices import DTYPE_NAMES, MERGE_PARTS, VOCAB_ALIGNMENTS
from .plan import PlannedGroup
from .reader import CheckpointReader, open_checkpoint, resolve_checkpoint
from .statistics import Prepared, map_in_order, prepare
from .writer import PlannedTensor, ShardedSafetensorsWriter

LARGE_WHOLE = 1 << 24   # elements: whole-tensor groups above this are merged one at a time (peak memory)
PIECE = SEGMENT  # elements per streamed piece of a large tensor (4 MiB in float32: temporaries stay in cache)
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
MANIFEST_NAME = "merge_manifest.json"
# an embedding or output head: when only its row count differs between inputs, their vocabularies do
VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_out|tok_embeddings|word_embeddings|wte|lm_head|shared)\."
                          r"|(^|\.)output\.weight$")
logger = logging.getLogger("mergelm.engine")


@dataclass
class StreamMergeJob:
    base_model: str | None
    models: list[str]
    method: str
    output_dir: str
    options: MergeOptions = field(default_factory=MergeOptions)
    dare: DareOptions | None = None
    seed: int = 0
    dtype: str | None = None
    device: str = "cpu"
    exclude_regex: list[str] = field(default_factory=list)
    overwrite: bool = False
    allow_pickle: bool = False
    vocab_alignment: str = "error"
    files_from: str | None = None
    max_shard_size: int = 5 * 2**30
    progress: bool = True
    threads: int = field(default_factory=lambda: min(4, available_cpus()))  # workers merging pieces
    allow_noop: bool = False   # run a dare_* method whose settings drop nothing (else refused)
    # role ("base", "model 0", ...) → weight file name → sha256 the inputs must still have (--from_manifest)
    expected_sha256: dict[str, dict[str, str]] | None = None
    norms_from: str | None = None     # norm_adaptive: analysis.json (or its folder) holding the norms
    parameters: list[str] = field(default_factory=list)   # mergekit-named methods: KEY=VALUE parameters
    tie_order: str = DEFAULT_TIE_ORDER   # mergekit's rank cuts (ties, breadcrumbs*): which ties are kept
    merge_part: str = "all"           # "language": a multimodal model's other modules copied from the reference


@dataclass(frozen=True)
class ResolvedJob:
    """What resolve_job makes of a StreamMergeJob, once: the method, its options, one ResolvedDare per model
    (None: no DARE), the device, the worker threads (clamped to the CPUs), the warnings to report (no-op
    settings, clamped values) and, for mergekit's methods, their resolved parameters."""
    method: MergeMethod
    options: MergeOptions
    dare: tuple[ResolvedDare, ...] | None
    device: torch.device
    threads: int = 1
    warnings: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)          # mergekit-named methods: resolved global parameters
    per_input: dict = field(default_factory=dict)       # and per input label ("base", "model 0", ...)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class Inputs:
    labels: list[str]                 # "base", "model 0", ...
    sources: list[str]
    readers: list[CheckpointReader]
    has_base: bool

    @property
    def reference(self) -> CheckpointReader:
        return self.readers[0]


def run_stream_merge(job: StreamMergeJob) -> dict:
    """Merge checkpoints tensor by tensor into job.output_dir; returns the manifest it writes.

    Also tunes glibc's allocator for this process (utils/engine/allocator.py): streamed temporaries are then
    reused instead of page-faulted in again, which halves wall time here. Torch runs single-threaded
    meanwhile: the work is 4 MiB pieces of memory-bound elementwise passes that stay in cache, where
    intra-op threads' synchronisation costs more than it gains (5-10x slower on a busy 2-core machine,
    measured); parallelism comes from `threads` workers merging different pieces instead."""
    started = time.time()
    tune_allocator()
    resolved = resolve_job(job)
    for warning in resolved.warnings:
        logger.warning(warning)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(job, resolved, started)
    finally:
        torch.set_num_threads(previous_threads)


def _run(job: StreamMergeJob, resolved: ResolvedJob, started: float) -> dict:
    inputs = _open_inputs(job)
    job = _language_only(job, inputs)
    plan, row_targets = _plan(inputs, job)
    layers, depth = _flag_layers(inputs) if resolved.method.layer_aware else ({}, 1)
    groups = flag_groups(inputs, job, resolved, plan, row_targets, layers)
    fates = tensor_fates(inputs, groups, job)
    plan = [PlannedTensor(group.name, group.dtype, group.shape) for group in groups]
    rows = (lambda group, tensors: {ref: pad_rows_with_mean(t, row_targets[group.name]) for ref, t in tensors.items()}) \
        if row_targets else None
    norms_record = None
    if resolved.method.global_norms:
        resolved, norms_record = _resolve_norms(job, resolved, inputs, groups, rows)
        for group in groups:
            group.options = resolved.options
    readers = dict(zip(inputs.labels, inputs.readers))
    execution = Execution(resolved.method, job.seed, resolved.device, resolved.threads, job.tie_order,
                          job.max_shard_size, job.progress, job.method, depth)
    manifest: dict = {}

    def write(staging: Path) -> None:
        reports: dict[str, dict[str, float]] = {}

        def merge() -> list[str]:
            files, kept = execute_plan(groups, readers, {label: i for i, label in enumerate(inputs.labels)},
                                       execution, staging, rows)
            reports.update(kept)
            return files

        files, hashes = _hash_inputs(inputs, merge)
        _check_expected_hashes(job, inputs, hashes)
        donor_files = _copy_model_files(inputs, job, plan, row_targets, staging)
        model_labels = inputs.labels[int(inputs.has_base):]
        manifest.update(_manifest(job, resolved, inputs, hashes, plan, files, donor_files,
                                  [reports.get(label, {}) for label in model_labels], started))
        manifest["tensor_fates"] = fates
        if norms_record is not None:
            manifest["norm_adaptive"] = norms_record
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

    try:
        write_folder_atomic(job.output_dir, write, overwrite=job.overwrite,
                            inputs={f"the {label} input": reader.folder for label, reader in zip(inputs.labels, inputs.readers)})
    except (OutputExistsError, OutputRefusedError) as error:  # the output appeared while this run was writing
        raise MergeError(str(error)) from error
    return manifest


def flag_groups(inputs: Inputs, job: StreamMergeJob, resolved: ResolvedJob, plan: list[PlannedTensor],
                row_targets: dict[str, int], layers: dict[str, int] | None = None) -> list[PlannedGroup]:
    """The flags' plan: one group per tensor of the reference, from the same name in every input; excluded
    tensors (--exclude_param_names_regex) are copied from the reference; vocabulary tensors of different
    row counts are padded (pad_mean) before the merge."""
    method = resolved.method
    labels = inputs.labels
    base = "base" if inputs.has_base and method.base != "ignored" else None
    groups = []
    for planned in plan:
        name = planned.name
        dtypes = [reader.info(name)[0] for reader in inputs.readers]
        compute = dtypes[0]
        for dtype in dtypes[1:]:
            compute = torch.promote_types(compute, dtype) if compute.is_floating_point and dtype.is_floating_point \
                else compute
        vocab = name in row_targets
        if is_excluded(name, job.exclude_regex):
            groups.append(PlannedGroup(name, {labels[0]: name}, None, {}, {}, planned.shape, planned.dtype, dtypes[0],
                                       vocab=vocab, passthrough=True))
            continue
        paper = method.kind == "state_dict"
        dtype = planned.dtype
        if method.float32_result and job.dtype is None and compute.is_floating_point:
            dtype = torch.promote_types(compute, torch.float32)   # mergekit saves its float32 result
        groups.append(PlannedGroup(name, {label: name for label in labels}, base, resolved.params, resolved.per_input,
                                   planned.shape, dtype, compute, vocab=vocab,
                                   dare=(job.dare or DareOptions()) if resolved.dare is not None else None,
                                   options=resolved.options if paper else None, layer=(layers or {}).get(name)))
    return groups


def _flag_layers(inputs: Inputs) -> tuple[dict[str, int], int]:
    """Layer-aware methods (LiNeS): each tensor's block index and the depth, from the reference's layout
    (utils/recipes/architecture.py, as a recipe's planner finds them)."""
    from utils.recipes.architecture import block_layers, read_config
    from utils.recipes.schema import RecipeError

    reference = inputs.reference
    try:
        return block_layers(read_config(reference.folder, inputs.labels[0]), reference.names(), inputs.labels[0])
    except RecipeError as error:
        raise MergeError(f"a layer-aware method needs the layer layout: {error}") from None


def flag_parameters(method: MergeMethod, job: StreamMergeJob) -> tuple[dict, dict]:
    """A mergekit-named method's parameters from the flags: FLAG_PARAMETERS maps --weights, --density,
    --scaling_coefficient and --slerp_t onto the method's parameters (per model or global), --parameter
    KEY=VALUE sets any other; values are validated by the parameter's declaration, required ones checked.
    Returns (global values, per input label values); labels as the engine's ("base", "model 0", ...)."""
    labels = (["base"] if job.base_model else []) + [f"model {i}" for i in range(len(job.models))]
    base = "base" if job.base_model and method.base != "ignored" else None
    values: dict = {}
    for flag, (name, _) in FLAG_PARAMETERS.items():
        value = getattr(job.options, flag)
        if flag == "slerp_t" and method.name != "slerp":
            continue                              # --slerp_t is slerp's t (nearswap's t: --parameter t=...)
        if flag == "scaling_coefficient":
            name = method.scale_parameter or name   # a frontier method's overall scale
        if value is not None and method.parameter(name) is not None:
            values[name] = value
    for item in job.parameters:
        key, sep, text = item.partition("=")
        if not sep or method.parameter(key) is None:
            known = ", ".join(p.name for p in method.parameters) or "none"
            raise MergeError(f"--parameter {item!r}: {method.name} has no parameter {key!r} (its parameters: {known})")
        import yaml

        values[key] = yaml.safe_load(text)
    params, per_input = {}, {label: {} for label in labels}
    for parameter in method.parameters:
        given = values.get(parameter.name)
        if given is None and parameter.name == "weight":
            given = 1.0                           # mergekit requires weights: flags default to 1 each
        if parameter.scope == "global":
            params[parameter.name] = _flag_value(method, parameter, given)
            continue
        scoped = [label for label in labels if parameter.scope == "input" or label != base]
        given = per_model(given, len(scoped), f"--{_flag_of(parameter.name)}") \
            if isinstance(given, (list, tuple)) else [given] * len(scoped)
        for label, value in zip(scoped, given):
            per_input[label][parameter.name] = _flag_value(method, parameter, value)
    return params, per_input


# flag (MergeOptions field) → (parameter of a mergekit-named method, per model?)
FLAG_PARAMETERS = {"weights": ("weight", True), "density": ("density", True),
                   "scaling_coefficient": ("lambda", False), "slerp_t": ("t", False)}


def _flag_value(method: MergeMethod, parameter, value):
    """A flag's value for one parameter: validated by its declaration; the default where not given."""
    if value is None and parameter.required:
        raise MergeError(f"{method.name} needs the parameter {parameter.name!r} (--parameter {parameter.name}=VALUE)")
    return parameter.default if value is None else parameter.validate(value, f"--method {method.name}")


def _flag_of(parameter: str) -> str:
    return next((flag for flag, (name, _) in FLAG_PARAMETERS.items() if name == parameter), "parameter")


def _hash_inputs(inputs: Inputs, merge: Callable[[], list[str]]) -> tuple[list[str], list[list[str]]]:
    """Run `merge` while the inputs' files are hashed beside it (utils/manifest.hash_beside); returns
    merge's result and the digests per input, in weight_files order."""
    paths = [reader.weight_files() for reader in inputs.readers]
    files, digests = hash_beside([path for group in paths for path in group], merge)
    return files, [[digests[path] for path in group] for group in paths]


def _check_expected_hashes(job: StreamMergeJob, inputs: Inputs, hashes: list[list[str]]) -> None:
    """--from_manifest: every input file must still have the sha256 the manifest recorded."""
    if job.expected_sha256 is None:
        return
    for label, reader, digests in zip(inputs.labels, inputs.readers, hashes):
        expected = job.expected_sha256.get(label, {})
        found = {path.name: digest for path, digest in zip(reader.weight_files(), digests)}
        for name in sorted(set(expected) | set(found)):
            if expected.get(name) != found.get(name):
                what = ("is missing" if name not in found else "was not in the recorded inputs" if name not in expected
                        else f"has sha256 {found[name][:16]}…, the manifest recorded {expected[name][:16]}…")
                raise MergeError(f"{label}: {reader.folder / name} {what}; the inputs changed since the manifest "
                                 f"was written")


def resolve_job(job: StreamMergeJob) -> ResolvedJob:
    """Validate the job once (a MergeError names the bad value) and resolve its method, options and DARE."""
    method = get_method(job.method)
    if method.kind == "group" and (job.options.ties_normalize != "count" or job.options.norms is not None
                                   or job.norms_from is not None):
        raise MergeError(f"the paper's options (ties_normalize, norms) apply to the paper's methods "
                         f"(average_merging, task_arithmetic, ties_merging, norm_adaptive, dare); {job.method} is "
                         f"mergekit's")
    if _paper_dare_given(job.dare) and not method.paper_dare:
        raise MergeError(f"the paper's DARE applies to methods that take a base model; {job.method} treats a "
                         f"base as one more input")
    if method.kind != "group" and (job.parameters or job.tie_order != DEFAULT_TIE_ORDER):
        raise MergeError(f"--parameter and --tie_order are for mergekit-named methods, not {job.method}")
    if job.tie_order not in TIE_ORDERS:
        raise MergeError(f"unknown tie order {job.tie_order!r}; valid: {', '.join(TIE_ORDERS)}")
    job.options.validate()
    if method.needs_whole_model(job.options):
        raise MergeError(f"{job.method} needs the whole model in memory (global statistics); "
                         f"use model_merging_methods.merge_state_dicts instead of streaming")
    if method.statistics:
        raise MergeError(f"{job.method} needs data statistics; run it from merge_plms_glue.py")
    if job.dtype is not None and job.dtype not in DTYPES:
        raise MergeError(f"unknown dtype {job.dtype!r}; valid: {', '.join(DTYPES)}")
    if job.merge_part not in MERGE_PARTS:
        raise MergeError(f"unknown merge_part {job.merge_part!r}; valid: {', '.join(MERGE_PARTS)}")
    if job.vocab_alignment not in VOCAB_ALIGNMENTS:
        raise MergeError(f"unknown vocab_alignment {job.vocab_alignment!r}; valid: {', '.join(VOCAB_ALIGNMENTS)}")
    if not job.models:
        raise MergeError("no models to merge")
    for pattern in job.exclude_regex:
        try:
            re.compile(pattern)
        except re.error as error:
            raise MergeError(f"invalid exclude regex {pattern!r}: {error}") from error
    if job.max_shard_size <= 0:
        raise MergeError(f"max shard size must be positive, got {job.max_shard_size} bytes")
    if job.threads <= 0:
        raise MergeError(f"threads must be at least 1, got {job.threads}")
    if (job.norms_from is not None or job.options.norms is not None) and not method.global_norms:
        raise MergeError(f"norms (--norms / --norms_from) are for norm_adaptive, not {job.method}")
    if job.norms_from is not None and job.options.norms is not None:
        raise MergeError("give the norms (--norms) or a file to read them from (--norms_from), not both")
    if job.options.norms is not None and len(job.options.norms) != len(job.models):
        raise MergeError(f"--norms: got {len(job.options.norms)} values for {len(job.models)} models")
    warnings = []
    threads = job.threads
    if threads > available_cpus():
        threads = available_cpus()
        warnings.append(f"{job.threads} threads requested, {threads} CPUs available: using {threads}")
    _check_output_is_not_an_input(job, _local_inputs(job))
    if Path(job.output_dir).exists() and not job.overwrite:
        raise MergeError(f"output folder {job.output_dir} already exists; pass --overwrite to replace it")
    try:
        device = resolve_device(job.device)
    except ValueError as error:
        raise MergeError(str(error)) from error
    dare, options = resolve_dare(method, job.options, job.dare, len(job.models))
    if method.kind == "group":
        count = len(job.models) + (job.base_model is not None and method.base == "ignored")
        if method.needs_base and job.base_model is None:
            raise MergeError(f"{method.name} needs a base (pretrained) model")
        if count < method.min_models or (method.max_models and count > method.max_models):
            need = (f"exactly {method.min_models}" if method.min_models == method.max_models else
                    f"at most {method.max_models}" if method.max_models and count > method.max_models
                    else f"at least {method.min_models}")
            raise MergeError(f"{method.name} takes {need} input models{' besides the base' if method.needs_base else ''}"
                             f"; got {count}")
        params, per_input = flag_parameters(method, job)
        check_dare_base(dare, job.base_model is not None)
        return ResolvedJob(method, options, dare, device, threads, tuple(warnings), params, per_input)
    check_method_inputs(method, job.base_model is not None, len(job.models), None, dare, job.options)
    noop = method.noop(options, dare, len(job.models))
    if noop is not None and noop.error and not job.allow_noop:
        raise MergeError(f"{method.name}: {noop.message}")
    if noop is not None:
        warnings.append(f"{method.name}: {noop.message}")
    return ResolvedJob(method, options, dare, device, threads, tuple(warnings))


def _paper_dare_given(dare: DareOptions | None) -> bool:
    """Any DARE setting other than the defaults (no drop)."""
    return dare is not None and dare != DareOptions() and dare.drop_rate not in (0, 0.0, [0.0], (0.0,))


def _local_inputs(job: StreamMergeJob) -> dict[str, str]:
    """Role → path of every input given as a local path (hub ids are checked once resolved)."""
    named = {"base": job.base_model, **{f"model {i}": m for i, m in enumerate(job.models)},
             "files_from": job.files_from}
    return {role: source for role, source in named.items() if source and Path(source).expanduser().exists()}


def _check_output_is_not_an_input(job: StreamMergeJob, inputs: dict[str, str | os.PathLike]) -> None:
    """Refuse an output folder that is, contains or lies inside an input (even with overwrite): replacing
    it would delete that input. Checked before anything is read, and again once hub ids are resolved."""
    try:   # the one output guard (utils/records.py); also refuses a file or link at --output_dir
        check_output_folder(job.output_dir, {f"the {role} input": source for role, source in inputs.items()},
                            overwrite=True)
    except OutputRefusedError as error:
        raise MergeError(str(error)) from None


def _resolve_norms(job: StreamMergeJob, resolved: ResolvedJob, inputs: Inputs, groups: list[PlannedGroup],
                   rows: Rows | None) -> tuple[ResolvedJob, dict]:
    """norm_adaptive's global norms ‖θ_k − θ_pre‖₂ over the merged tensors (before DARE): as given, read
    from an analysis.json (matched to the inputs, utils/analysis/norms.py), or computed here in a first
    streaming pass (global_norms). Returns the job with options.norms set, and the manifest's record."""
    options = resolved.options
    if job.norms_from is not None:
        from utils.analysis import AnalysisError, norms_from_analysis
        try:
            norms = norms_from_analysis(job.norms_from, inputs.readers[0], inputs.sources[0], inputs.readers[1:],
                                        inputs.sources[1:], job.exclude_regex)
        except AnalysisError as error:
            raise MergeError(str(error)) from error
        source = f"read from {job.norms_from}"
    elif options.norms is not None:
        norms, source = [float(n) for n in options.norms], "given"
    else:
        readers = dict(zip(inputs.labels, inputs.readers))
        try:
            norms = global_norms(groups, readers, resolved.device, rows)
        except MergeError as error:
            label = str(error).split("the task vector of ", 1)[-1].split(" ", 2)
            index = inputs.labels.index(f"{label[0]} {label[1]}") if len(label) > 1 and \
                f"{label[0]} {label[1]}" in inputs.labels else None
            if index is None:
                raise
            raise MergeError(str(error).replace(f"{label[0]} {label[1]}", f"{inputs.labels[index]} "
                                                                          f"({inputs.sources[index]})")) from None
        source = "computed (first streaming pass)"
    weights = norm_adaptive_weights(norms, options.norm_mode, options.norm_alpha, options.norm_beta)
    record = {"norms": norms, "source": source, "mode": options.norm_mode, "alpha": options.norm_alpha,
              "beta": options.norm_beta, "weights": weights, "scaling_coefficient": options.scaling_coefficient}
    return replace(resolved, options=replace(options, norms=tuple(norms))), record


def _open_inputs(job: StreamMergeJob) -> Inputs:
    sources = ([job.base_model] if job.base_model else []) + list(job.models)
    labels = (["base"] if job.base_model else []) + [f"model {i}" for i in range(len(job.models))]
    opened = [open_checkpoint(s, job.allow_pickle) for s in sources]   # 'base+adapter': LoRA folded per tensor
    folders, readers = [folder for folder, _ in opened], [reader for _, reader in opened]
    resolved = dict(zip(labels, folders))
    if job.files_from:
        resolved["files_from"] = resolve_checkpoint(job.files_from, job.allow_pickle)
    _check_output_is_not_an_input(job, resolved)
    return Inputs(labels, sources, readers, job.base_model is not None)


def _plan(inputs: Inputs, job: StreamMergeJob) -> tuple[list[PlannedTensor], dict[str, int]]:
    """Output tensors in the reference's order, their dtypes and shapes; rows to pad per vocab tensor."""
    reference_names = inputs.reference.names()
    for label, source, reader in zip(inputs.labels, inputs.sources, inputs.readers):
        names = set(reader.names())
        missing = [n for n in reference_names if n not in names]
        if missing:
            raise MergeError(f"tensor {missing[0]!r} is missing from {label} ({source})")
        extra = sorted(names - set(reference_names))
        if extra:
            raise MergeError(f"tensor {extra[0]!r} of {label} ({source}) is not in {inputs.labels[0]} "
                             f"({inputs.sources[0]})")
    out_dtype = DTYPES.get(job.dtype) if job.dtype else None
    plan, row_targets = [], {}
    for name in reference_names:
        dtype, shape = inputs.reference.info(name)
        shapes = [reader.info(name)[1] for reader in inputs.readers]
        if any(s != shape for s in shapes):
            shape = _aligned_shape(name, shapes, inputs, job)
            row_targets[name] = shape[0]
        planned_dtype = out_dtype if out_dtype is not None and dtype.is_floating_point else dtype
        plan.append(PlannedTensor(name, planned_dtype, tuple(shape)))
    return plan, row_targets


def _language_only(job: StreamMergeJob, inputs: Inputs) -> StreamMergeJob:
    """--merge_part language: the modules outside a multimodal model's language model (vision tower,
    projector) are copied from the reference, as --exclude_param_names_regex copies (one regex added)."""
    if job.merge_part != "language":
        return job
    from utils.recipes.architecture import language_only_regex
    from utils.recipes.schema import RecipeError

    try:
        pattern = language_only_regex(inputs.reference.folder, inputs.reference.names(), inputs.labels[0])
    except RecipeError as error:
        raise MergeError(f"--merge_part language: {error}") from None
    if pattern is None or pattern in job.exclude_regex:
        return job
    return replace(job, exclude_regex=list(job.exclude_regex) + [pattern])


def tensor_fates(inputs: Inputs, groups: list[PlannedGroup], job: StreamMergeJob) -> dict:
    """Every input tensor's fate in the groups the executor runs (utils/engine/accounting.py): merged, or
    copied from the reference when excluded (the other inputs' copies dropped by the exclusion); a
    MergeError names any tensor left out."""
    names = {label: reader.names() for label, reader in zip(inputs.labels, inputs.readers)}
    rule = DropRule("--exclude_param_names_regex (copied from the reference input)",
                    lambda label, name: label != inputs.labels[0] and is_excluded(name, job.exclude_regex))
    try:
        return account(names, {group.name: group.sources for group in groups}, [rule])
    except UnaccountedTensors as error:
        raise MergeError(str(error)) from None


def _aligned_shape(name: str, shapes: list[tuple], inputs: Inputs, job: StreamMergeJob) -> tuple:
    first = shapes[0]
    odd = next(i for i, s in enumerate(shapes) if s != first)
    description = (f"shape mismatch for {name!r}: {first} in {inputs.labels[0]} ({inputs.sources[0]}) vs "
                   f"{shapes[odd]} in {inputs.labels[odd]} ({inputs.sources[odd]})")
    same_tail = all(len(s) == len(first) and s[1:] == first[1:] for s in shapes)
    if same_tail and len(first) == 2 and VOCAB_TENSOR.search(name) and job.vocab_alignment != "pad_mean":
        raise MergeError(f"vocabulary sizes differ: {name!r} has {first[0]} rows in {inputs.labels[0]} "
                         f"({inputs.sources[0]}) but {shapes[odd][0]} in {inputs.labels[odd]} ({inputs.sources[odd]}); "
                         f"pass --vocab_alignment pad_mean (the paper's: rows beyond a model's vocabulary set to the "
                         f"mean of its rows), or merge with a recipe whose tokenizer_source builds one vocabulary")
    if job.vocab_alignment != "pad_mean" or not same_tail:
        raise MergeError(description)
    return (max(s[0] for s in shapes),) + tuple(first[1:])


def pad_rows_with_mean(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The paper's pad-token alignment: new rows (beyond the vocabulary) = mean of the existing rows."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, *tensor.shape[1:])])


# ----------------------------------------------------------------------------------------------
# the executor: one plan (a list of PlannedGroup), whichever interface made it


@dataclass(frozen=True)
class Execution:
    """How a plan runs: the method (one for the whole plan), the seed of every draw, the device, the worker
    threads, the tie order of mergekit's rank cuts, the shard size and a progress bar label."""
    method: MergeMethod
    seed: int = 0
    device: torch.device = torch.device("cpu")
    threads: int = 1
    tie_order: str = DEFAULT_TIE_ORDER
    max_shard_size: int = 5 * 2**30
    progress: bool = False
    label: str = ""
    num_layers: int = 1          # the output's depth (layer-aware methods: LiNeS)


Rows = Callable[[PlannedGroup, dict], dict]   # whole tensors of a vocabulary group → their rows in the output order


def execute_plan(groups: list[PlannedGroup], readers: dict, indices: dict[str, int], execution: Execution,
                 staging: Path, rows: Rows | None = None,
                 norms: list[float] | None = None) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Merge every planned group and write it, in plan order, into sharded safetensors files in `staging`;
    returns the files written and, per model id, the paper DARE's kept fraction of every tensor.

    `readers[id]` reads input `id` (get(name, start, stop), info(name)); `indices[id]` is its position among
    the inputs (mergekit's draws use it). `execution.threads` workers each read and merge one group or one
    flat piece of PIECE elements (torch ops single-threaded: on a busy machine intra-op threads cost more
    than they gain); the results are written in order with at most 2·threads pieces (or `threads` whole
    groups, of which one above LARGE_WHOLE elements) in flight, so peak memory is a few pieces per worker for
    every method that streams, and one large tensor's temporaries for those that cannot:
    - mergekit's methods stream as MergeMethod.piece_mode says, after the whole-tensor statistics passes
      (statistics.prepare) where it is "statistics";
    - the paper's methods stream when elementwise, after DARE whose draws depend on position only (random,
      no L1 rescale); TIES's per-tensor trim thresholds are found first by streamed radix selection over the
      same DARE'd deltas (paper_thresholds), so pieces give the bits of the whole tensor.
    Vocabulary groups (`group.vocab` with `rows`) are re-rowed once (a recipe's tokenizer permutation, the
    flags' pad_mean) and their permuted tensors then stream like any. `norms`: norm_adaptive's global norms
    (global_norms), given to every group whose parameters do not carry them."""
    method = execution.method
    writer = ShardedSafetensorsWriter(staging, [PlannedTensor(g.name, g.dtype, g.shape) for g in groups],
                                      execution.max_shard_size, inputs=list(readers.values()))
    function = method.implementation()
    progress = None
    if execution.progress:
        from tqdm import tqdm
        progress = tqdm(total=len(groups), desc=f"merging ({execution.label or method.name})", unit="tensor")
    from utils.progress import Meter

    meter = Meter(f"merging ({execution.label or method.name})", len(groups), "tensor")   # a sweep's progress file
    permuted: dict[str, dict[str, torch.Tensor]] = {}   # vocabulary groups streamed: rows in the output order
    reports: dict[str, dict[str, float]] = {}
    kept: dict[str, list[float]] = {}

    def load(group: PlannedGroup, piece: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        if group.name in permuted:
            return {ref: t.reshape(-1)[slice(*piece) if piece else slice(None)] for ref, t in permuted[group.name].items()}
        span = piece or (None, None)
        tensors = {ref: readers[ref].get(name, *span) for ref, name in group.sources.items()}
        if group.dare is not None and method.kind != "state_dict":   # DARE'd inputs, then any method
            tensors = dare_inputs(tensors, group.base, group.models, group.name,
                                  group.dare.resolve(len(group.models)), seed=execution.seed,
                                  offset=(piece[0], group.numel) if piece else None)
        # cast to the compute dtype first (mergekit's `dtype` is a load dtype: rows are averaged in it)
        tensors = {ref: t.to(device=execution.device, dtype=group.compute_dtype if t.is_floating_point() else t.dtype)
                   for ref, t in tensors.items()}
        if group.vocab and rows is not None and piece is None:
            tensors = rows(group, tensors)
        return tensors

    def slots(group: PlannedGroup, piece: tuple[int, int] | None = None) -> dict[str, RandomSlot]:
        """Each input's draws for the tensor, or for the piece's positions of it (the same numbers)."""
        start, total = (piece[0], group.numel) if piece else (0, None)
        return {ref: RandomSlot(execution.seed, indices[ref], group.name, start, total) for ref in group.sources} \
            if method.randomized else {}

    def merge(group: PlannedGroup, piece: tuple[int, int] | None, index: int = 0,
              prepared: Prepared | None = None, thresholds: list | None = None):
        try:
            tensors = load(group, piece)
            if method.kind == "state_dict" and not group.passthrough:
                return _paper_merge(method, group, tensors, piece, execution.seed, norms, thresholds)
            fields = prepared.call_fields(index, piece, group.numel) if prepared is not None else {}
            call = TensorGroupCall(tensors, group.base, group.params, group.per_input, slots(group, piece),
                                   execution.tie_order, **fields, name=group.name, layer=group.layer,
                                   num_layers=execution.num_layers)
            merged = run_group(passthrough if group.passthrough else function, call)
        except BaseException as error:
            if prepared is not None:
                prepared.abort()          # later pieces must not wait for this one's tie counts
            if isinstance(error, MergeError) and "(while merging tensor" not in str(error):
                raise type(error)(f"{error} (while merging tensor {group.name!r})") from None
            raise
        return (merged.to(group.dtype) if merged.is_floating_point() else merged), None

    def pieces(group: PlannedGroup) -> tuple[list[tuple[int, int] | None], str]:
        """Flat pieces for large tensors of merges that stream (read piece by piece), else the whole tensor;
        and the piece mode ("elementwise", "statistics" or "whole")."""
        if group.passthrough:
            mode = "elementwise"
        elif method.kind == "state_dict":
            mode = _paper_piece_mode(method, group)
        elif group.dare is not None and _dare_needs_whole(group.dare):
            mode = "whole"
        else:
            mode = method.piece_mode(group.params, group.per_input, execution.tie_order)
        if group.numel <= PIECE or mode == "whole":
            return [None], "whole"
        if group.vocab and rows is not None:
            # an input's rows move to the output's order: re-row each input once, here, and stream pieces
            # of the re-rowed tensors (no whole-tensor temporaries of the merge)
            permuted[group.name] = load(group, None)
        return [(start, min(start + PIECE, group.numel)) for start in range(0, group.numel, PIECE)], mode

    pending: deque[tuple[PlannedGroup, tuple[int, int] | None, bool, Future]] = deque()

    def write_oldest() -> None:
        group, span, last, future = pending.popleft()
        merged, fractions = future.result()
        writer.write(group.name, merged, part=span is not None)
        if fractions is not None:
            size = (span[1] - span[0]) if span is not None else group.numel
            totals = kept.setdefault(group.name, [0.0] * len(fractions))
            kept[group.name] = [t + (f or 0.0) * size for t, f in zip(totals, fractions)]
        if last:
            permuted.pop(group.name, None)
            totals = kept.pop(group.name, None)
            if totals is not None:
                for ref, total, fraction in zip(group.models, totals, fractions):
                    if fraction is not None:
                        reports.setdefault(ref, {})[group.name] = total / max(group.numel, 1)
            if progress is not None:
                progress.update()
            meter.update()

    threads = max(1, execution.threads)
    limit = 2 * threads
    with ThreadPoolExecutor(threads) as pool:
        for group in groups:
            spans, mode = pieces(group)
            prepared, thresholds = None, None
            if mode == "statistics" and method.kind == "group":
                prepared = prepare(method, group.base, group.per_input, group.params, slots(group),
                                   lambda span, group=group: load(group, span), group.numel, group.compute_dtype,
                                   PIECE, pool, limit)
            elif mode == "statistics":
                thresholds = paper_thresholds(group, lambda span, group=group: load(group, span), execution,
                                              pool, limit)
            if spans == [None] and group.numel > LARGE_WHOLE:
                # one large whole-tensor group at a time: two (embeddings and lm_head, side by side) doubled
                # the peak of every whole-tensor method; smaller work still runs beside it
                while any(g.numel > LARGE_WHOLE and part is None for g, part, _, _ in pending):
                    write_oldest()
            for index, span in enumerate(spans):
                pending.append((group, span, index == len(spans) - 1,
                                pool.submit(merge, group, span, index, prepared, thresholds)))
                while len(pending) >= (limit if span is not None else threads):
                    write_oldest()
        while pending:
            write_oldest()
    if progress is not None:
        progress.close()
    meter.close()
    return writer.finish(), reports


def group_options(method: MergeMethod, group: PlannedGroup, norms: list[float] | None = None) -> MergeOptions:
    """A paper method's MergeOptions for one group: as given (flags), else from its resolved parameters."""
    options = group.options if group.options is not None else \
        options_from_parameters(method, group.params, group.per_input, group.models)
    if norms is not None and method.global_norms and options.norms is None:
        options = replace(options, norms=tuple(norms))
    return options


def _dare_needs_whole(dare: DareOptions) -> bool:
    """Magnitude DARE ranks the whole tensor and the l1 rescale sums it; random draws depend on position only."""
    return dare.strategy != "random" or (dare.rescale and dare.rescale_mode == "l1")


def _paper_piece_mode(method: MergeMethod, group: PlannedGroup) -> str:
    """How a paper method's large tensor streams: "elementwise" (independent flat pieces: an elementwise
    method after DARE whose draws depend on position only), "statistics" (the same, after the whole tensor's
    TIES trim thresholds), or "whole" (magnitude DARE ranks and the l1 rescale needs the whole tensor)."""
    dare = group.dare
    if not method.elementwise or (dare is not None and _dare_needs_whole(dare)):
        return "whole"
    if method.trim_thresholds and min(group_options(method, group).densities(len(group.models))) < 1:
        return "statistics"
    return "elementwise"


def _paper_merge(method: MergeMethod, group: PlannedGroup, tensors: dict[str, torch.Tensor],
                 piece: tuple[int, int] | None, seed: int, norms: list[float] | None,
                 thresholds: list | None) -> tuple[torch.Tensor, list[float | None]]:
    """One tensor (or flat piece) of a paper method: MergeLM's float32 arithmetic after the paper's DARE;
    returns it and each model's DARE kept fraction (None without DARE)."""
    options = group_options(method, group, norms)
    dare = group.dare.resolve(len(group.models)) if group.dare is not None else None
    report: list[dict[str, float]] = [{} for _ in group.models]
    merged = merge_tensor_group(method, group.name, tensors, group.base, options, dare, seed=seed,
                                offset=(piece[0], group.numel) if piece else None, out_dtype=group.dtype,
                                statistics=thresholds, report=report)
    return merged, [r.get(group.name) for r in report]


def paper_thresholds(group: PlannedGroup, load: Callable, execution: Execution, pool: ThreadPoolExecutor,
                     in_flight: int) -> list[dict[str, torch.Tensor]]:
    """Per model, TIES's trim threshold of this whole tensor (ties.trim_threshold), from the same (DARE'd)
    delta that the merge computes piece by piece, so that merging flat pieces gives bit-identical results.

    Exact radix selection over streamed pieces (model_merging_methods/selection.py): one counting pass
    of every piece, and a second one only for the models whose k-th smallest |δ| is not the smallest
    value of its high-16-bit bin. The pieces are re-read and their deltas (DARE draws included: they
    depend only on the seed, model, tensor and position) recomputed per pass; the workers count pieces
    in parallel, a few in flight at a time, so memory stays at a few pieces whatever the tensor size."""
    models, numel, name = group.models, group.numel, group.name
    dare = group.dare.resolve(len(models)) if group.dare is not None else None
    ranks = [trim_rank(numel, d) for d in group_options(execution.method, group).densities(len(models))]
    selections = {index: [RadixSelect(k, numel)] for index, k in enumerate(ranks) if k}
    spans = [(start, min(start + PIECE, numel)) for start in range(0, numel, PIECE)]

    def deltas(span: tuple[int, int], indices: set) -> dict[int, torch.Tensor]:
        tensors = load(span)
        base = tensors[group.base].float()
        out = {}
        for index in sorted(indices):
            model = tensors[models[index]].float()
            out[index] = model.sub_(base) if dare is None else dare_one_model(
                {name: model}, {name: base}, dare[index], on_deltas=True, seed=execution.seed, model_index=index,
                offsets={name: (span[0], numel)}).pop(name)
        return out

    select_streamed(selections, lambda work, reduce: map_in_order(pool, spans, work, reduce, in_flight), deltas)
    return [{name: torch.tensor(selections[index][0].value if index in selections else 0.0)}
            for index in range(len(ranks))]


def global_norms(groups: list[PlannedGroup], readers: dict, device: torch.device, rows: Rows | None = None,
                 order: Callable[[PlannedGroup], int] | None = None) -> list[float]:
    """norm_adaptive's ‖θ_k − θ_pre‖₂ per model over every merged float group (before DARE): δ in float32,
    the squares summed in float64 per piece of PIECE elements (whole tensors up to PIECE and re-rowed
    vocabulary tensors), the pieces' sums added in `order` (default: plan order)."""
    groups = [g for g in groups if not g.passthrough and g.base is not None and g.compute_dtype.is_floating_point]
    if order is not None:
        groups = sorted(groups, key=order)
    squares: list[float] = []
    for group in groups:
        if not squares:
            squares = [0.0] * len(group.models)
        numel = group.numel
        whole = numel <= PIECE or (group.vocab and rows is not None)
        spans = [None] if whole else [(s, min(s + PIECE, numel)) for s in range(0, numel, PIECE)]
        for span in spans:
            tensors = {ref: readers[ref].get(name, *(span or (None, None))) for ref, name in group.sources.items()}
            if group.vocab and rows is not None:
                tensors = rows(group, tensors)
            base = tensors[group.base].to(device)
            for index, ref in enumerate(group.models):
                square = squared_norm(tensors[ref].to(device), base)
                if not math.isfinite(square):
                    raise MergeError(f"the task vector of {ref} is not finite (NaN/Inf) in tensor {group.name!r}")
                squares[index] += square
    return [math.sqrt(s) for s in squares]


def _copy_model_files(inputs: Inputs, job: StreamMergeJob, plan: list[PlannedTensor], row_targets: dict[str, int],
                      staging: Path) -> dict:
    """Copy what a model folder needs (MODEL_FILE_PATTERNS) from the donor: `files_from`, else the base
    (else models[0]), else, when vocabularies were aligned, the input whose vocabulary is the merged one.
    config.json states the dtype of the tensors written and the aligned vocabulary size. Returns the
    donor, the files copied and those left out (for the manifest)."""
    donor = job.files_from or inputs.sources[0]
    if job.files_from is None and row_targets:
        name, rows = next(iter(row_targets.items()))
        index = next(i for i, r in enumerate(inputs.readers) if r.info(name)[1][0] == rows)
        donor = inputs.sources[index]
    copied = copy_model_files(resolve_checkpoint(donor, job.allow_pickle), staging)
    config_path = staging / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        dtype = _written_dtype(plan)
        if dtype is not None:
            config["dtype"] = dtype
            if "torch_dtype" in config:     # transformers < 4.56 reads this key: both say the same
                config["torch_dtype"] = dtype
        if row_targets and "vocab_size" in config:
            config["vocab_size"] = max(row_targets.values())
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return copied | {"from": donor}


def _written_dtype(plan: list[PlannedTensor]) -> str | None:
    """The floating dtype holding most of the written bytes (the only one, unless the inputs mix dtypes)."""
    sizes: dict[torch.dtype, int] = {}
    for planned in plan:
        if planned.dtype.is_floating_point:
            sizes[planned.dtype] = sizes.get(planned.dtype, 0) + planned.nbytes
    return str(max(sizes, key=sizes.get)).removeprefix("torch.") if sizes else None


def _applicable_options(job: StreamMergeJob, resolved: ResolvedJob) -> dict:
    """The job's settings that can change the weights of this method, as given: everything a re-run needs
    (other settings keep their defaults there, which cannot matter)."""
    method = resolved.method
    if method.kind == "group":      # mergekit's methods: the flags mapped onto their parameters
        used = [flag for flag, (name, _) in FLAG_PARAMETERS.items()
                if method.parameter(method.scale_parameter or name if flag == "scaling_coefficient" else name)
                is not None and (flag != "slerp_t" or method.name == "slerp")]
        record = {"options": {k: list(v) if isinstance(v, tuple) else v
                              for k, v in ((flag, getattr(job.options, flag)) for flag in used)},
                  "parameters": list(job.parameters)}
        if method.sparsification in ("magnitude", "outliers"):
            record["tie_order"] = job.tie_order
        if method.randomized:
            record["seed"] = job.seed
    else:
        options = {name: getattr(job.options, name) for name in method.options_used}
        record = {"options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
    if resolved.dare is not None:
        record["dare"] = asdict(job.dare or DareOptions())
        if resolved.dare[0].strategy == "random":
            record["seed"] = job.seed
    return record


def _rerun_record(job: StreamMergeJob, resolved: ResolvedJob, inputs: Inputs) -> dict:
    """What `job_from_manifest` needs to write the same weights again (local inputs as absolute paths)."""
    def where(source: str | None) -> str | None:
        if source is None:
            return None
        path = Path(source).expanduser()
        return str(path.resolve()) if path.exists() else source

    return {"base_model": where(job.base_model), "models": [where(m) for m in job.models], "method": job.method,
            **_applicable_options(job, resolved), "dtype": job.dtype, "exclude_regex": list(job.exclude_regex),
            "vocab_alignment": job.vocab_alignment, "files_from": where(job.files_from),
            "allow_pickle": job.allow_pickle, "max_shard_size": job.max_shard_size, "device": job.device,
            "merge_part": job.merge_part}


def job_from_manifest(manifest: dict, output_dir: str, *, overwrite: bool = False, progress: bool = True,
                      threads: int | None = None) -> StreamMergeJob:
    """The job that wrote a merge manifest (its "rerun" record), writing to `output_dir`; the inputs must
    still have the recorded sha256 (checked while merging, before anything is published)."""
    try:
        record = dict(manifest["rerun"])
        models = record.get("models")
        if not isinstance(models, list) or not all(isinstance(model, str) for model in models):
            raise MergeError(f"not a merge manifest of this version: rerun.models must be a list of model paths, "
                             f"got {models!r}"[:500])   # a string would be read as one model per character
        options = MergeOptions(**record.pop("options"))
        dare = record.pop("dare", None)
        expected = {entry["role"]: {f["file"]: f["sha256"] for f in entry["files"]} for entry in manifest["inputs"]}
        job = StreamMergeJob(**record, output_dir=output_dir, options=options,
                             dare=DareOptions(**dare) if dare is not None else None, overwrite=overwrite,
                             progress=progress, allow_noop=True, expected_sha256=expected)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise MergeError(f"not a merge manifest of this version (no usable rerun record: {error!r})") from error
    if threads is not None:
        job.threads = threads
    return job


def job_from_manifest_file(path: str | os.PathLike, output_dir: str, **settings) -> StreamMergeJob:
    """job_from_manifest of a merge_manifest.json file; a MergeError names the file."""
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MergeError(f"{path}: not valid JSON ({error})") from error
    try:
        return job_from_manifest(manifest, output_dir, **settings)
    except MergeError as error:
        raise MergeError(f"{path}: {error}") from error


def _manifest(job: StreamMergeJob, resolved: ResolvedJob, inputs: Inputs, hashes: list[list[str]],
              plan: list[PlannedTensor], files: list[str], donor_files: dict, reports: list[dict[str, float]],
              started: float) -> dict:
    method = resolved.method
    excluded = [p.name for p in plan if is_excluded(p.name, job.exclude_regex)]
    described = [input_record(label, source, reader.folder, reader.weight_files(),
                              dict(zip(reader.weight_files(), digests)))
                 for label, source, reader, digests in zip(inputs.labels, inputs.sources, inputs.readers, hashes)]
    manifest = run_manifest(
        "merge_models (streaming executor)", started, described,
        method={"name": method.name, "requested": job.method, "paper": method.paper, "semantics": method.semantics},
        **_applicable_options(job, resolved),
        output={"files": files, "num_tensors": len(plan), "total_bytes": sum(p.nbytes for p in plan),
                "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in plan}),
                "dtype": job.dtype or "the reference's", "exclude_regex": list(job.exclude_regex),
                "vocab_alignment": job.vocab_alignment, "model_files": donor_files},
        excluded_tensors=excluded,
        **({"resolved_parameters": {"global": resolved.params, "per_input": resolved.per_input}}
           if method.kind == "group" else {}),
        warnings=list(resolved.warnings),
        device=str(resolved.device),
        rerun=_rerun_record(job, resolved, inputs),
    )
    if resolved.dare is not None:
        manifest["dare"] = {
            "given": manifest["dare"],
            "resolved": asdict(resolved.dare[0]) | {"drop_rate": [d.drop_rate for d in resolved.dare]},
        }
        if method.kind == "state_dict":   # a paper method counts what DARE kept inside its merge
            manifest["dare"]["per_model"] = [{"model": label, "kept_fraction_overall": _overall(report, plan),
                                              "kept_fraction": report}
                                             for label, report in zip(inputs.labels[int(inputs.has_base):], reports)]
    return manifest


def _overall(report: dict[str, float], plan: list[PlannedTensor]) -> float | None:
    sizes = {p.name: p.nbytes / torch.empty((), dtype=p.dtype).element_size() for p in plan}
    total = sum(sizes[n] for n in report)
    return sum(report[n] * sizes[n] for n in report) / total if total else None

