"""Files of an analysis run: analysis.json, <model>/summary.json, CSV tables, PNG figures, report.md.

Everything is written into a staging folder that is renamed into place only when complete
(utils/records.py write_folder_atomic): an interrupted run leaves nothing that looks finished.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from utils.records import write_folder_atomic

from .grouping import KINDS

FIGURES = {
    "layer_l2": "figures/layer_l2.png",
    "layer_kind": "figures/layer_kind_l2.png",
    "cosine": "figures/pairwise_cosine.png",
    "layer_cosine": "figures/layer_cosine.png",
    "histogram": "figures/abs_delta_histogram.png",
}
TENSOR_COLUMNS = ("numel", "l2", "l1", "max_abs", "mean", "std", "skewness", "excess_kurtosis", "zero_fraction",
                  "unchanged_fraction", "base_l2", "relative_l2")


def _finite(value):
    """JSON has no NaN/Inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def top_tensors(model: dict, k: int, key: str) -> list[dict]:
    rows = [{"tensor": name, **{c: s[c] for c in ("layer", "kind", "numel", "l2", "relative_l2")}}
            for name, s in model["tensors"].items() if s[key] is not None]
    return sorted(rows, key=lambda row: -row[key])[:k]


def model_summary(analysis: dict, model: dict, top_k: int) -> dict:
    """One model's summary.json: its inputs, global figures, per layer and kind, and its top-k tensors."""
    return {"label": model["label"], "source": model["source"], "path": model["path"], "files": model["files"],
            "base": analysis["base"], "global": model["global"], "per_kind": model["per_kind"],
            "per_layer": model["per_layer"], "top_tensors_by_l2": top_tensors(model, top_k, "l2"),
            "top_tensors_by_relative_l2": top_tensors(model, top_k, "relative_l2"),
            "pairwise": [p for p in analysis["pairwise"] if model["label"] in (p["a"], p["b"])]}


def write_outputs(analysis: dict, options) -> Path:
    def write(folder: Path) -> None:
        analysis["figures"] = write_figures(analysis, folder) if options.figures else {}
        analysis["files"] = {"tensors_csv": "tensors.csv", "layers_csv": "layers.csv",
                             "pairwise_csv": "pairwise.csv", "report": "report.md",
                             "summaries": {m["label"]: f"{m['label']}/summary.json" for m in analysis["models"]}}
        (folder / "analysis.json").write_text(json.dumps(_finite(analysis), indent=2, ensure_ascii=False) + "\n")
        for model in analysis["models"]:
            (folder / model["label"]).mkdir()
            summary = model_summary(analysis, model, options.top_k)
            (folder / model["label"] / "summary.json").write_text(
                json.dumps(_finite(summary), indent=2, ensure_ascii=False) + "\n")
        write_csvs(analysis, folder)
        (folder / "report.md").write_text(report_markdown(analysis, options.top_k))

    inputs = {"the base model": analysis["base"]["path"], **{f"the model {m['source']}": m["path"] for m in analysis["models"]}}
    return write_folder_atomic(options.output_dir, write, overwrite=options.overwrite, inputs=inputs)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def write_csvs(analysis: dict, folder: Path) -> None:
    quantile_keys = list(next(iter(analysis["models"][0]["tensors"].values()))["quantiles"])
    rows = [[m["label"], name, s["layer"], s["kind"], *[s[c] for c in TENSOR_COLUMNS],
             *[s["quantiles"][q] for q in quantile_keys]]
            for m in analysis["models"] for name, s in m["tensors"].items()]
    _csv(folder / "tensors.csv", ["model", "tensor", "layer", "kind", *TENSOR_COLUMNS,
                                  *[f"abs_{q}" for q in quantile_keys]], rows)
    rows = [[m["label"], layer, kind, g["numel"], g["l2"], g["l1"]]
            for m in analysis["models"] for layer, kinds in m["per_layer"].items() for kind, g in kinds.items()]
    _csv(folder / "layers.csv", ["model", "layer", "kind", "numel", "l2", "l1"], rows)
    rows = []
    for p in analysis["pairwise"]:
        rows.append([p["a"], p["b"], "global", p["cosine"], p["sign_agreement"], p["both_nonzero"]])
        rows += [[p["a"], p["b"], layer, v["cosine"], v["sign_agreement"], v["both_nonzero"]]
                 for layer, v in p["per_layer"].items()]
    _csv(folder / "pairwise.csv", ["model_a", "model_b", "scope", "cosine", "sign_agreement", "both_nonzero"], rows)


