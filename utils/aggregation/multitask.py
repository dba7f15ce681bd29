"""Multi-task merge tables and figures: every merge of three or more tasks whose experts' own results are
among the files (FusionBench's and the task-arithmetic papers' layout).

For one (model, task group):
* absolute table: the best constant prediction (when a baseline file is given), each expert on its own
  task ("individual"), then every method without and with DARE: main metric ×100 per task and their
  average, mean ± std over the DARE mask seeds (sample std, ddof = 1), the winning setting (selected on
  validation; one per seed when they differ) and the wall time of the winner's merge (DARE + statistics
  + merge, evaluation excluded; mean over seeds);
* normalised table: merged / individual ×100 per task (the expert's own score on the same test split) and
  the average of those ratios; the mean ± std over seeds is taken over each seed's normalised values;
* figures ``merge_normalized_<group>.png`` (bars of the normalised average per method, without / with
  DARE, std over seeds as error bars, 100 = the experts) and ``merge_heatmap_<group>.png`` (normalised
  score per method × task).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.aggregation.collect import AVERAGE, TIMING_SPLIT
from utils.aggregation.tables import METHOD_LABELS, METHOD_ORDER, Table, sort_key

MIN_TASKS = 3


def _label(method: str, dare: bool) -> str:
    return METHOD_LABELS.get(method, method) + (" + DARE" if dare else "")


def _fmt(values: list[float], scale: float = 100.0) -> str:
    if not values or any(np.isnan(values)):
        return "–"
    mean = scale * float(np.mean(values))
    return f"{mean:.2f}" + (f" ± {scale * float(np.std(values, ddof=1)):.2f}" if len(values) > 1 else "")


class MultitaskGroup:
    """The results of one (model, task group): experts, baselines and per-(method, DARE) seed runs."""

    def __init__(self, rows: list[dict], model: str, tasks: list[str], split: str):
        self.model, self.tasks, self.split = model, tasks, split
        main = [r for r in rows if r["is_main"] and r["split"] == split]
        self.individual: dict[str, float] = {}
        self.baseline: dict[str, float] = {}
        self.sources: set[str] = set()
        for task in tasks:
            own = [r for r in main if r["kind"] == "finetune" and r["model"] == model and r["tasks"] == task and r["task"] == task]
            if own:
                self.individual[task] = float(np.mean([r["value"] for r in own]))
                self.sources |= {r["source"] for r in own}
            constant = [r for r in main if r["kind"] == "baseline" and r["task"] == task]
            if constant:
                self.baseline[task] = max(r["value"] for r in constant)
                self.sources |= {r["source"] for r in constant}
        # runs[(method, dare)][source] = {"scores": {task: v}, "setting": str, "seed": int, "time": float}
        self.runs: dict[tuple[str, bool], dict[str, dict]] = {}
        for row in rows:
            if row["kind"] != "merge" or row["model"] != model or row["tasks"] != "+".join(tasks):
                continue
            run = self.runs.setdefault((row["method"], bool(row["dare"])), {}).setdefault(
                row["source"], {"scores": {}, "setting": row["setting"], "seed": row["seed"], "time": None})
            if row["split"] == split and row["is_main"] and row["task"] in tasks:
                run["scores"][row["task"]] = row["value"]
            elif row["split"] == TIMING_SPLIT and row["metric"] == "merge_time_s":
                run["time"] = row["value"]
            self.sources.add(row["source"])

    @property
    def complete(self) -> bool:
        return len(self.individual) == len(self.tasks) and bool(self.runs)

    def keys(self) -> list[tuple[str, bool]]:
        return sorted(self.runs, key=lambda key: (sort_key(key[0], METHOD_ORDER), key[1]))

    def per_seed(self, key) -> list[dict]:
        """Each seed's run with its absolute and normalised scores (tasks missing a score are skipped)."""
        result = []
        for run in self.runs[key].values():
            if set(run["scores"]) != set(self.tasks):
                continue
            absolute = [run["scores"][t] for t in self.tasks]
            # an expert at or below 0 (CoLA's MCC, STS-B's correlation) has no ratio: the cell stays empty
            normalised = [run["scores"][t] / self.individual[t] if self.individual[t] > 0 else float("nan") for t in self.tasks]
            result.append({**run, "absolute": absolute, "normalised": normalised,
                           "absolute_mean": float(np.mean(absolute)), "normalised_mean": float(np.mean(normalised))})
        return result

    def settings(self, key) -> str:
        runs = self.per_seed(key)
        names = [run["setting"] or "default" for run in runs]
        distinct = list(dict.fromkeys(names))
        if len(distinct) == 1:
            return distinct[0]
        return " / ".join(f"{name} ({names.count(name)}×)" for name in distinct)

    def absolute_table(self) -> Table:
        header = ["method", *self.tasks, AVERAGE, "winner (validation)", "merge time (s)"]
        rows = []
        if len(self.baseline) == len(self.tasks):
            values = [self.baseline[t] for t in self.tasks]
            rows.append(["best constant prediction", *[f"{100 * v:.2f}" for v in values], f"{100 * np.mean(values):.2f}", "–", "–"])
        values = [self.individual[t] for t in self.tasks]
        rows.append(["individual (each expert on its task)", *[f"{100 * v:.2f}" for v in values], f"{100 * np.mean(values):.2f}", "–", "–"])
        for key in self.keys():
            runs = self.per_seed(key)
            if not runs:
                continue
            cells = [_fmt([run["absolute"][i] for run in runs]) for i in range(len(self.tasks))]
            times = [run["time"] for run in runs if run["time"] is not None]
            rows.append([_label(*key), *cells, _fmt([run["absolute_mean"] for run in runs]), self.settings(key),
                         f"{np.mean(times):.1f}" if times else "–"])
        return Table(f"multitask_absolute_{self.model}_{'-'.join(self.tasks)}",
                     f"Merging {len(self.tasks)} experts of {self.model} ({', '.join(self.tasks)}): {self.split} main metric ×100, "
                     f"mean ± std over DARE seeds", header, rows, sorted(self.sources),
                     note="main metric: CoLA Matthews corr., SST-2 / RTE accuracy, MRPC / QQP (accuracy + F1) / 2, "
                          "STS-B (Pearson + Spearman) / 2. Winner: the setting with the best mean validation score.")

    def normalised_table(self) -> Table:
        header = ["method", *self.tasks, f"{AVERAGE} (normalised)", "n seeds"]
        rows = [["individual", *["100.00"] * len(self.tasks), "100.00", "–"]]
        for key in self.keys():
            runs = self.per_seed(key)
            if not runs:
                continue
            cells = [_fmt([run["normalised"][i] for run in runs]) for i in range(len(self.tasks))]
            rows.append([_label(*key), *cells, _fmt([run["normalised_mean"] for run in runs]), str(len(runs))])
        return Table(f"multitask_normalised_{self.model}_{'-'.join(self.tasks)}",
                     f"Merging {len(self.tasks)} experts of {self.model}: normalised score = merged / individual ×100 ({self.split}), "
                     f"mean ± std over DARE seeds", header, rows, sorted(self.sources))

    def bar_figure(self, path: Path, title: str | None = None) -> Path:
        from utils.aggregation.figures import SPLIT_NAMES, _finish, _pyplot, score_limits

        plt = _pyplot()
        methods = list(dict.fromkeys(method for method, _ in self.keys()))
        drawn = [100.0]
        figure, axis = plt.subplots(figsize=(max(6.0, 0.75 * len(methods) + 2), 4.2))
        positions = np.arange(len(methods))
        for offset, dare, color in ((-0.2, False, "tab:gray"), (0.2, True, "tab:blue")):
            heights, errors = [], []
            for method in methods:
                runs = self.per_seed((method, dare)) if (method, dare) in self.runs else []
                values = [100 * run["normalised_mean"] for run in runs if not np.isnan(run["normalised_mean"])]
                heights.append(float(np.mean(values)) if values else float("nan"))   # nan: no bar
                errors.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
            axis.bar(positions + offset, heights, width=0.4, yerr=errors, capsize=2, color=color,
                     label="+ DARE (mask seeds: mean ± std)" if dare else "without DARE")
            drawn += [h - e for h, e in zip(heights, errors)] + [h + e for h, e in zip(heights, errors)]
        axis.axhline(100.0, color="black", linewidth=0.8, linestyle="--", label="fine-tuned experts (= 100)")
        axis.axhline(0.0, color="black", linewidth=0.5)
        axis.set_ylim(*score_limits(drawn))
        axis.set_xticks(positions, [METHOD_LABELS.get(m, m) for m in methods], rotation=30, ha="right", fontsize=8)
        where = SPLIT_NAMES["glue"].get(self.split, self.split)
        axis.set_ylabel(f"{where} score, % of the expert's (task mean)")
        default = f"{self.model}: {len(self.tasks)} GLUE tasks merged ({', '.join(self.tasks)}), normalised to the experts"
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=7)
        return _finish(plt, figure, path, title or default, self.sources)

    def heatmap_figure(self, path: Path, title: str | None = None) -> Path:
        from utils.aggregation.figures import SPLIT_NAMES, _finish, _pyplot

        plt = _pyplot()
        keys = [key for key in self.keys() if self.per_seed(key)]
        columns = [*self.tasks, AVERAGE]
        matrix = np.array([[100 * float(np.mean([run["normalised"][i] for run in self.per_seed(key)])) for i in range(len(self.tasks))]
                           + [100 * float(np.mean([run["normalised_mean"] for run in self.per_seed(key)]))] for key in keys])
        figure, axis = plt.subplots(figsize=(1.0 * len(columns) + 3, 0.32 * len(keys) + 1.6))
        low = float(np.nanmin(matrix)) if np.isfinite(matrix).any() else 50.0
        image = axis.imshow(matrix, cmap="RdYlGn", vmin=min(50.0, low), vmax=100.0, aspect="auto")
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                axis.text(j, i, "–" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.0f}", ha="center", va="center", fontsize=7)
        axis.set_xticks(range(len(columns)), columns, fontsize=8)
        axis.set_yticks(range(len(keys)), [_label(*key) for key in keys], fontsize=7)
        where = SPLIT_NAMES["glue"].get(self.split, self.split)
        default = f"{self.model}: merged / fine-tuned expert ×100 ({where}; DARE rows: mean of seeds)"
        figure.colorbar(image, ax=axis, fraction=0.03, label="% of the expert's score")
        return _finish(plt, figure, path, title or default, self.sources)


def multitask_groups(rows: list[dict], split: str = "test") -> list[MultitaskGroup]:
    """Every (model, task group) of merge rows with at least MIN_TASKS tasks and every expert's result."""
    keys = sorted({(r["model"], r["tasks"]) for r in rows if r["kind"] == "merge" and r["domain"] == "glue"})
    groups = [MultitaskGroup(rows, model, tasks.split("+"), split) for model, tasks in keys if len(tasks.split("+")) >= MIN_TASKS]
    return [group for group in groups if group.complete]


def multitask_outputs(rows: list[dict], out: Path, split: str = "test", title: str | None = None) -> tuple[list[Table], dict[str, Path]]:
    """Tables and figures of every multi-task group (see the module docstring)."""
    tables, files = [], {}
    for group in multitask_groups(rows, split):
        tables += [group.absolute_table(), group.normalised_table()]
        stem = f"{group.model}_{len(group.tasks)}tasks"
        files[f"figure_normalized_{stem}"] = group.bar_figure(out / f"merge_normalized_{stem}.png", title)
        files[f"figure_heatmap_{stem}"] = group.heatmap_figure(out / f"merge_heatmap_{stem}.png", title)
    return tables, files
