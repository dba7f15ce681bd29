"""One call from result files to every output: tidy table, seed groups, tables, figures.

Written to ``out`` (atomically, file by file): ``results_tidy.csv`` / ``results_tidy.jsonl`` (one row per
metric value, columns of utils/aggregation/collect.py), ``results_groups.csv`` (mean / std / n over seeds),
``tables.md`` and ``tables.tex`` (every table, each followed by its sources), ``skipped.txt`` (files not
read, and why), and the figures ``drop_rate.png`` / ``merge.png`` with their ``.sources.txt``; merges of three or more tasks also get the normalised tables and figures
of utils/aggregation/multitask.py.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from utils.records import check_output_folder, write_jsonl_atomic, write_text_atomic
from utils.aggregation.collect import COLUMNS, collect
from utils.aggregation.figures import drop_rate_figure, merge_figure
from utils.aggregation.multitask import multitask_outputs
from utils.aggregation.tables import Table, all_tables, group_rows

GROUP_COLUMNS = [c for c in COLUMNS if c not in ("source", "seed", "setting", "value")] + ["mean", "std", "n", "seeds", "settings", "sources"]


@dataclass
class AggregateOutputs:
    rows: list[dict]
    groups: list[dict]
    tables: list[Table]
    warnings: list[str]
    files: dict[str, Path] = field(default_factory=dict)


def _csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (";".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()})
    return buffer.getvalue()


def aggregate(paths: Iterable[str | os.PathLike], out: str | os.PathLike, split: str = "test",
              figure_title: str | None = None, figure_metric: str | None = None) -> AggregateOutputs:
    # the one output guard (utils/records.py): tables are files written one by one into --out, which may lie
    # inside a results folder, but a file or link at --out is refused (never written through or replaced)
    check_output_folder(out, None, overwrite=True, role="--out")
    collector = collect(paths)
    groups = group_rows(collector.rows)
    out = Path(out)
    multitask_tables, multitask_files = multitask_outputs(collector.rows, out, split, figure_title)
    tables = multitask_tables + all_tables(groups, split)
    files = {
        "tidy_csv": write_text_atomic(out / "results_tidy.csv", _csv(collector.rows, COLUMNS)),
        "tidy_jsonl": write_jsonl_atomic(out / "results_tidy.jsonl", collector.rows),
        "groups_csv": write_text_atomic(out / "results_groups.csv", _csv(groups, GROUP_COLUMNS)),
        "tables_md": write_text_atomic(out / "tables.md", "\n".join(t.markdown() for t in tables)),
        "tables_tex": write_text_atomic(out / "tables.tex", "\n".join(t.latex() for t in tables)),
        "skipped": write_text_atomic(out / "skipped.txt", "".join(f"{w}\n" for w in collector.warnings)),
    }
    files.update(multitask_files)
    for name, function in (("drop_rate", drop_rate_figure), ("merge", merge_figure)):
        path = function(groups, out / f"{name}.png", split, figure_title)
        if path is not None:
            files[f"figure_{name}"] = path
    if figure_metric:
        path = drop_rate_figure(groups, out / f"drop_rate_{figure_metric}.png", split, figure_title, metric=figure_metric)
        if path is not None:
            files[f"figure_drop_rate_{figure_metric}"] = path
    return AggregateOutputs(collector.rows, groups, tables, collector.warnings, files)