def cosine_matrix(analysis: dict, key: str = "cosine") -> list[list[float | None]]:
    labels = [m["label"] for m in analysis["models"]]
    matrix = [[None] * len(labels) for _ in labels]
    for i, model in enumerate(analysis["models"]):
        matrix[i][i] = 1.0 if model["global"]["l2"] > 0 else None
    for p in analysis["pairwise"]:
        i, j = labels.index(p["a"]), labels.index(p["b"])
        matrix[i][j] = matrix[j][i] = p[key]
    return matrix


def write_figures(analysis: dict, folder: Path) -> dict[str, str]:
    """The PNG figures (matplotlib, Agg backend); returns {figure: relative path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    (folder / "figures").mkdir()
    models = analysis["models"]
    labels = [m["label"] for m in models]
    layers = analysis["grouping"]["layers"]
    written = {}

    def save(figure, key: str) -> None:   # constrained layout: laid out within the one draw savefig makes
        figure.savefig(folder / FIGURES[key], dpi=110)
        plt.close(figure)
        written[key] = FIGURES[key]

    # per-layer L2, one bar per model
    figure, axis = plt.subplots(layout="constrained", figsize=(max(6.0, 0.35 * len(layers) * max(1, len(models)) + 2), 4))
    width = 0.8 / len(models)
    x = np.arange(len(layers))
    for index, model in enumerate(models):
        axis.bar(x + (index - (len(models) - 1) / 2) * width,
                 [model["per_layer"].get(layer, {}).get("all", {}).get("l2", 0.0) for layer in layers],
                 width, label=model["label"])
    axis.set_xticks(x, layers, rotation=90 if len(layers) > 16 else 0)
    axis.set_xlabel("layer")
    axis.set_ylabel("‖δ‖₂ of the layer")
    axis.set_title("Task-vector L2 norm per layer")
    axis.legend(fontsize="small")
    save(figure, "layer_l2")

    # layer × kind heat map, one panel per model, shared log colour scale
    kinds = [k for k in KINDS if any(k in m["per_kind"] for m in models)]
    grids = [np.array([[m["per_layer"].get(layer, {}).get(kind, {}).get("l2", np.nan) for kind in kinds]
                       for layer in layers]) for m in models]
    positive = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids] + [np.array([1.0])])
    norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 10))
    figure, axes = plt.subplots(1, len(models), layout="constrained", figsize=(2.2 + 1.1 * len(kinds) * len(models),
                                                          1.5 + 0.3 * len(layers)), squeeze=False)
    for axis, model, grid in zip(axes[0], models, grids):
        shown = np.ma.masked_where(~np.isfinite(grid) | (grid <= 0), grid)
        image = axis.imshow(shown, aspect="auto", cmap="viridis", norm=norm)
        axis.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
        axis.set_yticks(range(len(layers)), layers)
        axis.set_title(model["label"])
    axes[0][0].set_ylabel("layer")
    figure.colorbar(image, ax=axes[0].tolist(), label="‖δ‖₂ (log scale)")
    figure.suptitle("Task-vector L2 per layer and kind")
    figure.savefig(folder / FIGURES["layer_kind"], dpi=110, bbox_inches="tight")
    plt.close(figure)
    written["layer_kind"] = FIGURES["layer_kind"]

    # pairwise cosine and sign agreement matrices
    figure, axes = plt.subplots(1, 2, layout="constrained", figsize=(3.0 + 1.6 * len(models), 1.8 + 0.8 * len(models)))
    for axis, key, title, limits in ((axes[0], "cosine", "cosine similarity", (-1, 1)),
                                     (axes[1], "sign_agreement", "sign agreement", (0, 1))):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in cosine_matrix(analysis, key)])
        if key == "sign_agreement":
            np.fill_diagonal(matrix, 1.0)
        image = axis.imshow(matrix, cmap="coolwarm" if key == "cosine" else "viridis", vmin=limits[0],
                            vmax=limits[1])
        for (i, j), value in np.ndenumerate(matrix):
            axis.text(j, i, "–" if np.isnan(value) else f"{value:.3f}", ha="center", va="center", fontsize=8)
        axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        axis.set_yticks(range(len(labels)), labels)
        axis.set_title(title)
        figure.colorbar(image, ax=axis, fraction=0.046)
    save(figure, "cosine")

    # per-layer cosine of every pair
    if analysis["pairwise"]:
        figure, axis = plt.subplots(layout="constrained", figsize=(max(6.0, 0.3 * len(layers) + 2), 4))
        for p in analysis["pairwise"]:
            values = [p["per_layer"].get(layer, {}).get("cosine") for layer in layers]
            axis.plot(range(len(layers)), [np.nan if v is None else v for v in values], marker="o",
                      label=f"{p['a']} · {p['b']}")
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(layers)), layers, rotation=90 if len(layers) > 16 else 0)
        axis.set_xlabel("layer")
        axis.set_ylabel("cosine of the task vectors")
        axis.set_title("Pairwise cosine per layer")
        axis.legend(fontsize="small")
        save(figure, "layer_cosine")

    # |δ| histogram, log10 scale: fraction of entries per decade (bins are 1/4 of a power of two)
    figure, axis = plt.subplots(layout="constrained", figsize=(7, 4))
    for model in models:
        bins, zeros = model["histogram"]["bins"], model["histogram"]["exact_zeros"]
        total = max(sum(b[2] for b in bins) + zeros, 1)
        edges, density = [], []
        for lower, upper, count in bins:           # empty bins between listed ones are drawn at 0
            low, high = math.log10(max(lower, 1e-45)), math.log10(upper)
            if edges and edges[-1] < low:
                density.append(np.nan)
                edges.append(low)
            elif not edges:
                edges.append(low)
            density.append(count / total / (high - low))
            edges.append(high)
        if density:
            axis.stairs(density, edges, baseline=None, label=f"{model['label']} (exact zeros: {zeros / total:.2%})")
    axis.set_yscale("log")
    axis.set_xlabel("log10 |δ|")
    axis.set_ylabel("fraction of entries per decade")
    axis.set_title("Distribution of |δ|")
    axis.legend(fontsize="small")
    save(figure, "histogram")
    return written


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def report_markdown(analysis: dict, top_k: int) -> str:
    models = analysis["models"]
    lines = ["# Task-vector analysis", "",
             f"Base: `{analysis['base']['source']}`; {analysis['num_tensors']} tensors analysed "
             f"({len(analysis['skipped_tensors'])} skipped: excluded or not floating point); computation dtype "
             f"{analysis['options']['dtype']}. Layer stacks: "
             + (", ".join(f"`{p}` ({n} layers)" for p, n in analysis["grouping"]["stacks"].items()) or "none") + ".",
             ""]
    lines += [f"> warning: {w}" for w in analysis["grouping"]["warnings"]]
    lines += ["", "## Global", "", "| model | ‖δ‖₂ | ‖δ‖₁ | numel | ‖δ‖₂/‖θ_base‖₂ | max abs | exact zeros | unchanged |",
              "|---|---|---|---|---|---|---|---|"]
    for m in models:
        g = m["global"]
        lines.append(f"| {m['label']} | {_fmt(g['l2'])} | {_fmt(g['l1'])} | {_fmt(g['numel'])} | "
                     f"{_fmt(g['relative_l2'])} | {_fmt(g['max_abs'])} | {g['zero_fraction']:.2%} | "
                     f"{g['unchanged_fraction']:.2%} |")
    lines += ["", "L2 by kind of tensor:", "", "| model | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    for m in models:
        lines.append(f"| {m['label']} | " + " | ".join(_fmt(m["per_kind"].get(k, {}).get("l2")) for k in KINDS) + " |")
    if analysis["pairwise"]:
        lines += ["", "## Pairwise", "", "| a | b | cosine | sign agreement |", "|---|---|---|---|"]
        lines += [f"| {p['a']} | {p['b']} | {_fmt(p['cosine'])} | {_fmt(p['sign_agreement'])} |"
                  for p in analysis["pairwise"]]
    for m in models:
        lines += ["", f"## Top {top_k} tensors of {m['label']} by ‖δ‖₂", "",
                  "| tensor | layer | kind | ‖δ‖₂ | ‖δ‖₂/‖θ‖₂ |", "|---|---|---|---|---|"]
        lines += [f"| `{r['tensor']}` | {r['layer']} | {r['kind']} | {_fmt(r['l2'])} | {_fmt(r['relative_l2'])} |"
                  for r in top_tensors(m, top_k, "l2")]
    if analysis.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{key}]({path})" for key, path in analysis["figures"].items()]
    return "\n".join(lines) + "\n"
