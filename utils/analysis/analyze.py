"""Task-vector analysis: δ_i = θ_i − θ_base for every model, streamed tensor by tensor.

For each tensor the base and every model's tensor are read (utils/engine/reader.py), the task
vectors computed in the computation dtype, their statistics, pairwise dot products and sign agreement
taken, and everything but the running sums dropped: peak memory is the base tensor, one δ per model and
a few chunk temporaries, whatever the model size.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import torch

from .defaults import COMPUTE_DTYPE_NAMES, DEFAULT_QUANTILES

from model_merging_methods import is_excluded
from utils.engine.allocator import tune_allocator
from utils.engine.reader import CheckpointReader, resolve_checkpoint
from utils.engine.statistics import map_in_order
from utils.manifest import hash_beside, input_record, run_manifest
from utils.records import check_output_folder

from .grouping import KINDS, NO_LAYER, LayerGrouping, kind_of
from .statistics import AnalysisError, Histogram, NonFiniteDelta, cosine, pair_statistics, tensor_statistics

COMPUTE_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPE_NAMES}


@dataclass(frozen=True)
class AnalysisOptions:
    base_model: str
    models: list[str]
    output_dir: str
    device: str = "cpu"
    dtype: str = "float32"                 # computation dtype of δ and its statistics
    exclude_regex: list[str] = field(default_factory=list)
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    top_k: int = 10                        # tensors listed per model in summaries and the report
    rel_tol: float = 1e-6                  # |δ| ≤ rel_tol·|θ_base| counts as unchanged
    overwrite: bool = False
    allow_pickle: bool = False
    figures: bool = True
    threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))   # tensors analysed at once

    def validate(self) -> None:
        if not self.models:
            raise AnalysisError("no models to analyse (--models)")
        if self.dtype not in COMPUTE_DTYPES:
            raise AnalysisError(f"unknown computation dtype {self.dtype!r}; valid: {', '.join(COMPUTE_DTYPES)}")
        for q in self.quantiles:
            if not 0.0 <= q <= 1.0:
                raise AnalysisError(f"quantile {q} is outside [0, 1]")
        if self.threads < 1:
            raise AnalysisError(f"threads = {self.threads}; it must be at least 1")
        if self.top_k < 0:
            raise AnalysisError(f"top_k = {self.top_k} is negative")
        for pattern in self.exclude_regex:
            try:
                re.compile(pattern)
            except re.error as error:
                raise AnalysisError(f"--exclude_param_names_regex {pattern!r}: {error}") from error
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise AnalysisError(f"device {self.device} requested but CUDA is not available")


@dataclass
class _Source:
    label: str
    source: str
    reader: CheckpointReader


def model_labels(sources: list[str]) -> list[str]:
    """Short unique labels (folder names, made file-safe; repeated names get their position appended)."""
    stems = [re.sub(r"[^\w.-]+", "_", Path(s.rstrip("/")).name or s) or "model" for s in sources]
    return [stem if stems.count(stem) == 1 else f"{stem}_{i}" for i, stem in enumerate(stems)]


def read_config(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AnalysisError(f"{path}: unreadable config ({error})") from error


def open_sources(base_model: str, models: list[str], allow_pickle: bool) -> tuple[_Source, list[_Source]]:
    base = _Source("base", base_model, CheckpointReader(resolve_checkpoint(base_model, allow_pickle), allow_pickle))
    labels = model_labels(models)
    return base, [_Source(label, source, CheckpointReader(resolve_checkpoint(source, allow_pickle), allow_pickle))
                  for label, source in zip(labels, models)]


def name_prefix(base_names: list[str], model_names: set[str]) -> str | None:
    """The prefix p with p + name in the model for every base name ('' when the names agree): a task model
    often wraps the pretrained backbone (BertForSequenceClassification's ``bert.`` around BertModel's names).
    None when there is no such prefix."""
    if all(name in model_names for name in base_names):
        return ""
    first = base_names[0]
    candidates = {m[:-len(first)] for m in model_names if m.endswith("." + first)}
    for prefix in sorted(candidates, key=len):
        if all(prefix + name in model_names for name in base_names):
            return prefix
    return None


def analysed_names(base: _Source, models: list[_Source], exclude_regex: list[str]) -> tuple[list[str], dict, str]:
    """The base's float tensors that are not excluded, after checking that every model holds each of them
    (under one common name prefix, see name_prefix) with the same shape, and no other float tensor that is
    not excluded. Returns the names, the skipped base names with the reason, and the models' prefix."""
    kept, skipped = [], {}
    for name in base.reader.names():
        if is_excluded(name, exclude_regex):
            skipped[name] = "excluded"
        elif not base.reader.info(name)[0].is_floating_point:
            skipped[name] = f"not a float tensor ({base.reader.info(name)[0]})"
        else:
            kept.append(name)
    if not kept:
        raise AnalysisError("no tensor to analyse: every tensor of the base is excluded or not floating point")
    prefix = name_prefix(kept, set(models[0].reader.names()))
    for model in models:
        names = set(model.reader.names())
        missing = [n for n in kept if (prefix or "") + n not in names]
        if prefix is None or missing:
            missing = missing or kept
            raise AnalysisError(f"tensor {missing[0]!r} of the base ({base.source}) is missing from model "
                                f"{model.label} ({model.source})")
        expected = {prefix + n for n in kept}
        extra = sorted(n for n in names - expected if model.reader.info(n)[0].is_floating_point
                       and not is_excluded(n, exclude_regex) and not is_excluded(n[len(prefix):], exclude_regex))
        if extra:
            raise AnalysisError(f"tensor {extra[0]!r} of model {model.label} ({model.source}) is not in the base "
                                f"({base.source}); exclude it with --exclude_param_names_regex if it is a task head")
        for name in kept:
            if model.reader.info(prefix + name)[1] != base.reader.info(name)[1]:
                raise AnalysisError(f"shape mismatch for tensor {name!r}: {base.reader.info(name)[1]} in the base "
                                    f"({base.source}) vs {model.reader.info(prefix + name)[1]} in model {model.label} "
                                    f"({model.source})")
    return kept, skipped, prefix


