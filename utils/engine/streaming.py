"""Streaming merge engine: read each tensor from every checkpoint, merge it, write it, forget it.

Peak memory is a few tensors (one per input plus temporaries), not the model size. Output goes to a
staging folder beside the target that is published (utils/records.py) only when everything is written.
The job's options are validated and resolved once, at entry (resolve_job); the rest takes resolved values.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from model_merging_methods import (SEGMENT, DareOptions, MergeError, MergeMethod, MergeOptions, RadixSelect,
                                   ResolvedDare, check_method_inputs, dare_one_model, get_method, is_excluded,
                                   merge_resolved, norm_adaptive_weights, resolve_dare, select_streamed, trim_rank,
                                   trim_threshold)
from model_merging_methods.norm_adaptive import squared_norm
from utils.cli import resolve_device
from utils.records import (OutputExistsError, OutputRefusedError, check_output_folder, library_versions,
                           project_provenance, write_folder_atomic)

from .accounting import DropRule, UnaccountedTensors, account, same_name_outputs
from .allocator import tune_allocator
from .choices import DTYPE_NAMES, MERGE_PARTS, VOCAB_ALIGNMENTS
from .reader import (WEIGHT_SUFFIXES, CheckpointReader, file_sha256, known_sha256, open_checkpoint,
                     remember_sha256, resolve_checkpoint)
from .writer import PlannedTensor, ShardedSafetensorsWriter

PIECE = SEGMENT  # elements per streamed piece of a large tensor (4 MiB in float32: temporaries stay in cache)
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# what a model folder needs besides its weights: config, generation config, tokenizer files, chat template,
# processor configs, and the custom code a config's auto_map names; anything else is listed, not copied
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                       "added_tokens.json", "vocab.*", "merges.txt", "*.model", "chat_template.*",
                       "preprocessor_config.json", "processor_config.json", "configuration_*.py",
                       "modeling_*.py", "tokenization_*.py")
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
    merge_part: str = "all"           # "language": a multimodal model's other modules copied from the reference


@dataclass(frozen=True)
class ResolvedJob:
    """What resolve_job makes of a StreamMergeJob, once: the method, its options after DARE resolution
    (dare_* methods: density 1), one ResolvedDare per model (None: no DARE), the device, the worker
    threads (clamped to the CPUs) and the warnings to report (no-op settings, clamped values)."""
    method: MergeMethod
    options: MergeOptions
    dare: tuple[ResolvedDare, ...] | None
    device: torch.device
    threads: int = 1
    warnings: tuple[str, ...] = ()


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
    fates = tensor_fates(inputs, plan, job)
    norms_record = None
    if resolved.method.global_norms:
        resolved, norms_record = _resolve_norms(job, resolved, inputs, plan, row_targets)
    manifest: dict = {}

    def write(staging: Path) -> None:
        reports: list[dict[str, float]] = [{} for _ in job.models]
        files, hashes = _hash_inputs(inputs, lambda: _merge_tensors(inputs, job, resolved, plan, row_targets,
                                                                     staging, reports))
        _check_expected_hashes(job, inputs, hashes)
        donor_files = _copy_model_files(inputs, job, plan, row_targets, staging)
        manifest.update(_manifest(job, resolved, inputs, hashes, plan, files, donor_files, reports,
                                  time.time() - started))
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


def _hash_inputs(inputs: Inputs, merge: Callable[[], list[str]]) -> tuple[list[str], list[list[str]]]:
    """Run `merge` while one thread computes the sha256 of every input file not already known
    (reader.known_sha256: hub blobs, earlier runs); returns merge's result and the digests per input.
    sha256 costs ~0.6 s of CPU per GB, more than the merge's own arithmetic: on a machine with a free core
    it hides behind the merge, and a sweep over the same inputs pays it once (README: provenance)."""
    paths = [reader.weight_files() for reader in inputs.readers]
    known = {path: known_sha256(path) for group in paths for path in group}
    stop = threading.Event()
    with ThreadPoolExecutor(1) as hasher:
        futures = {path: hasher.submit(file_sha256, path, stop=stop) for path, digest in known.items()
                   if digest is None}
        try:
            files = merge()
        except BaseException:
            stop.set()     # an interrupted or failed merge does not wait for the hashes
            raise
        computed = {path: future.result() for path, future in futures.items()}
    if computed:
        remember_sha256(computed)
    digests = {**known, **computed}
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
    check_method_inputs(method, job.base_model is not None, len(job.models), None, dare, job.options)
    noop = method.noop(options, dare, len(job.models))
    if noop is not None and noop.error and not job.allow_noop:
        raise MergeError(f"{method.name}: {noop.message}")
    if noop is not None:
        warnings.append(f"{method.name}: {noop.message}")
    return ResolvedJob(method, options, dare, device, threads, tuple(warnings))


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


def _resolve_norms(job: StreamMergeJob, resolved: ResolvedJob, inputs: Inputs, plan: list[PlannedTensor],
                   row_targets: dict[str, int]) -> tuple[ResolvedJob, dict]:
    """norm_adaptive's global norms ‖θ_k − θ_pre‖₂ over the merged tensors (before DARE): as given, read
    from an analysis.json (matched to the inputs, utils/analysis/norms.py), or computed here in a first
    streaming pass. Returns the job with options.norms set, and the manifest's record of them."""
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
        names = [p.name for p in plan if inputs.reference.info(p.name)[0].is_floating_point
                 and not is_excluded(p.name, job.exclude_regex)]
        norms, source = _task_vector_norms(inputs, resolved, names, row_targets), "computed (first streaming pass)"
    weights = norm_adaptive_weights(norms, options.norm_mode, options.norm_alpha, options.norm_beta)
    record = {"norms": norms, "source": source, "mode": options.norm_mode, "alpha": options.norm_alpha,
              "beta": options.norm_beta, "weights": weights, "scaling_coefficient": options.scaling_coefficient}
    return replace(resolved, options=replace(options, norms=tuple(norms))), record


