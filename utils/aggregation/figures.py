"""Figures from grouped results (matplotlib, Agg backend: no display needed).

* ``drop_rate_figure``: the paper's Figure 1 layout — one panel per (model, task), the score ×100 against
  the drop rate, one line per variant (DARE, DropOnly, magnitude, ...) with the seed spread (mean ± std)
  shaded; every line starts at p = 0 from the fine-tuned model, whose score is also a dashed reference line.
* ``merge_figure``: one row per (model, task group): the average panel, then one panel per task (an
  average can hide a task that collapsed), bars of each merging method without and with DARE (error bars:
  std over seeds) and a dashed reference line at the fine-tuned model(s) (the average panel: the mean of the
  experts, each on its own task).

What a reader needs to trust them: every score axis holds zero and every value drawn, negative ones
included (CoLA's Matthews correlation and STS-B's correlations can be below zero; ``score_limits``), axis
labels in words ("GLUE dev score ×100", ``score_label``) rather than result keys, and one title per figure
(``figure.suptitle``; panels carry only their model / task). Each figure is written with
``<name>.sources.txt`` next to it (the result files it came from); the figure itself names the number of
files and their common folder in a footer.
"""
from __future__ import annotations

import os
from pathlib import Path

from utils.records import write_text_atomic
from utils.aggregation.collect import AVERAGE
from utils.aggregation.tables import METHOD_LABELS, METHOD_ORDER, VARIANT_ORDER, sort_key

COLORS = {"DARE": "tab:blue", "DropOnly": "tab:orange", "magnitude": "tab:green", "fine-tuned weights": "tab:red",
          "magnitude + rescale": "tab:olive", "fine-tuned weights (no rescale)": "tab:purple"}


SPLIT_NAMES = {"glue": {"test": "GLUE dev", "validation": "validation (10% of GLUE train)"}}
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "matthews_correlation": "Matthews corr.", "pearson": "Pearson r",
                "spearmanr": "Spearman ρ", "averaged_scores": "score", "loss": "loss", "exact_match": "exact match",
                "pass@1": "pass@1", "answer_nll_per_token": "answer NLL per token"}
UNSCALED = {"loss", "answer_nll_per_token"}     # plotted as they are (lower is better); every other metric ×100


def score_label(domain: str, split: str, metric: str | None = None, main: bool = True) -> str:
    """The y-axis label in words: "GLUE dev score ×100" for the main metric, "GLUE dev F1 ×100", "GLUE dev
    loss"; LLM splits keep their name ("test accuracy ×100")."""
    where = SPLIT_NAMES.get(domain, {}).get(split, split)
    named = metric is not None and (not main or metric in UNSCALED)
    what = METRIC_NAMES.get(metric, metric.replace("_", " ")) if named else "score"
    return f"{where} {what}" + ("" if metric in UNSCALED else " ×100")