class _Sums:
    """Running per-model sums: global, per (layer, kind); pairwise dot products per layer."""

    def __init__(self, num_models: int):
        self.groups = [dict() for _ in range(num_models)]   # (layer, kind) → [numel, ssq, l1]
        self.pairs = {pair: {} for pair in combinations(range(num_models), 2)}  # layer → [dot, agree, both]
        self.histograms = [Histogram() for _ in range(num_models)]

    def add(self, model: int, layer: str, kind: str, stats: dict) -> None:
        entry = self.groups[model].setdefault((layer, kind), [0, 0.0, 0.0])
        entry[0] += stats["numel"]
        entry[1] += stats["l2"] ** 2
        entry[2] += stats["l1"]

    def add_pair(self, pair: tuple[int, int], layer: str, stats: dict) -> None:
        entry = self.pairs[pair].setdefault(layer, [0.0, 0, 0])
        entry[0] += stats["dot"]
        entry[1] += stats["agree"]
        entry[2] += stats["both_nonzero"]

    def squares(self, model: int, layer: str | None = None) -> float:
        return sum(v[1] for (lay, _), v in self.groups[model].items() if layer is None or lay == layer)


def run_analysis(options: AnalysisOptions, progress: bool = False) -> dict:
    """Analyse the task vectors and write every output into options.output_dir (atomically); returns
    the analysis (the content of analysis.json)."""
    from .outputs import write_outputs

    started = time.time()
    options.validate()
    # the one output guard (utils/records.py), before anything is read: an output that is, contains or lies
    # inside an input is refused even with --overwrite (replacing it would delete that input)
    check_output_folder(options.output_dir, {"the base model": options.base_model,
                                             **{f"the model {m}": m for m in options.models}},
                        overwrite=options.overwrite)
    # one torch thread, as the merge engine (utils/engine/streaming.py): the work is histograms and
    # elementwise passes over one tensor at a time, where intra-op threads' synchronisation costs more
    # than it gains; on a busy 2-core machine a 2-thread bincount of a small tensor took 24 ms, 1 thread 0.02
    # and the merge engine's allocator settings: freed tensors are reused instead of page-faulted in again
    tune_allocator()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # matplotlib takes a second or two to import: done on a thread while the tensors are analysed
    preload = threading.Thread(target=_import_pyplot, daemon=True) if options.figures else None
    if preload is not None:
        preload.start()
    try:
        analysis = analyze(options, progress)
    finally:
        torch.set_num_threads(previous_threads)
        if preload is not None:
            preload.join()
    analysis["wall_seconds"] = round(time.time() - started, 3)
    write_outputs(analysis, options)
    return analysis