def _task_vector_norms(inputs: Inputs, resolved: ResolvedJob, names: list[str],
                       row_targets: dict[str, int]) -> list[float]:
    """‖θ_k − θ_pre‖₂ per model, read piece by piece (rows padded as the merge pads them)."""
    squares = [0.0] * (len(inputs.readers) - 1)
    for name in names:
        if name in row_targets:
            pieces = [[pad_rows_with_mean(r.get(name), row_targets[name]) for r in inputs.readers]]
        else:
            numel = math.prod(inputs.reference.info(name)[1])
            pieces = ([r.get(name, start, min(start + PIECE, numel)) for r in inputs.readers]
                      for start in range(0, numel, PIECE))
        for tensors in pieces:
            base = tensors[0].to(resolved.device)
            for index, tensor in enumerate(tensors[1:]):
                square = squared_norm(tensor.to(resolved.device), base)
                if not math.isfinite(square):
                    raise MergeError(f"the task vector of {inputs.labels[index + 1]} ({inputs.sources[index + 1]}) "
                                     f"is not finite (NaN/Inf) in tensor {name!r}")
                squares[index] += square
    return [math.sqrt(s) for s in squares]


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


def tensor_fates(inputs: Inputs, plan: list[PlannedTensor], job: StreamMergeJob) -> dict:
    """Every input tensor's fate (utils/engine/accounting.py): merged, or copied from the reference when
    excluded (the other inputs' copies dropped by the exclusion); a MergeError names any tensor left out."""
    names = {label: reader.names() for label, reader in zip(inputs.labels, inputs.readers)}
    excluded = lambda name: is_excluded(name, job.exclude_regex)  # noqa: E731
    outputs = same_name_outputs(names, [p.name for p in plan], inputs.labels[0], excluded)
    rule = DropRule("--exclude_param_names_regex (copied from the reference input)",
                    lambda label, name: label != inputs.labels[0] and excluded(name))
    try:
        return account(names, outputs, [rule])
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


