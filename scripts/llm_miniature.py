"""The paper's LLM experiments in miniature, on CPU: family → drop-rate curves → merge table → report.

    bash scripts/llm_miniature.sh                      # SmolLM2-135M family, results/llm_miniature/
    bash scripts/llm_miniature.sh --tiny               # a tiny random chat Llama and fixture data (seconds)

Stages (each resumable: finished settings are result files that are skipped): ``family`` trains the experts
(scripts/build_llm_family.py); ``curve`` runs utils.llm.miniature.drop_curve for math and code; ``table`` runs
the merge table; ``report`` writes report.md (tables) and drop_curve.png from the result files only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("family", "curve", "table", "report")


def tiny_assets(root: Path) -> tuple[Path, Path]:
    """A tiny random Llama with a chat template (the tests' byte tokenizer) and fixture data in `root`."""
    from tests.llm_helpers import save_tiny_llama, write_jsonl

    base, data = root / "tiny_base", root / "tiny_data"
    if not (base / "config.json").is_file():
        save_tiny_llama(base, seed=0, with_pad=True)
        config = json.loads((base / "tokenizer_config.json").read_text())
        config["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                                   "{% if add_generation_prompt %}<assistant>{% endif %}")
        (base / "tokenizer_config.json").write_text(json.dumps(config))
    data.mkdir(parents=True, exist_ok=True)
    problems = [{"question": f"What is {a} + {b}?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
                for a in range(1, 7) for b in range(1, 4)]
    write_jsonl(data / "gsm8k_train.jsonl", problems[:12])
    write_jsonl(data / "gsm8k_test.jsonl", problems[12:])
    code = [{"task_id": i, "text": f"Return {i}.", "code": f"def f():\r\n    return {i}",
             "test_list": [f"assert f() == {i}"], "test_setup_code": "", "challenge_test_list": []}
            for i in (11, 12, 13, 520, 530, 610, 620, 700, 800)]
    write_jsonl(data / "mbpp_full.jsonl", code)
    write_jsonl(data / "mbpp.test.jsonl", code[:3])
    return base, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT / "results" / "llm_miniature"))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "math_code"))
    parser.add_argument("--held_out", type=int, default=200, help="problems per reported benchmark")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tiny", action="store_true", help="tiny random model and fixture data (tests)")
    args = parser.parse_args(argv)
    from utils.llm.miniature import RATES, Budget, drop_curve, merge_table

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    base, data_dir, family_args = None, Path(args.data_dir), []
    budget = Budget(held_out=args.held_out)
    if args.tiny:
        base, data_dir = tiny_assets(root)
        family_args = ["--base", str(base), "--max_steps", "2"]
        budget = Budget(held_out=3, validation=3, batch_size=4)
    started = time.time()
    if "family" in args.stages:
        print(f"[{time.time() - started:6.0f} s] stage family", flush=True)
        command = [sys.executable, str(ROOT / "scripts" / "build_llm_family.py"), "--root", str(root / "family"),
                   "--data_dir", str(data_dir), "--experts", "math", "code", *family_args]
        if subprocess.run(command).returncode != 0:
            return 1
    family_record = json.loads((root / "family" / "family.json").read_text())
    base = Path(family_record["base"])
    family = {name: Path(path) for name, path in family_record["experts"].items()}
    specs = {name: _spec(Path(path)) for name, path in family.items()}
    if "curve" in args.stages:
        for skill in ("math", "code"):
            print(f"[{time.time() - started:6.0f} s] stage curve ({skill})", flush=True)
            drop_curve(family, base, skill, data_dir, root, rates=RATES, seeds=tuple(args.seeds), budget=budget)
    if "table" in args.stages:
        print(f"[{time.time() - started:6.0f} s] stage table", flush=True)
        merge_table(family, specs, base, data_dir, root, budget=budget)
    if "report" in args.stages:
        write_report(root)
        print(f"wrote {root / 'report.md'} and {root / 'drop_curve.png'}")
    return 0


def _spec(expert: Path):
    from utils.llm.family import ExpertSpec

    return ExpertSpec(**json.loads((expert / "family_expert.json").read_text())["spec"])


def write_report(root: Path) -> None:
    """report.md (curve means ± std per rate, merge selection) and drop_curve.png, from the result files."""
    import statistics

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(p.read_text()) for p in sorted((root / "drop_curve").glob("*.json"))]
    curves: dict = {}
    for row in rows:
        for bench, value in row["metrics"].items():
            curves.setdefault((row["skill"], bench, row["method"]), {}).setdefault(row["drop_rate"], []).append(value)
    lines = ["# LLM miniature (generated by scripts/llm_miniature.py from the result files under this folder)", "",
             "## Drop-rate curves: answer NLL per token (lower is better), mean ± std over seeds", ""]
    panels = sorted({(skill, bench) for skill, bench, _ in curves})
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.6), squeeze=False)
    for axis, (skill, bench) in zip(axes[0], panels):
        header = sorted({r for (s, b, _), v in curves.items() if (s, b) == (skill, bench) for r in v})
        lines += [f"### {skill} expert on {bench}", "", "| method | " + " | ".join(f"p={r}" for r in header) + " |",
                  "|---|" + "---|" * len(header)]
        for (s, b, method), values in sorted(curves.items()):
            if (s, b) != (skill, bench):
                continue
            rates = sorted(values)
            means = [statistics.mean(values[r]) for r in rates]
            cells = [f"{statistics.mean(values[r]):.3f}" + (f" ± {statistics.stdev(values[r]):.3f}"
                                                              if len(values[r]) > 1 else "") for r in rates]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
            axis.plot(rates, means, marker="o", label=method)
        lines.append("")
        axis.set_title(f"{skill} expert, {bench}")
        axis.set_xlabel("drop rate p")
        axis.set_ylabel("answer NLL per token")
        axis.legend(fontsize=7)
    figure.suptitle("DARE vs DropOnly vs magnitude pruning (source: drop_curve/*.json)")
    figure.tight_layout()
    figure.savefig(root / "drop_curve.png", dpi=120)
    selection_file = root / "merge_table" / "selection.json"
    if selection_file.is_file():
        selection = json.loads(selection_file.read_text())
        benches = sorted({k for row in selection["rows"].values() for k in row["held_out"]})
        lines += ["## Merge table: held-out answer NLL of the setting selected on validation", "",
                  "| model | " + " | ".join(benches) + " | selected options |", "|---|" + "---|" * (len(benches) + 1)]
        for name, row in selection["rows"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row['held_out'][b]:.3f}" for b in benches) +
                         f" | {row['options'] or ''} {('DARE p=' + str(row['dare_rate'])) if row['dare_rate'] else ''} |")
    from utils.records import write_text_atomic

    write_text_atomic(root / "report.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