def _import_pyplot() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except Exception:   # the figures report their own import errors later
        pass


def analyze(options: AnalysisOptions, progress: bool = False) -> dict:
    """The whole analysis as a JSON-ready dict (no files written)."""
    started = time.time()
    options.validate()
    base, models = open_sources(options.base_model, options.models, options.allow_pickle)
    names, skipped, prefix = analysed_names(base, models, list(options.exclude_regex))
    config = read_config(base.reader.folder) or read_config(models[0].reader.folder)
    grouping = LayerGrouping.from_names(base.reader.names(), config)
    dtype, device = COMPUTE_DTYPES[options.dtype], torch.device(options.device)
    sums = _Sums(len(models))
    tensors: list[dict[str, dict]] = [{} for _ in models]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(names), desc="analysing", unit="tensor")
    quantiles = list(options.quantiles)

    def work(name: str) -> tuple:
        """Every statistic of one tensor (on a worker thread: torch releases the GIL in its kernels)."""
        theta = base.reader.get(name).to(device=device, dtype=dtype)
        deltas, stats, histograms = [], [], []
        for model in models:
            delta = model.reader.get(prefix + name).to(device=device, dtype=dtype).sub_(theta)
            histograms.append(Histogram())
            try:
                stats.append(tensor_statistics(delta, theta, quantiles, options.rel_tol, histograms[-1]))
            except NonFiniteDelta:
                raise AnalysisError(f"task vector of model {model.label} ({model.source}) is not finite "
                                    f"(NaN/Inf) in tensor {name!r}") from None
            deltas.append(delta)
        pairs = {(i, j): pair_statistics(deltas[i], deltas[j]) for i, j in sums.pairs}
        return name, list(theta.shape), stats, histograms, pairs

    def reduce(result: tuple) -> None:
        """Accumulate in tensor order, so that every sum is the same whatever the number of threads."""
        name, shape, stats, histograms, pairs = result
        layer, kind = grouping.layer_of(name), kind_of(name)
        for index, (entry, histogram) in enumerate(zip(stats, histograms)):
            tensors[index][name] = {"layer": layer, "kind": kind, "shape": shape, **entry}
            sums.add(index, layer, kind, entry)
            sums.histograms[index].merge(histogram)
        for pair, entry in pairs.items():
            sums.add_pair(pair, layer, entry)
        if bar is not None:
            bar.update()

    threads = max(1, min(options.threads, os.cpu_count() or 1))

    def run() -> None:
        with ThreadPoolExecutor(threads) as pool:
            map_in_order(pool, names, work, reduce, in_flight=threads)

    _, digests = hash_beside([path for source in (base, *models) for path in source.reader.weight_files()], run)
    if bar is not None:
        bar.close()
    analysis = _assemble(options, base, models, names, skipped, grouping, sums, tensors, digests, started)
    analysis["model_name_prefix"] = prefix
    return analysis


def _group_json(values: list) -> dict:
    numel, ssq, l1 = values
    return {"numel": numel, "l2": math.sqrt(ssq), "l1": l1}


def _files(reader: CheckpointReader, digests: dict) -> list[dict]:
    """The reader's weight files (name, size, header hash: norms.py compares those) with their sha256."""
    by_name = {path.name: digests[path] for path in reader.weight_files()}
    return [entry | {"sha256": by_name.get(entry["file"])} for entry in reader.describe_files()]


