"""Global L2 norms of task vectors for norm-adaptive merging: streamed from the checkpoints, or read from
an analysis.json written by analyze_task_vectors.py (never typed by hand, although --norms allows it)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from utils.engine.reader import CheckpointReader

from .statistics import CHUNK, AnalysisError


def stream_task_vector_norms(base: CheckpointReader, models: Sequence[CheckpointReader], names: Sequence[str],
                             device: str = "cpu") -> list[float]:
    """‖θ_i − θ_base‖₂ over `names`, one tensor and one flat chunk at a time (float64 sums of float32 δ)."""
    squares = [0.0] * len(models)
    for name in names:
        numel = base.info(name)[1]
        total = math.prod(numel)
        for start in range(0, total, CHUNK):
            stop = min(start + CHUNK, total)
            theta = base.get(name, start, stop).to(device=device, dtype=torch.float32)
            for index, reader in enumerate(models):
                delta = reader.get(name, start, stop).to(device=device, dtype=torch.float32).sub_(theta)
                squares[index] += float(delta.double().square().sum())
    return [math.sqrt(s) for s in squares]


def _describe(files: list[dict]) -> list[tuple]:
    return sorted((f["file"], f["bytes"], f["header_sha256"]) for f in files)


def norms_from_analysis(path: str | Path, base: CheckpointReader, base_source: str,
                        models: Sequence[CheckpointReader], sources: Sequence[str],
                        exclude_regex: Sequence[str]) -> list[float]:
    """The global L2 norm of each model's task vector, from an analysis.json (a file, or a folder holding
    one). Models are matched by resolved folder (or the source string as given); the base must be the
    analysis's base, with the same weight files (names, sizes, header hashes), and the analysis must have
    excluded the same tensors as the merge. Raises AnalysisError naming the file and the model."""
    path = Path(path)
    if path.is_dir():
        path = path / "analysis.json"
    try:
        analysis = json.loads(path.read_text())
        entries = analysis["models"]
        recorded_base = analysis["base"]
        recorded_exclude = list(analysis["options"].get("exclude_regex", []))
    except FileNotFoundError as error:
        raise AnalysisError(f"norms file {path} does not exist") from error
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise AnalysisError(f"{path}: not an analysis.json of analyze_task_vectors.py ({error})") from error

    def same(entry: dict, reader: CheckpointReader, source: str) -> bool:
        return entry.get("path") == str(reader.folder.resolve()) or entry.get("source") == source

    if not same(recorded_base, base, base_source):
        raise AnalysisError(f"{path}: its base is {recorded_base.get('source')!r} ({recorded_base.get('path')}), "
                            f"not the merge's base {base_source!r}")
    if _describe(recorded_base.get("files", [])) != _describe(base.describe_files()):
        raise AnalysisError(f"{path}: the base's weight files changed since the analysis ({base_source})")
    if recorded_exclude != list(exclude_regex):
        raise AnalysisError(f"{path}: norms computed with --exclude_param_names_regex {recorded_exclude}, but this "
                            f"merge excludes {list(exclude_regex)}; rerun the analysis with the merge's exclusions")
    norms = []
    for reader, source in zip(models, sources):
        entry = next((e for e in entries if same(e, reader, source)), None)
        if entry is None:
            raise AnalysisError(f"norms file {path} does not list model {source!r} ({reader.folder.resolve()}); "
                                f"it lists {[e.get('source') for e in entries]}")
        if _describe(entry.get("files", [])) != _describe(reader.describe_files()):
            raise AnalysisError(f"{path}: the weight files of model {source!r} changed since the analysis")
        norm = entry.get("global", {}).get("l2")
        if not isinstance(norm, (int, float)) or not math.isfinite(norm):
            raise AnalysisError(f"{path}: model {source!r} has no finite global L2 norm ({norm!r})")
        norms.append(float(norm))
    return norms
