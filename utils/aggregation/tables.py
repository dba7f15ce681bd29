"""Group tidy rows over seeds and lay them out as the paper's tables (markdown and LaTeX).

Grouping: rows that agree on every column except ``source``, ``seed`` and ``value`` form one group with
``mean``, ``std`` (sample standard deviation, ddof = 1; 0 for a single seed), ``n`` and the sorted seeds and
sources. Tables show the main metric ×100 as ``mean ± std`` (just the mean when n = 1) on one split:

* merge table (per model and task group): the fine-tuned model of each task on its own task, then every
  method without and with DARE, one column per task and their average;
* drop-rate table (per model and task): one row per variant, one column per drop rate;
* variant comparison (per model, task and drop rate seen for at least two variants): fine-tuned, DARE,
  DropOnly, magnitude, fine-tuned weights side by side.
Each table is followed by the list of files it came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from utils.aggregation.collect import AVERAGE

GROUP_EXCLUDED = ("source", "seed", "setting", "value")
VARIANT_ORDER = ["fine-tuned", "DARE", "DropOnly", "magnitude", "magnitude + rescale", "fine-tuned weights",
                 "fine-tuned weights (no rescale)"]
METHOD_ORDER = ["average_merging", "task_arithmetic", "fisher_merging", "regmean_merging", "regmean_plusplus", "ties_merging"]
METHOD_LABELS = {"average_merging": "Average Merging", "task_arithmetic": "Task Arithmetic",
                 "fisher_merging": "Fisher Merging", "regmean_merging": "RegMean", "regmean_plusplus": "RegMean++",
                 "ties_merging": "TIES-Merging"}


def group_rows(rows: list[dict]) -> list[dict]:
    """Mean / std / n over seeds of rows equal in every other column (see the module docstring)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = tuple((column, row[column]) for column in row if column not in GROUP_EXCLUDED)
        groups.setdefault(key, []).append(row)
    result = []
    for key, members in groups.items():
        values = np.array([member["value"] for member in members], dtype=float)
        result.append({
            **dict(key),
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values),
            "seeds": sorted({m["seed"] for m in members if m["seed"] is not None}),
            "settings": sorted({m["setting"] for m in members if m.get("setting") is not None}),
            "sources": sorted({m["source"] for m in members}),
        })
    return result


def sort_key(value, order: list[str]) -> tuple:
    return (order.index(value), "") if value in order else (len(order), str(value))


def fmt(group: dict | None, percent: bool = True) -> str:
    if group is None:
        return "–"
    scale = 100.0 if percent else 1.0
    text = f"{scale * group['mean']:.2f}"
    return text + (f" ± {scale * group['std']:.2f}" if group["n"] > 1 else "")


