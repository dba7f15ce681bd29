"""Build the GLUE demo table (markdown) from the result JSONs written by the three GLUE scripts.

Usage: python scripts/glue_demo_table.py --save_dir save_glue_demo [--config configs/glue.yaml]
Scores are percentages on the test split (GLUE dev, first --max_eval_samples examples in the demo).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model_merging_methods import DareOptions  # noqa: E402
from utils.cli import HelpFormatter  # noqa: E402
from utils.glue.checkpoints import checkpoint_name, model_result_path  # noqa: E402
from utils.glue.data import load_glue_config  # noqa: E402
from utils.glue.inference import result_name  # noqa: E402
from utils.glue.metrics import main_score  # noqa: E402
from utils.records import write_json_atomic, write_text_atomic  # noqa: E402


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"demo result missing: {path}")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def drop_rows(save_dir: Path, config: dict) -> list[list[str]]:
    """One row per (variant, rate): accuracy and F1 (mean ± std over mask seeds) of the drop task."""
    demo = config["demo"]
    task = demo["drop_task"]
    name = checkpoint_name(demo["language_model"], demo["learning_rate"])
    rows = []
    plain = _read(model_result_path(save_dir, [task], result_name(name, DareOptions(drop_rate=0.0), seed=0)))
    metrics = plain["metrics"]["test"]
    rows.append(["fine-tuned", "0.0", _pct(metrics["accuracy"]), _pct(metrics.get("f1", float("nan"))), "1"])
    for variant in demo["drop_settings"]:
        for rate in variant["weight_mask_rate"]:
            values = []
            for seed in variant["seeds"]:
                dare = DareOptions(drop_rate=float(rate), rescale=bool(variant["use_weight_rescale"]), strategy=variant["mask_strategy"],
                                   weight_format=variant["weight_format"])
                values.append(_read(model_result_path(save_dir, [task], result_name(name, dare, seed)))["metrics"]["test"])
            accuracy = np.array([v["accuracy"] for v in values])
            f1 = np.array([v.get("f1", float("nan")) for v in values])
            spread = lambda a: _pct(a.mean()) + (f" ± {100 * a.std():.1f}" if len(a) > 1 else "")
            rows.append([variant["name"], str(rate), spread(accuracy), spread(f1), str(len(values))])
    return rows


def merge_rows(save_dir: Path, config: dict) -> tuple[list[str], list[list[str]]]:
    """Individual models, then each method without and with DARE: test main score per task and mean."""
    demo = config["demo"]
    tasks = list(demo["tasks"])
    lm = demo["language_model"]
    name = checkpoint_name(lm, demo["learning_rate"])
    header = ["model", *tasks, "mean", "selected setting (validation)"]
    rows = []
    singles = []
    for task in tasks:
        result = _read(model_result_path(save_dir, [task], name))
        singles.append(main_score(config["tasks"][task], result["test_metrics"][task]))
        rows.append([f"fine-tuned {task} only", *[_pct(singles[-1]) if t == task else "–" for t in tasks], "–", "–"])
    group = "_".join(tasks)
    stem = f"{lm}_grid_{demo['merge_grid']}"
    for method in demo["merge_methods"]:
        for label, path in (
            (method, save_dir / "save_merge_results" / group / method / f"{stem}.json"),
            (f"DARE + {method}", save_dir / "save_merge_results" / group / "mask_merging" / method / f"{stem}.json"),
        ):
            winner = _read(path)["winners"]["mean"]
            scores = winner["test_scores"]
            rows.append([label, *[_pct(scores[t]) for t in tasks], _pct(scores["mean"]), winner["name"]])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def build_table(save_dir: Path, config: dict) -> str:
    demo = config["demo"]
    task = demo["drop_task"]
    parts = [
        f"### Dropping delta parameters of the {task} model ({demo['language_model']}, test = first {demo['max_eval_samples']} GLUE dev examples)",
        markdown(["variant", "drop rate p", "accuracy", "F1", "mask seeds"], drop_rows(save_dir, config)),
        "",
        f"### Merging {' + '.join(demo['tasks'])} (main metric on test; settings selected on validation)",
        markdown(*merge_rows(save_dir, config)),
    ]
    return "\n".join(parts) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--save_dir", default="save_glue_demo", help="folder the demo wrote its results to")
    parser.add_argument("--config", default=None, help="GLUE config YAML (default: configs/glue.yaml)")
    args = parser.parse_args(argv)
    config = load_glue_config(args.config)
    try:
        table = build_table(Path(args.save_dir), config)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from error
    write_text_atomic(Path(args.save_dir) / "glue_demo_table.md", table)
    write_json_atomic(Path(args.save_dir) / "glue_demo_table.json", {"markdown": table})
    print(table)
    return table


if __name__ == "__main__":
    main()