def _assemble(options: AnalysisOptions, base: _Source, models: list[_Source], names: list[str], skipped: dict,
              grouping: LayerGrouping, sums: _Sums, tensors: list[dict], digests: dict, started: float) -> dict:
    layers_in_use = [label for label in grouping.layer_order()
                     if any(layer == label for groups in sums.groups for layer, _ in groups)]
    model_entries = []
    for index, model in enumerate(models):
        groups = sums.groups[index]
        per_layer = {}
        for layer in layers_in_use:
            kinds = {kind: _group_json(groups[(layer, kind)]) for kind in KINDS if (layer, kind) in groups}
            total = [sum(g[i] for (lay, _), g in groups.items() if lay == layer) for i in range(3)]
            per_layer[layer] = {"all": _group_json(total), **kinds}
        per_kind = {kind: _group_json([sum(g[i] for (_, k), g in groups.items() if k == kind) for i in range(3)])
                    for kind in KINDS if any(k == kind for _, k in groups)}
        stats = tensors[index].values()
        total = [sum(g[i] for g in groups.values()) for i in range(3)]
        base_l2 = math.sqrt(sum(s["base_l2"] ** 2 for s in stats))
        numel = total[0]
        model_entries.append({
            "label": model.label, "source": model.source, "path": str(model.reader.folder.resolve()),
            "files": _files(model.reader, digests),
            "global": {**_group_json(total), "base_l2": base_l2,
                       "relative_l2": math.sqrt(total[1]) / base_l2 if base_l2 > 0 else None,
                       "max_abs": max(s["max_abs"] for s in stats),
                       "zero_fraction": sum(s["zero_fraction"] * s["numel"] for s in stats) / numel,
                       "unchanged_fraction": sum(s["unchanged_fraction"] * s["numel"] for s in stats) / numel},
            "per_layer": per_layer, "per_kind": per_kind,
            "histogram": sums.histograms[index].to_json(),
            "tensors": tensors[index],
        })
    pairwise = []
    for (i, j), layers in sums.pairs.items():
        dot = sum(v[0] for v in layers.values())
        agree, both = sum(v[1] for v in layers.values()), sum(v[2] for v in layers.values())
        pairwise.append({
            "a": models[i].label, "b": models[j].label,
            "cosine": cosine(dot, sums.squares(i), sums.squares(j)), "dot": dot,
            "sign_agreement": agree / both if both else None, "both_nonzero": both,
            "per_layer": {layer: {"cosine": cosine(v[0], sums.squares(i, layer), sums.squares(j, layer)),
                                  "sign_agreement": v[1] / v[2] if v[2] else None, "both_nonzero": v[2]}
                          for layer in layers_in_use if (v := layers.get(layer))},
        })
    described = [input_record(role, source.source, source.reader.folder, source.reader.weight_files(), digests)
                 for role, source in [("base", base)] + [(f"model {m.label}", m) for m in models]]
    return run_manifest("analyze_task_vectors", started, described, **{
        "options": asdict(options),
        "definitions": {
            "task_vector": "δ_i = θ_i − θ_base, per tensor, in the computation dtype",
            "std": "sample standard deviation (divisor n − 1)",
            "skewness": "g1 = m3 / m2^1.5, population central moments (None for a constant tensor)",
            "excess_kurtosis": "g2 = m4 / m2^2 − 3, population central moments (None for a constant tensor)",
            "unchanged_fraction": f"#{{|δ| ≤ {options.rel_tol:g}·|θ_base|}} / n (exact zeros always count)",
            "quantiles": "of |δ|, exact order statistics with linear interpolation (numpy's default)",
            "aggregation": "per layer/kind/model: L2 in quadrature, L1 and numel summed",
            "cosine": "⟨δ_a, δ_b⟩ / (‖δ_a‖‖δ_b‖) over the analysed tensors (None if a norm is 0)",
            "sign_agreement": "#{sign δ_a = sign δ_b} / #{δ_a ≠ 0 and δ_b ≠ 0}",
        },
        "base": {"source": base.source, "path": str(base.reader.folder.resolve()),
                 "files": _files(base.reader, digests)},
        "grouping": {**grouping.to_json(), "layers": layers_in_use},
        "num_tensors": len(names),
        "skipped_tensors": skipped,
        "models": model_entries,
        "pairwise": pairwise,
    })