def _merge_tensors(inputs: Inputs, job: StreamMergeJob, resolved: ResolvedJob, plan: list[PlannedTensor],
                   row_targets: dict[str, int], staging: Path, reports: list[dict[str, float]]) -> list[str]:
    """Merge and write every planned tensor.

    Large tensors of elementwise merges go in flat pieces that `job.threads` worker threads merge
    concurrently (each torch op single-threaded, the GIL released inside it), written in order.
    Other tensors are merged whole in this thread, with no piece in flight.
    """
    writer = ShardedSafetensorsWriter(staging, plan, job.max_shard_size, inputs=inputs.readers)
    iterator = plan
    if job.progress:
        from tqdm import tqdm
        iterator = tqdm(plan, desc=f"merging ({job.method})", unit="tensor")
    method, dare = resolved.method, resolved.dare
    # Flat pieces need every output entry to depend only on the same entries of the inputs: magnitude DARE
    # ranks the whole tensor and the l1 rescale multiplies by a whole-tensor norm ratio, so both go whole.
    in_pieces = method.elementwise and (dare is None or all(d.strategy == "random" and not
                                                            (d.rescale and d.rescale_mode == "l1") for d in dare))
    densities = resolved.options.densities(len(job.models))
    thresholds_needed = method.trim_thresholds and min(densities) < 1.0
    kept: dict[str, list[float]] = {}
    pending: deque[Future] = deque()

    def finish_oldest() -> None:
        planned, start, stop, numel, merged, fractions = pending.popleft().result()
        writer.write(planned.name, merged, part=True)
        totals = kept.setdefault(planned.name, [0.0] * len(reports))
        kept[planned.name] = [t + (f or 0.0) * (stop - start) for t, f in zip(totals, fractions)]
        if stop == numel:
            fractions = [t / numel if f is not None else None for t, f in zip(kept.pop(planned.name), fractions)]
            _record(reports, planned.name, fractions)

    def merge_piece(planned, start, stop, numel, thresholds):
        tensors = [reader.get(planned.name, start, stop) for reader in inputs.readers]
        merged, fractions = _merge_one(inputs, job, resolved, planned, tensors, (start, numel), thresholds)
        return planned, start, stop, numel, merged, fractions

    threads = resolved.threads
    with ThreadPoolExecutor(threads) as pool:
        for planned in iterator:
            numel = planned.numel
            if in_pieces and planned.name not in row_targets and numel > PIECE:
                thresholds = None
                if thresholds_needed and not is_excluded(planned.name, job.exclude_regex):
                    thresholds = _trim_thresholds(inputs, job, resolved, planned.name, numel, densities, pool)
                for start in range(0, numel, PIECE):
                    pending.append(pool.submit(merge_piece, planned, start, min(start + PIECE, numel), numel,
                                               thresholds))
                    while len(pending) > 2 * threads:
                        finish_oldest()
                continue
            while pending:
                finish_oldest()
            tensors = [reader.get(planned.name) for reader in inputs.readers]
            if planned.name in row_targets:
                tensors = [pad_rows_with_mean(t, row_targets[planned.name]) for t in tensors]
            merged, fractions = _merge_one(inputs, job, resolved, planned, tensors, None)
            writer.write(planned.name, merged)
            _record(reports, planned.name, fractions)
        while pending:
            finish_oldest()
    return writer.finish()


def _record(reports: list[dict[str, float]], name: str, fractions: list[float | None]) -> None:
    for report, fraction in zip(reports, fractions):
        if fraction is not None:
            report[name] = fraction