@dataclass
class Table:
    """A titled table plus the files it came from; renders to markdown or LaTeX."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    sources: list[str] = field(default_factory=list)
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join("---" for _ in self.header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        lines += ["", f"Sources ({len(self.sources)} files): " + ", ".join(f"`{s}`" for s in self.sources)]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        escape = lambda text: (str(text).replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%")  # noqa: E731
                               .replace("&", "\\&").replace("#", "\\#").replace("±", "$\\pm$").replace("–", "--"))
        lines = [f"% {self.title}"]
        lines += [f"% source: {source}" for source in self.sources]
        lines += ["\\begin{table}[t]", "\\centering", f"\\caption{{{escape(self.title)}}}",
                  "\\begin{tabular}{l" + "c" * (len(self.header) - 1) + "}", "\\toprule",
                  " & ".join(escape(h) for h in self.header) + " \\\\", "\\midrule"]
        lines += [" & ".join(escape(cell) for cell in row) + " \\\\" for row in self.rows]
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines) + "\n"


def _main_groups(groups: list[dict], split: str, **where) -> list[dict]:
    return [g for g in groups if g["is_main"] and g["split"] == split and all(g[k] == v for k, v in where.items())]


def _sources(groups: list[dict]) -> list[str]:
    return sorted({source for g in groups for source in g["sources"]})


def merge_tables(groups: list[dict], split: str = "test") -> list[Table]:
    """One table per (domain, model, task group) of merge results."""
    merges = _main_groups(groups, split, kind="merge")
    tables = []
    for domain, model, tasks in sorted({(g["domain"], g["model"], g["tasks"]) for g in merges}):
        members = [g for g in merges if (g["domain"], g["model"], g["tasks"]) == (domain, model, tasks)]
        task_names = [t for t in tasks.split("+")] if "+" in tasks else sorted({g["task"] for g in members if g["task"] != AVERAGE})
        columns = task_names + ([AVERAGE] if any(g["task"] == AVERAGE for g in members) else [])
        used = list(members)
        rows = []
        for task in task_names:
            single = _main_groups(groups, split, kind="finetune", model=model, task=task)
            single = [g for g in single if g["tasks"] == task]
            if not single:
                continue
            used += single
            rows.append([f"fine-tuned ({task})", *[fmt(single[0]) if column == task and single else "–" for column in columns]])
        methods = sorted({g["method"] for g in members}, key=lambda m: sort_key(m, METHOD_ORDER))
        for method in methods:
            for dare in (False, True):
                cells = {g["task"]: g for g in members if g["method"] == method and g["dare"] == dare}
                if not cells:
                    continue
                label = METHOD_LABELS.get(method, method) + (" + DARE" if dare else "")
                rates = sorted({g["drop_rate"] for g in cells.values()})
                if dare:
                    label += f" (p = {', '.join(str(r) for r in rates)})"
                rows.append([label, *[fmt(cells.get(column)) for column in columns]])
        tables.append(Table(f"merge_{domain}_{model}_{tasks}".replace("+", "-"),
                            f"Merging {tasks.replace('+', ' + ')} ({model}, {split}, main metric ×100, mean ± std over seeds)",
                            ["method", *columns], rows, _sources(used)))
    return tables


def drop_rate_tables(groups: list[dict], split: str = "test") -> list[Table]:
    """One table per (domain, model, task): variants × drop rates; p = 0 is the fine-tuned model."""
    drops = _main_groups(groups, split, kind="drop")
    tables = []
    for domain, model, task in sorted({(g["domain"], g["model"], g["task"]) for g in drops}):
        members = [g for g in drops if (g["domain"], g["model"], g["task"]) == (domain, model, task)]
        rates = sorted({g["drop_rate"] for g in members})
        baseline = next((g for g in members if g["variant"] == "fine-tuned"), None)
        variants = sorted({g["variant"] for g in members if g["variant"] != "fine-tuned"}, key=lambda v: sort_key(v, VARIANT_ORDER))
        rows = []
        for variant in variants:
            cells = {g["drop_rate"]: g for g in members if g["variant"] == variant}
            rows.append([variant, *[fmt(baseline if rate == 0.0 else cells.get(rate)) for rate in rates]])
        if not variants and baseline is not None:
            rows.append(["fine-tuned", fmt(baseline)])
        metric = members[0]["metric"]
        tables.append(Table(f"drop_rate_{domain}_{model}_{task}", f"Drop rate on {task} ({model}, {split}, {metric} ×100, mean ± std over seeds)",
                            ["variant", *[f"p = {rate}" for rate in rates]], rows, _sources(members),
                            note="p = 0 is the fine-tuned model itself (the same value in every row)."))
    return tables


def comparison_tables(groups: list[dict], split: str = "test") -> list[Table]:
    """DARE vs DropOnly vs magnitude vs fine-tuned weights at every rate two or more of them share."""
    drops = _main_groups(groups, split, kind="drop")
    variants = [v for v in VARIANT_ORDER if v != "fine-tuned"]
    rows, used = [], []
    present: set[str] = set()
    for domain, model, task in sorted({(g["domain"], g["model"], g["task"]) for g in drops}):
        members = [g for g in drops if (g["domain"], g["model"], g["task"]) == (domain, model, task)]
        baseline = next((g for g in members if g["variant"] == "fine-tuned"), None)
        for rate in sorted({g["drop_rate"] for g in members if g["drop_rate"] > 0}):
            cells = {g["variant"]: g for g in members if g["drop_rate"] == rate}
            if len(cells) < 2:
                continue
            present |= set(cells)
            used += list(cells.values()) + ([baseline] if baseline else [])
            rows.append(([model, task, str(rate), fmt(baseline)], cells))
    if not rows:
        return []
    shown = [v for v in variants if v in present]
    table_rows = [prefix + [fmt(cells.get(v)) for v in shown] for prefix, cells in rows]
    return [Table(f"variants_{split}", f"DARE vs DropOnly vs magnitude pruning vs dropping fine-tuned weights ({split}, main metric ×100)",
                  ["model", "task", "drop rate p", "fine-tuned (p = 0)", *shown], table_rows, _sources(used))]


def all_tables(groups: list[dict], split: str = "test") -> list[Table]:
    return merge_tables(groups, split) + drop_rate_tables(groups, split) + comparison_tables(groups, split)
