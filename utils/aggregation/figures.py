"""Figures from grouped results (matplotlib, Agg backend: no display needed).

* ``drop_rate_figure``: the paper's Figure 1 layout — one panel per (model, task), the main metric ×100
  against the drop rate, one line per variant (DARE, DropOnly, magnitude, ...) with the seed spread
  (mean ± std) shaded; every line starts at p = 0 from the fine-tuned model.
* ``merge_figure``: one panel per (model, task group), bars of the average main metric of each merging
  method without and with DARE (error bars: std over seeds).

Each figure is written with ``<name>.sources.txt`` next to it (the result files it came from); the figure
itself names the number of files and their common folder in a footer.
"""
from __future__ import annotations

import os
from pathlib import Path

from utils.records import write_text_atomic
from utils.aggregation.collect import AVERAGE
from utils.aggregation.tables import METHOD_LABELS, METHOD_ORDER, VARIANT_ORDER, sort_key

COLORS = {"DARE": "tab:blue", "DropOnly": "tab:orange", "magnitude": "tab:green", "fine-tuned weights": "tab:red",
          "magnitude + rescale": "tab:olive", "fine-tuned weights (no rescale)": "tab:purple"}


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


def _finish(plt, figure, path: Path, title: str | None, sources: set[str]) -> Path:
    """Title, source footer, layout, save (with its sources file), close."""
    if title:
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
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    sources: set[str] = set()
    for axis, (domain, model, task) in zip(axes[0], panels):
        members = [g for g in drops if (g["domain"], g["model"], g["task"]) == (domain, model, task)]
        baseline = next((g for g in members if g["variant"] == "fine-tuned"), None)
        variants = sorted({g["variant"] for g in members if g["variant"] != "fine-tuned"}, key=lambda v: sort_key(v, VARIANT_ORDER))
        for variant in variants:
            points = sorted((g for g in members if g["variant"] == variant), key=lambda g: g["drop_rate"])
            if baseline is not None:
                points = [baseline, *points]
            rates = [0.0 if g is baseline else g["drop_rate"] for g in points]
            scale = 1.0 if metric == "loss" else 100.0
            means = [scale * g["mean"] for g in points]
            stds = [scale * g["std"] for g in points]
            color = COLORS.get(variant)
            axis.plot(rates, means, marker="o", markersize=3, label=variant, color=color)
            axis.fill_between(rates, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2, color=color)
            sources |= {s for g in points for s in g["sources"]}
        if baseline is not None and not variants:
            axis.axhline(100 * baseline["mean"], color="gray", linestyle="--", label="fine-tuned")
            sources |= set(baseline["sources"])
        axis.set_xlabel("drop rate p")
        axis.set_ylabel(f"{members[0]['metric']}{'' if metric == 'loss' else ' ×100'} ({split})")
        axis.set_title(f"{model} on {task}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return _finish(plt, figure, path, title, sources)


def merge_figure(groups: list[dict], path: Path, split: str = "test", title: str | None = None) -> Path | None:
    merges = [g for g in groups if g["kind"] == "merge" and g["is_main"] and g["split"] == split and g["task"] == AVERAGE]
    if not merges:
        merges = [g for g in groups if g["kind"] == "merge" and g["is_main"] and g["split"] == split]
    panels = sorted({(g["domain"], g["model"], g["tasks"]) for g in merges})
    if not panels:
        return None
    plt = _pyplot()
    import numpy as np

    figure, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 1.3 * len(METHOD_ORDER)) * len(panels), 3.8), squeeze=False)
    sources: set[str] = set()
    for axis, (domain, model, tasks) in zip(axes[0], panels):
        members = [g for g in merges if (g["domain"], g["model"], g["tasks"]) == (domain, model, tasks)]
        methods = sorted({g["method"] for g in members}, key=lambda m: sort_key(m, METHOD_ORDER))
        positions = np.arange(len(methods))
        for offset, dare, color in ((-0.2, False, "tab:gray"), (0.2, True, "tab:blue")):
            cells = [next((g for g in members if g["method"] == m and g["dare"] == dare), None) for m in methods]
            heights = [100 * c["mean"] if c else 0.0 for c in cells]
            errors = [100 * c["std"] if c else 0.0 for c in cells]
            axis.bar(positions + offset, heights, width=0.4, yerr=errors, capsize=2, color=color,
                     label="with DARE" if dare else "without DARE")
            sources |= {s for c in cells if c for s in c["sources"]}
        axis.set_xticks(positions, [METHOD_LABELS.get(m, m) for m in methods], rotation=20, ha="right", fontsize=8)
        axis.set_ylabel(f"average main metric ×100 ({split})")
        axis.set_title(f"{model}: {tasks.replace('+', ' + ')}")
        low = min((100 * g["mean"] - 100 * g["std"] for g in members), default=0.0)
        axis.set_ylim(max(0.0, low - 10), None)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=7)
    return _finish(plt, figure, path, title, sources)