def _trim_thresholds(inputs: Inputs, job: StreamMergeJob, resolved: ResolvedJob, name: str, numel: int,
                     densities: list[float], pool: ThreadPoolExecutor) -> list[dict[str, torch.Tensor]]:
    """Per model, TIES's trim threshold of this whole tensor (ties.trim_threshold), from the same (DARE'd)
    delta that the merge computes piece by piece, so that merging flat pieces gives bit-identical results.

    Exact radix selection over streamed pieces (model_merging_methods/selection.py): one counting pass
    of every piece, and a second one only for the models whose k-th smallest |δ| is not the smallest
    value of its high-16-bit bin. The pieces are re-read and their deltas (DARE draws included: they
    depend only on the seed, model, tensor and position) recomputed per pass; the workers count pieces
    in parallel, a few in flight at a time, so memory stays at a few pieces whatever the tensor size.
    DARE with the l1 rescale (a factor of the whole tensor) keeps the whole-tensor computation."""
    if resolved.dare is not None and any(d.rescale and d.rescale_mode == "l1" for d in resolved.dare):
        return _whole_tensor_thresholds(inputs, job, resolved, name, densities)
    ranks = [trim_rank(numel, d) for d in densities]
    selections = {index: [RadixSelect(k, numel)] for index, k in enumerate(ranks) if k}
    spans = [(start, min(start + PIECE, numel)) for start in range(0, numel, PIECE)]

    def deltas(span: tuple[int, int], models: set) -> dict[int, torch.Tensor]:
        base = inputs.readers[0].get(name, *span).to(resolved.device).float()
        return {index: _piece_delta(inputs.readers[1 + index].get(name, *span), base, resolved, job.seed, index,
                                    (span[0], numel), name) for index in sorted(models)}

    select_streamed(selections, lambda work, reduce: map_in_order(pool, spans, work, reduce, 2 * resolved.threads),
                    deltas)
    return [{name: torch.tensor(selections[index][0].value if index in selections else 0.0)}
            for index in range(len(ranks))]


def map_in_order(pool: ThreadPoolExecutor, items: list, work: Callable, reduce: Callable, in_flight: int,
                 on_error: Callable[[], None] | None = None) -> None:
    """work(item) on the pool for every item, at most `in_flight` results waiting; reduce(result) in this
    thread, in item order. `on_error` runs in the worker whose work raised (before the error propagates),
    e.g. to release items that wait on it."""
    pending: deque[Future] = deque()

    def guarded(item):
        try:
            return work(item)
        except BaseException:
            if on_error is not None:
                on_error()
            raise

    for item in items:
        pending.append(pool.submit(guarded, item))
        while len(pending) > in_flight:
            reduce(pending.popleft().result())
    while pending:
        reduce(pending.popleft().result())


def _piece_delta(piece: torch.Tensor, base: torch.Tensor, resolved: ResolvedJob, seed: int, index: int,
                 offset: tuple[int, int], name: str) -> torch.Tensor:
    """Model `index`'s float32 delta on one flat piece, DARE'd as merge_resolved does it on that piece."""
    model = piece.to(resolved.device).float()
    if resolved.dare is None:
        return model.sub_(base)
    return dare_one_model({name: model}, {name: base}, resolved.dare[index], on_deltas=True, seed=seed,
                          model_index=index, offsets={name: offset}).pop(name)


def _whole_tensor_thresholds(inputs: Inputs, job: StreamMergeJob, resolved: ResolvedJob, name: str,
                             densities: list[float]) -> list[dict[str, torch.Tensor]]:
    """The thresholds from whole-tensor deltas, one model's tensor in memory at a time."""
    base = inputs.readers[0].get(name).to(resolved.device)   # kept in its own dtype: ops promote exactly
    thresholds = []
    for index, reader in enumerate(inputs.readers[1:]):
        model = {name: reader.get(name).to(resolved.device).float()}
        if resolved.dare is None:
            delta = model.pop(name).sub_(base)
        else:
            delta = dare_one_model(model, {name: base}, resolved.dare[index], on_deltas=True, seed=job.seed,
                                   model_index=index).pop(name)
        thresholds.append({name: torch.tensor(trim_threshold(delta, densities[index]))})
        del model, delta
    return thresholds


