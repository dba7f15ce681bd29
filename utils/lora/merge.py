"""Merge N PEFT LoRA adapters of one base into one adapter folder, module by module (combine.py's rules).

No base weights are needed: the adapters' factors are read module by module, combined, and written as
a PEFT adapter folder (adapter_config.json by peft.LoraConfig.save_pretrained, adapter_model.safetensors
with PEFT's key names) plus ``merge_lora.json`` (inputs with sha256, options, seed, versions, ranks).
Published atomically (utils/records.write_folder_atomic): nothing is written when a check fails.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from utils.manifest import file_sha256, input_record, known_sha256, remember_sha256, run_manifest

from .adapter import PREFIX, AdapterError, LoraAdapter, resolve_adapter
from .combine import KNOTS_RULES, CombineError, CombineOptions, Factors, combine_module, output_rank

RECORD_NAME = "merge_lora.json"


@dataclass
class LoraMergeJob:
    adapters: list[str]
    output_dir: str
    weights: list[float] | None = None
    options: CombineOptions = field(default_factory=CombineOptions)
    base_model: str | None = None     # optional: check every adapter against this base's tensors
    overwrite: bool = False


def _check_same_base(adapters: list[LoraAdapter], base_model: str | None) -> None:
    recorded = {a.base_model_name_or_path for a in adapters} - {None}
    if len(recorded) > 1:
        raise AdapterError(f"the adapters were trained on different bases ({', '.join(sorted(recorded))}; "
                           f"adapter_config.json base_model_name_or_path)")
    if base_model is not None:
        from utils.engine.reader import adapted_reader, CheckpointReader, resolve_checkpoint

        folder = resolve_checkpoint(base_model)
        for adapter in adapters:   # names, shapes and recorded base, as when folding
            adapted_reader(CheckpointReader(folder), folder, base_model, str(adapter.folder))
    for adapter in adapters:
        if adapter.full:
            name = next(iter(adapter.full))
            raise AdapterError(f"adapter {adapter.source} also replaces full tensors ({name!r}: modules_to_save / "
                               f"biases); adapter-space merging combines LoRA factors only: fold the adapters "
                               f"with merge_models.py base+adapter instead")
    shapes: dict[str, tuple] = {}
    for adapter in adapters:
        for module, lora in adapter.modules.items():
            shape = (adapter.shape(lora.b_key)[0], adapter.shape(lora.a_key)[1], lora.embedding)
            if shapes.setdefault(module, shape) != shape:
                raise AdapterError(f"adapter {adapter.source}: module {module!r} is {shape[:2]} but "
                                   f"{shapes[module][:2]} in another adapter (adapters of different bases?)")


def _target_modules(adapters: list[LoraAdapter]):
    """The union of the inputs' target_modules, as add_weighted_adapter forms it."""
    values = [a.config.target_modules for a in adapters]
    if all(isinstance(v, str) for v in values):
        return "|".join(f"({v})" for v in values)
    if any(isinstance(v, str) for v in values):
        raise AdapterError("the adapters mix a regex target_modules with a list; PEFT cannot merge such adapters")
    return sorted(set().union(*[set(v) for v in values]))


def merge_adapters(job: LoraMergeJob) -> dict:
    """Merge job.adapters into job.output_dir; returns the record it writes (merge_lora.json)."""
    from utils.records import check_output_folder, write_folder_atomic

    started = time.time()
    options = job.options
    options.validate()
    if len(job.adapters) < 1:
        raise CombineError("give at least one adapter")
    weights = list(job.weights) if job.weights is not None else [1.0] * len(job.adapters)
    if len(weights) != len(job.adapters):
        raise CombineError(f"{len(weights)} weights for {len(job.adapters)} adapters")
    folders = [resolve_adapter(source) for source in job.adapters]
    inputs = {f"the adapter {source}": folder for source, folder in zip(job.adapters, folders)}
    check_output_folder(job.output_dir, inputs, overwrite=True)   # the one output guard (utils/records.py)
    if Path(job.output_dir).exists() and not job.overwrite:
        raise AdapterError(f"output folder {job.output_dir} already exists; pass --overwrite to replace it")
    adapters = [LoraAdapter(folder, source) for folder, source in zip(folders, job.adapters)]
    for adapter in adapters:   # checked by PEFT's LoraConfig here: the merged adapter is written through it
        adapter.config
    _check_same_base(adapters, job.base_model)
    combination = options.combination if len(adapters) > 1 or options.combination in KNOTS_RULES else "linear"
    options = CombineOptions(**{**asdict(options), "combination": combination})   # PEFT: one adapter → linear
    rank = output_rank(combination, [max(m.rank for m in a.modules.values()) for a in adapters], options)
    modules = list(dict.fromkeys(m for a in adapters for m in a.modules))
    record: dict = {}

    def write(staging: Path) -> None:
        from safetensors.torch import save_file

        tensors, ranks = {}, {}
        for module in modules:
            factors = []
            for adapter in adapters:
                lora = adapter.modules.get(module)
                factors.append(None if lora is None else Factors(*adapter.factors(lora), lora.scaling, lora.transpose))
            a, b = combine_module(module, factors, weights, options, rank)
            ranks[module] = int(a.shape[0])
            if a.shape[0] < rank:   # fewer directions than r (KnOTS, small matrices): zero rows add nothing
                a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
                b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
            embedding = next(x.modules[module].embedding for x in adapters if module in x.modules)
            names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
            tensors[f"{PREFIX}{module}.{names[0]}"] = a.contiguous()
            tensors[f"{PREFIX}{module}.{names[1]}"] = b.contiguous()
        for name in dict.fromkeys(n for a in adapters for n in a.base_layers):   # PEFT's copies of base weights
            holders = [a for a in adapters if name in a.base_layers]
            copy = holders[0].read(holders[0].base_layers[name])
            for other in holders[1:]:
                if not torch.equal(other.read(other.base_layers[name]), copy):
                    raise AdapterError(f"adapters {holders[0].source} and {other.source} saved different base weights "
                                       f"for {name!r} (adapters of different bases?)")
            tensors[holders[0].base_layers[name]] = copy
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        config = adapters[0].config
        from dataclasses import replace
        merged = replace(config, r=rank, lora_alpha=rank, target_modules=_target_modules(adapters), alpha_pattern={},
                         rank_pattern={}, use_rslora=False, modules_to_save=None, use_dora=False)
        merged.save_pretrained(str(staging))
        digests = {a.file.path: known_sha256(a.file.path) or file_sha256(a.file.path) for a in adapters}
        remember_sha256(digests)
        described = [input_record(f"adapter {i}", s, a.folder, [a.file.path], digests, weight=w,
                                  rank=max(m.rank for m in a.modules.values()))
                     for i, (s, a, w) in enumerate(zip(job.adapters, adapters, weights))]
        record.update(run_manifest(
            "merge_lora", started, described,
            adapters=[{"source": s, "path": str(Path(a.folder).resolve()), "weight": w, "sha256": digests[a.file.path],
                       "rank": max(m.rank for m in a.modules.values())}
                      for s, a, w in zip(job.adapters, adapters, weights)],
            options=asdict(options), rank=rank, module_ranks=ranks, modules=len(modules), seed=options.seed))
        record["seconds"] = record["wall_seconds"]
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")

    write_folder_atomic(job.output_dir, write, overwrite=job.overwrite, inputs=inputs)
    return record
