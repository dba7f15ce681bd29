"""Streaming merge engine: read each tensor from every checkpoint, merge it, write it, forget it.

Peak memory is a few tensors (one per input plus temporaries), not the model size. Output goes to a
staging folder beside the target that is published (utils/records.py) only when everything is written.
The job's options are validated and resolved once, at entry (resolve_job); the rest takes resolved values.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model_merging_methods import (SEGMENT, DareOptions, MergeError, MergeMethod, MergeOptions, ResolvedDare,
                                   check_method_inputs, dare_one_model, get_method, is_excluded, merge_resolved,
                                   resolve_dare, trim_threshold)
from utils.cli import resolve_device
from utils.records import library_versions, write_folder_atomic

from .allocator import tune_allocator
from .reader import WEIGHT_SUFFIXES, CheckpointReader, resolve_checkpoint
from .writer import PlannedTensor, ShardedSafetensorsWriter

PIECE = SEGMENT  # elements per streamed piece of a large tensor (4 MiB in float32: temporaries stay in cache)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VOCAB_ALIGNMENTS = ("error", "pad_mean")
SKIPPED_FILES = {"README.md", "merge_manifest.json", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json"}


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
    threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))  # workers merging pieces


@dataclass(frozen=True)
class ResolvedJob:
    """What resolve_job makes of a StreamMergeJob, once: the method, its options after DARE resolution
    (dare_* methods: density 1), one ResolvedDare per model (None: no DARE) and the device."""
    method: MergeMethod
    options: MergeOptions
    dare: tuple[ResolvedDare, ...] | None
    device: torch.device


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
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(job, resolved, started)
    finally:
        torch.set_num_threads(previous_threads)


def _run(job: StreamMergeJob, resolved: ResolvedJob, started: float) -> dict:
    inputs = _open_inputs(job)
    plan, row_targets = _plan(inputs, job)
    manifest: dict = {}

    def write(staging: Path) -> None:
        reports: list[dict[str, float]] = [{} for _ in job.models]
        files = _merge_tensors(inputs, job, resolved, plan, row_targets, staging, reports)
        donor = _copy_model_files(inputs, job, row_targets, staging)
        manifest.update(_manifest(job, resolved, inputs, plan, files, donor, reports, time.time() - started))
        (staging / "merge_manifest.json").write_text(json.dumps(manifest, indent=2))

    try:
        write_folder_atomic(job.output_dir, write, overwrite=job.overwrite)
    except FileExistsError as error:  # the output appeared while this run was writing
        raise MergeError(str(error)) from error
    return manifest


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
    if job.vocab_alignment not in VOCAB_ALIGNMENTS:
        raise MergeError(f"unknown vocab_alignment {job.vocab_alignment!r}; valid: {', '.join(VOCAB_ALIGNMENTS)}")
    if not job.models:
        raise MergeError("no models to merge")
    if Path(job.output_dir).exists() and not job.overwrite:
        raise MergeError(f"output folder {job.output_dir} already exists; pass --overwrite to replace it")
    try:
        device = resolve_device(job.device)
    except ValueError as error:
        raise MergeError(str(error)) from error
    dare, options = resolve_dare(method, job.options, job.dare, len(job.models))
    check_method_inputs(method, job.base_model is not None, len(job.models), None, dare)
    return ResolvedJob(method, options, dare, device)


def _open_inputs(job: StreamMergeJob) -> Inputs:
    sources = ([job.base_model] if job.base_model else []) + list(job.models)
    labels = (["base"] if job.base_model else []) + [f"model {i}" for i in range(len(job.models))]
    readers = [CheckpointReader(resolve_checkpoint(s, job.allow_pickle), job.allow_pickle) for s in sources]
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


def _aligned_shape(name: str, shapes: list[tuple], inputs: Inputs, job: StreamMergeJob) -> tuple:
    first = shapes[0]
    odd = next(i for i, s in enumerate(shapes) if s != first)
    description = (f"shape mismatch for {name!r}: {first} in {inputs.labels[0]} ({inputs.sources[0]}) vs "
                   f"{shapes[odd]} in {inputs.labels[odd]} ({inputs.sources[odd]})")
    same_tail = all(len(s) == len(first) and s[1:] == first[1:] for s in shapes)
    if job.vocab_alignment != "pad_mean" or not same_tail:
        hint = "" if not same_tail else "; if it is a vocabulary mismatch, pass --vocab_alignment pad_mean"
        raise MergeError(description + hint)
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
    writer = ShardedSafetensorsWriter(staging, plan, job.max_shard_size)
    iterator = plan
    if job.progress:
        from tqdm import tqdm
        iterator = tqdm(plan, desc=f"merging ({job.method})", unit="tensor")
    method, dare = resolved.method, resolved.dare
    in_pieces = method.elementwise and (dare is None or dare[0].strategy == "random")
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

    with ThreadPoolExecutor(max(1, job.threads)) as pool:
        for planned in iterator:
            numel = planned.nbytes // torch.empty((), dtype=planned.dtype).element_size()
            if in_pieces and planned.name not in row_targets and numel > PIECE:
                thresholds = None
                if thresholds_needed and not is_excluded(planned.name, job.exclude_regex):
                    thresholds = _trim_thresholds(inputs, job, resolved, planned.name, densities)
                for start in range(0, numel, PIECE):
                    pending.append(pool.submit(merge_piece, planned, start, min(start + PIECE, numel), numel,
                                               thresholds))
                    while len(pending) > 2 * job.threads:
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


def _trim_thresholds(inputs: Inputs, job: StreamMergeJob, resolved: ResolvedJob, name: str,
                     densities: list[float]) -> list[dict[str, torch.Tensor]]:
    """Per model, TIES's trim threshold of this whole tensor, from the same (DARE'd) delta that the
    in-memory merge computes, so that merging flat pieces gives bit-identical results. One model's
    tensor is in memory at a time."""
    base = inputs.readers[0].get(name).to(resolved.device)   # kept in its own dtype: ops promote exactly
    thresholds = []
    for index, reader in enumerate(inputs.readers[1:]):
        model = {name: reader.get(name).to(resolved.device).float()}
        if resolved.dare is None:
            delta = model.pop(name).sub_(base)
        else:
            delta = dare_one_model(model, {name: base}, resolved.dare[index], on_deltas=True, seed=job.seed,
                                   model_index=index).pop(name)
        thresholds.append({name: torch.tensor(trim_threshold(delta, densities[index], in_place=True))})
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


def _copy_model_files(inputs: Inputs, job: StreamMergeJob, row_targets: dict[str, int], staging: Path) -> str:
    """Copy config, tokenizer and generation config from the donor; returns the donor's source."""
    donor = job.files_from or inputs.sources[0]
    if job.files_from is None and row_targets:
        name, rows = next(iter(row_targets.items()))
        index = next(i for i, r in enumerate(inputs.readers) if r.info(name)[1][0] == rows)
        donor = inputs.sources[index]
    folder = resolve_checkpoint(donor, job.allow_pickle)
    for path in folder.iterdir():
        if path.is_file() and path.name not in SKIPPED_FILES and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(path, staging / path.name)
    config_path = staging / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        if job.dtype:
            config["dtype"] = job.dtype
            config.pop("torch_dtype", None)
        if row_targets and "vocab_size" in config:
            config["vocab_size"] = max(row_targets.values())
        config_path.write_text(json.dumps(config, indent=2))
    return donor


def _manifest(job: StreamMergeJob, resolved: ResolvedJob, inputs: Inputs, plan: list[PlannedTensor],
              files: list[str], donor: str, reports: list[dict[str, float]], seconds: float) -> dict:
    method = resolved.method
    arguments = asdict(job)
    excluded = [p.name for p in plan if is_excluded(p.name, job.exclude_regex)]
    manifest = {
        "tool": "merge_models (streaming engine)",
        "created_unix": time.time(),
        "method": {"name": method.name, "requested": job.method, "paper": method.paper},
        "arguments": arguments,
        "seed": job.seed,
        "versions": library_versions(),
        "inputs": [{"role": label, "source": source, "path": str(reader.folder), "files": reader.describe_files()}
                   for label, source, reader in zip(inputs.labels, inputs.sources, inputs.readers)],
        "output": {"files": files, "num_tensors": len(plan), "total_bytes": sum(p.nbytes for p in plan),
                   "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in plan}),
                   "config_and_tokenizer_from": donor},
        "excluded_tensors": excluded,
        "wall_seconds": round(seconds, 3),
    }
    if resolved.dare is not None:
        manifest["dare"] = {
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