def _merge_one(inputs: Inputs, job: StreamMergeJob, resolved: ResolvedJob, planned: PlannedTensor,
               tensors: list[torch.Tensor], piece: tuple[int, int] | None,
               statistics: list[dict[str, torch.Tensor]] | None = None) -> tuple[torch.Tensor, list[float | None]]:
    """Merge one tensor (or one flat piece of it); returns it and each model's DARE kept fraction."""
    name = planned.name
    tensors = [t.to(resolved.device) for t in tensors]
    base = {name: tensors[0]} if inputs.has_base else None
    models = [{name: t} for t in (tensors[1:] if inputs.has_base else tensors)]
    report = [{} for _ in models]
    try:
        merged = merge_resolved(resolved.method, base, models, resolved.options, resolved.dare, seed=job.seed,
                                exclude_regex=job.exclude_regex, report=report, out_dtype=planned.dtype,
                                offsets={name: piece} if piece else None, statistics=statistics)
    except MergeError as error:
        raise MergeError(f"{error} (while merging tensor {name!r})") from error
    return merged[name], [r.get(name) for r in report]


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
    folder = resolve_checkpoint(donor, job.allow_pickle)
    copied, left_out = [], []
    for path in sorted(folder.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in MODEL_FILE_PATTERNS):
            shutil.copyfile(path, staging / path.name)
            copied.append(path.name)
        elif not path.name.endswith(WEIGHT_SUFFIXES + (".index.json",)):  # weights are never copied nor listed
            left_out.append(path.name + ("/" if path.is_dir() else ""))
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
    return {"from": donor, "copied": copied, "not_copied": left_out}


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
    options = {name: getattr(job.options, name) for name in method.options_used}
    record: dict = {"options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
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
              seconds: float) -> dict:
    method = resolved.method
    excluded = [p.name for p in plan if is_excluded(p.name, job.exclude_regex)]
    manifest = {
        "tool": "merge_models (streaming engine)",
        "manifest_version": 2,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "project": project_provenance(),
        "method": {"name": method.name, "requested": job.method, "paper": method.paper},
        **_applicable_options(job, resolved),
        "inputs": [{"role": label, "source": source, "path": str(reader.folder),
                    "files": [{"file": path.name, "bytes": path.stat().st_size, "sha256": digest}
                              for path, digest in zip(reader.weight_files(), digests)]}
                   for label, source, reader, digests in zip(inputs.labels, inputs.sources, inputs.readers, hashes)],
        "output": {"files": files, "num_tensors": len(plan), "total_bytes": sum(p.nbytes for p in plan),
                   "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in plan}),
                   "dtype": job.dtype or "the reference's", "exclude_regex": list(job.exclude_regex),
                   "vocab_alignment": job.vocab_alignment, "model_files": donor_files},
        "excluded_tensors": excluded,
        "warnings": list(resolved.warnings),
        "device": str(resolved.device),
        "versions": library_versions(),
        "wall_seconds": round(seconds, 3),
        "rerun": _rerun_record(job, resolved, inputs),
    }
    if resolved.dare is not None:
        manifest["dare"] = {
            "given": manifest["dare"],
            "resolved": asdict(resolved.dare[0]) | {"drop_rate": [d.drop_rate for d in resolved.dare]},
            "per_model": [{"model": label, "kept_fraction_overall": _overall(report, plan),
                           "kept_fraction": report}
                          for label, report in zip(inputs.labels[int(inputs.has_base):], reports)],
        }
    return manifest


def _overall(report: dict[str, float], plan: list[PlannedTensor]) -> float | None:
    sizes = {p.name: p.nbytes / torch.empty((), dtype=p.dtype).element_size() for p in plan}
    total = sum(sizes[n] for n in report)
    return sum(report[n] * sizes[n] for n in report) / total if total else None

