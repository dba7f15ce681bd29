"""The LLM miniature's report: markdown tables and figures written from its result files only.

``<root>/report.md`` (family, drop-rate curves, magnitude study, merge table), ``drop_curve.png`` (one panel per
expert and benchmark), ``magnitude.png`` (NLL increase over p = 0 for the small- and large-δ math experts) and
``merge_table.png`` (gain retained per method ± DARE). Every table and figure names the files it comes from.

Retention (merge table): the share of an expert's NLL improvement over θ_pre that the merged model keeps on the
expert's own benchmark, ``100 · (NLL_pre − NLL_merged) / (NLL_pre − NLL_expert)`` (GSM8K → the math expert,
MBPP and HumanEval → the code expert); 100 = as good as the expert, 0 = no better than θ_pre.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

SKILL_OF = {"gsm8k": "math", "mbpp": "code", "human_eval": "code"}
YLABEL = "answer NLL per token (lower is better)"


def _read(paths) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(paths)]


def _cell(values: list[float]) -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    return f"{values[0]:.3f}"


def curves(root: Path) -> dict:
    """{(expert, benchmark, method): {rate: [values over seeds]}} from drop_curve/*.json."""
    table: dict = {}
    for row in _read((root / "drop_curve").glob("*.json")):
        for bench, value in row["metrics"].items():
            table.setdefault((row["expert"], bench, row["method"]), {}).setdefault(row["drop_rate"], []).append(value)
    return table


def _family_lines(root: Path) -> list[str]:
    family_file = root / "family" / "family.json"
    if not family_file.is_file():
        return []
    family = json.loads(family_file.read_text())
    deltas = json.loads((root / "deltas.json").read_text()) if (root / "deltas.json").is_file() else {}
    lines = ["## The family (θ_pre = " + Path(family["base"]).name + ")", "",
             "| expert | data | steps × batch | max tokens | lr | problems used | train loss first → last | "
             "train time (s) | ‖δ‖/‖θ_pre‖ | mean abs(δ) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, folder in sorted(family["experts"].items()):
        record = json.loads((Path(folder) / "family_expert.json").read_text())
        spec, delta = record["spec"], deltas.get(name, {})
        lines.append(f"| {name} | {spec['dataset']} | {spec['max_steps']} × {spec['batch_size']} | {spec['max_length']} | "
                     f"{spec['learning_rate']:g} | {record['data']['used']} | {record['train_loss_first']:.3f} → "
                     f"{record['train_loss_last']:.3f} | {record['train_runtime_s']:.0f} | "
                     f"{delta.get('relative_l2', float('nan')):.4f} | {delta.get('mean_abs', float('nan')):.2e} |")
    return lines + ["", f"Source: {family_file}, each expert's family_expert.json, {root / 'deltas.json'}.", ""]


def _curve_figure(plt, table: dict, experts: list[str], path: Path, base_nll: dict) -> Path:
    panels = sorted({(e, b) for e, b, _ in table if e in experts})
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(max(6.0, 4.6 * len(panels)), 4.0), squeeze=False)
    for axis, (expert, bench) in zip(axes[0], panels):
        curves = {method: values for (e, b, method), values in sorted(table.items()) if (e, b) == (expert, bench)}
        means = {m: {r: statistics.mean(v[r]) for r in sorted(v)} for m, v in curves.items()}
        # the y range spans the expert (p = 0) to above θ_pre; a curve that leaves it (dropping fine-tuned
        # weights reaches NLL ~10^3) is drawn clipped and its largest value named in the legend
        low = min(min(m.values()) for m in means.values())
        high = max(base_nll.get(bench, low), min(max(m.values()) for m in means.values()))
        top = high + 0.35 * (high - low) + 1e-3
        for method, values in curves.items():
            rates = list(means[method])
            errors = [statistics.stdev(values[r]) if len(values[r]) > 1 else 0.0 for r in rates]
            peak = max(means[method].values())
            label = method if peak <= top else f"{method} (off scale: up to {peak:.3g})"
            axis.errorbar(rates, [min(v, top) for v in means[method].values()], yerr=errors, marker="o",
                          markersize=3, capsize=2, label=label)
        if bench in base_nll:
            axis.axhline(base_nll[bench], color="grey", linestyle="--", linewidth=1, label="θ_pre (no fine-tune)")
        axis.set_ylim(low - 0.05 * (top - low), top + 0.02 * (top - low))
        axis.set_title(f"{expert} expert, {bench}")
        axis.set_xlabel("drop rate p")
        axis.set_ylabel(YLABEL)
        axis.legend(fontsize=7, loc="center left")
    figure.suptitle("Dropping the delta: DARE vs DropOnly vs magnitude pruning", fontsize=11)
    figure.text(0.99, 0.01, "source: drop_curve/*.json", ha="right", fontsize=7, color="grey")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _merge_lines(root: Path, plt) -> tuple[list[str], Path | None]:
    selection_file = root / "merge_table" / "selection.json"
    if not selection_file.is_file():
        return [], None
    selection = json.loads(selection_file.read_text())
    rows = selection["rows"]
    benches = [b for b in ("gsm8k", "mbpp", "human_eval") if b in rows["base"]["held_out"]]

    def retention(row: dict, bench: str) -> float | None:
        pre, expert = rows["base"]["held_out"][bench], rows.get(SKILL_OF[bench], {}).get("held_out", {}).get(bench)
        if expert is None or pre == expert:
            return None
        return 100.0 * (pre - row["held_out"][bench]) / (pre - expert)

    lines = ["## Merge table: held-out answer NLL (lower is better) and gain retained (%)", "",
             f"Selected on {selection['selected_on']}; reported on {', '.join(selection['reported_on'])}; DARE: "
             f"p = {selection['dare_rate']} on both experts, mask seed 0, with the setting selected without DARE.", "",
             "| model | " + " | ".join(benches) + " | " + " | ".join(f"retained {b}" for b in benches) +
             " | mean retained | selected setting (of candidates) |",
             "|---|" + "---|" * (2 * len(benches) + 2)]
    averages = {}
    for name, row in rows.items():
        kept = [retention(row, b) for b in benches]
        mean = statistics.mean(k for k in kept if k is not None) if any(k is not None for k in kept) else None
        if name not in ("base", *selection["experts"]):
            averages[name] = mean
        setting = {**row["setting"].get("options", {}), **row["setting"].get("parameters", {})}
        lines.append(f"| {name} | " + " | ".join(f"{row['held_out'][b]:.3f}" for b in benches) + " | " +
                     " | ".join("–" if k is None else f"{k:.0f}" for k in kept) + " | " +
                     ("–" if mean is None else f"{mean:.0f}") + " | " +
                     (f"{setting or 'default'} ({row['candidates']})" if "candidates" in row else "") + " |")
    lines += ["", f"Source: {selection_file} (each row names its result file).", ""]
    figure_path = None
    if averages:
        methods = sorted({name.replace(" + DARE", "") for name in averages})
        figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(methods)), 3.8))
        width = 0.4
        for offset, suffix, label in ((-width / 2, "", "without DARE"), (width / 2, " + DARE", "with DARE")):
            values = [averages.get(m + suffix) or 0.0 for m in methods]
            axis.bar([i + offset for i in range(len(methods))], values, width, label=label)
        axis.axhline(100, color="grey", linestyle="--", linewidth=1, label="the experts (100)")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("mean gain retained over θ_pre (%)")
        axis.set_title("math + code merged (source: merge_table/selection.json)")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure_path = root / "merge_table.png"
        figure.savefig(figure_path, dpi=120)
        plt.close(figure)
    return lines, figure_path


def write_report(root: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.records import write_text_atomic

    written = []
    table = curves(root)
    base_file = root / "merge_table" / "reference__base.json"
    base_nll = json.loads(base_file.read_text())["metrics"] if base_file.is_file() else {}
    lines = ["# LLM miniature (generated by scripts/llm_miniature.py from the result files under this folder)", ""]
    lines += _family_lines(root)
    experts = sorted({e for e, _, _ in table})
    if table:
        lines += ["## Drop-rate curves: held-out answer NLL per token (lower is better), mean ± std over seeds", ""]
        for expert, bench in sorted({(e, b) for e, b, _ in table}):
            rates = sorted({r for (e, b, _), v in table.items() if (e, b) == (expert, bench) for r in v})
            lines += [f"### {expert} expert on {bench}" + (f" (θ_pre: {base_nll[bench]:.3f})" if bench in base_nll else ""),
                      "", "| method | " + " | ".join(f"p={r}" for r in rates) + " |", "|---|" + "---|" * len(rates)]
            for (e, b, method), values in sorted(table.items()):
                if (e, b) == (expert, bench):
                    lines.append(f"| {method} | " + " | ".join(_cell(values[r]) if r in values else "–" for r in rates) + " |")
            lines.append("")
        lines += [f"Source: {root / 'drop_curve'}/*.json.", ""]
        curve_experts = [e for e in experts if not e.endswith("_large")]
        written.append(_curve_figure(plt, table, curve_experts, root / "drop_curve.png", base_nll))
        large = [e for e in experts if e.endswith("_large")]
        if large:
            written.append(_magnitude_figure(plt, table, root / "magnitude.png"))
    merge_lines, merge_figure = _merge_lines(root, plt)
    lines += merge_lines
    lines += _generate_lines(root)
    if merge_figure:
        written.append(merge_figure)
    write_text_atomic(root / "report.md", "\n".join(lines) + "\n")
    return [root / "report.md", *written]


def _magnitude_figure(plt, table: dict, path: Path) -> Path:
    """NLL increase over p = 0 on GSM8K for every math expert (small and large δ), DARE and DropOnly."""
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for (expert, bench, method), values in sorted(table.items()):
        if bench != "gsm8k" or method not in ("dare", "drop_only") or 0.0 not in values:
            continue
        rates = sorted(values)
        start = statistics.mean(values[0.0])
        axis.plot(rates, [statistics.mean(values[r]) - start for r in rates], marker="o", markersize=3,
                  linestyle="-" if method == "dare" else ":", label=f"{expert}, {method}")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("drop rate p")
    axis.set_ylabel("GSM8K answer NLL − NLL at p = 0")
    axis.set_title("Where DARE breaks as δ grows")
    axis.legend(fontsize=7)
    figure.text(0.99, 0.01, "source: drop_curve/*.json", ha="right", fontsize=7, color="grey")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _generate_lines(root: Path) -> list[str]:
    """Exact match / pass@1 of the generate stage: model × benchmark (correct / problems)."""
    summaries = _read((root / "generate").glob("save_gen_*/*/*/summary.json"))
    if not summaries:
        return []
    cells: dict = {}
    for summary in summaries:
        metrics = summary["metrics"]
        metric = "accuracy" if "accuracy" in metrics else "pass@1"
        model = summary["save_name"].split("_inference_mask_")[0]
        cells[(model, summary["dataset"])] = (f"{100 * metrics[metric]:.1f} ({metrics['num_correct']}/"
                                              f"{metrics['num_examples']})")
    models = sorted({m for m, _ in cells})
    benches = [b for b in ("gsm8k", "mbpp", "human_eval") if any(b == d for _, d in cells)]
    lines = ["## Generation: GSM8K exact match and MBPP / HumanEval pass@1 (%, greedy, chat prompts)", "",
             "| model | " + " | ".join(benches) + " |", "|---|" + "---|" * len(benches)]
    for model in models:
        lines.append(f"| {model} | " + " | ".join(cells.get((model, b), "–") for b in benches) + " |")
    return lines + ["", f"Source: {root / 'generate'}/save_gen_*/<benchmark>/<model>/summary.json.", ""]