def score_limits(values, margin: float = 0.06) -> tuple[float, float]:
    """y limits holding 0 and every finite value (means ± spreads included), with a margin: a bar or curve
    below zero is shown, and no axis starts above zero (which would stretch small differences)."""
    finite = [float(v) for v in values if v is not None and v == v and abs(float(v)) != float("inf")]
    low, high = min([0.0, *finite]), max([0.0, *finite])
    if low == high:     # nothing drawn, or only zeros: a unit axis rather than a degenerate one
        return (0.0, 1.0)
    pad = margin * (high - low)
    return (low - pad if low < 0 else 0.0, high + pad if high > 0 else 0.0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _footer(figure, sources: list[str]) -> None:
    common = os.path.commonpath(sources) if sources else ""
    if common and Path(common).suffix == ".json":
        common = str(Path(common).parent)
    figure.text(0.01, 0.005, f"source: {len(sources)} result files under {common}", fontsize=6, color="gray", va="bottom")


def _save(figure, path: Path, sources: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    figure.savefig(temporary, dpi=150, metadata={"Description": "sources: " + "; ".join(sources)})
    os.replace(temporary, path)
    write_text_atomic(path.with_name(path.stem + ".sources.txt"), "".join(f"{s}\n" for s in sources))
    return path


def _finish(plt, figure, path: Path, title: str, sources: set[str]) -> Path:
    """The figure's one title, source footer, layout, save (with its sources file), close."""
    figure.suptitle(title)
    _footer(figure, sorted(sources))
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    saved = _save(figure, path, sorted(sources))
    plt.close(figure)
    return saved


def drop_rate_figure(groups: list[dict], path: Path, split: str = "test", title: str | None = None,
                     metric: str | None = None) -> Path | None:
    """``metric``: plot this metric (e.g. loss) instead of each task's main metric; values ×100 unless loss."""
    drops = [g for g in groups if g["kind"] == "drop" and g["split"] == split and (g["metric"] == metric if metric else g["is_main"])]
    panels = sorted({(g["domain"], g["model"], g["task"]) for g in drops})
    if not panels:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(max(6.4, 4.6 * len(panels)), 3.8), squeeze=False)
    sources: set[str] = set()
    for axis, (domain, model, task) in zip(axes[0], panels):
        members = [g for g in drops if (g["domain"], g["model"], g["task"]) == (domain, model, task)]
        scale = 1.0 if members[0]["metric"] in UNSCALED else 100.0
        baseline = next((g for g in members if g["variant"] == "fine-tuned"), None)
        variants = sorted({g["variant"] for g in members if g["variant"] != "fine-tuned"}, key=lambda v: sort_key(v, VARIANT_ORDER))
        drawn: list[float] = []
        for variant in variants:
            points = sorted((g for g in members if g["variant"] == variant), key=lambda g: g["drop_rate"])
            if baseline is not None:
                points = [baseline, *points]
            rates = [0.0 if g is baseline else g["drop_rate"] for g in points]
            means = [scale * g["mean"] for g in points]
            stds = [scale * g["std"] for g in points]
            color = COLORS.get(variant)
            axis.plot(rates, means, marker="o", markersize=3, label=variant, color=color)
            axis.fill_between(rates, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2, color=color)
            drawn += [m - s for m, s in zip(means, stds)] + [m + s for m, s in zip(means, stds)]
            sources |= {s for g in points for s in g["sources"]}
        if baseline is not None:
            axis.axhline(scale * baseline["mean"], color="gray", linestyle="--", linewidth=0.9, label="fine-tuned (p = 0)")
            drawn.append(scale * baseline["mean"])
            sources |= set(baseline["sources"])
        axis.set_ylim(*score_limits(drawn))
        axis.set_xlabel("drop rate p")
        axis.set_ylabel(score_label(domain, split, members[0]["metric"], main=metric is None))
        axis.set_title(f"{model} on {task.upper() if domain == 'glue' else task}", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    default = f"Dropping delta parameters: {'score' if metric is None else METRIC_NAMES.get(metric, metric)} vs drop rate"
    return _finish(plt, figure, path, title or default, sources)


def _finetuned(groups: list[dict], split: str, model: str, task: str) -> dict | None:
    """The fine-tuned model of `task` on its own task (its main metric on `split`), as the merge table has it."""
    return next((g for g in groups if g["kind"] == "finetune" and g["is_main"] and g["split"] == split
                 and g["model"] == model and g["task"] == task and g["tasks"] == task), None)


def merge_figure(groups: list[dict], path: Path, split: str = "test", title: str | None = None) -> Path | None:
    merges = [g for g in groups if g["kind"] == "merge" and g["is_main"] and g["split"] == split]
    rows = sorted({(g["domain"], g["model"], g["tasks"]) for g in merges})
    if not rows:
        return None
    plt = _pyplot()
    import numpy as np

    def columns(row) -> list[str]:
        tasks = row[2].split("+")
        present = {g["task"] for g in merges if (g["domain"], g["model"], g["tasks"]) == row}
        return ([AVERAGE] if AVERAGE in present else []) + [t for t in tasks if t in present]

    width = max(len(columns(row)) for row in rows)
    methods_seen = {g["method"] for g in merges}
    figure, axes = plt.subplots(len(rows), width, figsize=(max(4.2, 0.9 * len(methods_seen) + 2.4) * width,
                                                           3.9 * len(rows)), squeeze=False)
    sources: set[str] = set()
    for row_axes, (domain, model, tasks) in zip(axes, rows):
        wanted = columns((domain, model, tasks))
        for axis in row_axes[len(wanted):]:
            axis.set_visible(False)
        for axis, task in zip(row_axes, wanted):
            members = [g for g in merges if (g["domain"], g["model"], g["tasks"], g["task"]) == (domain, model, tasks, task)]
            methods = sorted({g["method"] for g in members}, key=lambda m: sort_key(m, METHOD_ORDER))
            positions = np.arange(len(methods))
            drawn: list[float] = []
            metric = next((g["metric"] for g in members if g["task"] != AVERAGE), members[0]["metric"])
            scale = 1.0 if metric in UNSCALED else 100.0
            for offset, dare, color in ((-0.2, False, "tab:gray"), (0.2, True, "tab:blue")):
                cells = [(i, next((g for g in members if g["method"] == m and g["dare"] == dare), None))
                         for i, m in enumerate(methods)]
                cells = [(i, c) for i, c in cells if c is not None]     # a missing cell is no bar, not a bar at 0
                if not cells:
                    continue
                heights = [scale * c["mean"] for _, c in cells]
                errors = [scale * c["std"] for _, c in cells]
                axis.bar([positions[i] + offset for i, _ in cells], heights, width=0.4, yerr=errors, capsize=2,
                         color=color, label="with DARE" if dare else "without DARE")
                drawn += [h - e for h, e in zip(heights, errors)] + [h + e for h, e in zip(heights, errors)]
                sources |= {s for _, c in cells for s in c["sources"]}
            experts = [_finetuned(groups, split, model, t) for t in (tasks.split("+") if task == AVERAGE else [task])]
            if experts and all(experts):
                reference = scale * float(np.mean([e["mean"] for e in experts]))
                axis.axhline(reference, color="black", linestyle="--", linewidth=0.9,
                             label="fine-tuned experts (mean)" if task == AVERAGE else "fine-tuned model")
                drawn.append(reference)
                sources |= {s for e in experts for s in e["sources"]}
            axis.axhline(0.0, color="black", linewidth=0.5)
            axis.set_ylim(*score_limits(drawn))
            axis.set_xticks(positions, [METHOD_LABELS.get(m, m) for m in methods], rotation=20, ha="right", fontsize=8)
            what = "average of the tasks" if task == AVERAGE else (task.upper() if domain == "glue" else task)
            axis.set_ylabel(score_label(domain, split, metric))
            axis.set_title(f"{model}, {tasks.replace('+', ' + ')} merged: {what}", fontsize=9)
            axis.grid(axis="y", alpha=0.3)
            axis.legend(fontsize=7)
    return _finish(plt, figure, path, title or "Merging fine-tuned models, with and without DARE", sources)
