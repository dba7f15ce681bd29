"""The paper's LLM experiments in miniature, on CPU: family → drop-rate curves → merge table → report.

    bash scripts/llm_miniature.sh                      # SmolLM2-135M family, results/llm_miniature/
    bash scripts/llm_miniature.sh --tiny               # a tiny random chat Llama and fixture data (seconds)

Stages (each resumable: finished settings are result files that are skipped), as configs/llm_miniature.yaml
declares them: ``family`` trains the experts (scripts/build_llm_family.py, configs/llm_family.yaml); ``curve``
the drop-rate curves of the math and code experts; ``magnitude`` the same curve for the large-δ math expert;
``table`` the merge table (selected on validation, reported on held-out); ``generate`` exact match / pass@1 of
θ_pre, the experts and selected merges on small subsets; ``report`` writes report.md and the
figures from the result files only (utils/llm/miniature_report.py).
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
STAGES = ("family", "curve", "magnitude", "table", "generate", "report")


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
    parser.add_argument("--config", default=None, help="experiments (default: configs/llm_miniature.yaml)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "math_code"))
    parser.add_argument("--held_out", type=int, default=None, help="problems per reported benchmark (config: held_out)")
    parser.add_argument("--validation", type=int, default=None, help="validation problems per expert (config)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model and fixture data (tests)")
    args = parser.parse_args(argv)
    from utils.llm.miniature import CONFIG, Budget, delta_stats, drop_curve, load_plan, merge_table

    try:
        plan = load_plan(Path(args.config) if args.config else CONFIG)
    except (OSError, ValueError, KeyError) as error:
        print(f"llm_miniature.py: error: {error}", file=sys.stderr)
        return 2
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    base, data_dir, family_args = None, Path(args.data_dir), []
    budget = Budget(held_out=args.held_out or plan["held_out"], validation=args.validation or plan["validation"],
                    batch_size=plan["batch_size"])
    if args.tiny:
        base, data_dir = tiny_assets(root)
        family_args = ["--base", str(base), "--max_steps", "2"]
        budget = Budget(held_out=3, validation=3, batch_size=4)
    experts = sorted({*plan["curve"]["experts"], *plan["magnitude_study"]["experts"], *plan["merge"]["experts"]})
    started = time.time()

    def stage(name: str) -> None:
        print(f"[{time.time() - started:6.0f} s] stage {name}", flush=True)

    if "family" in args.stages:
        stage("family")
        command = [sys.executable, str(ROOT / "scripts" / "build_llm_family.py"), "--root", str(root / "family"),
                   "--data_dir", str(data_dir), "--experts", *experts, "--no_progress", *family_args]
        if subprocess.run(command).returncode != 0:
            return 1
    family_file = root / "family" / "family.json"
    if not family_file.is_file():
        print(f"llm_miniature.py: error: {family_file} does not exist: run the family stage first "
              f"(--stages family)", file=sys.stderr)
        return 2
    family_record = json.loads(family_file.read_text())
    base = Path(family_record["base"])
    family = {name: Path(path) for name, path in family_record["experts"].items()}
    specs = {name: _spec(Path(path)) for name, path in family.items()}
    for name, block in (("curve", "curve"), ("magnitude", "magnitude_study")):
        if name in args.stages:
            delta_stats(family, base, root)
            settings = plan[block]
            for expert in settings["experts"]:
                stage(f"{name} ({expert})")
                drop_curve(family, base, expert, settings["benchmarks"][expert], data_dir, root,
                           rates=tuple(settings["rates"]), methods=tuple(settings["methods"]),
                           seeds=tuple(plan["seeds"]), single_seed=tuple(settings["single_seed"]), budget=budget)
    if "table" in args.stages:
        stage("table")
        merge_table(family, specs, base, data_dir, root, grid=plan["merge"]["grid"], dare_rate=plan["merge"]["dare_rate"],
                    experts=tuple(plan["merge"]["experts"]), budget=budget)
    if "generate" in args.stages:
        stage("generate")
        from utils.llm.miniature import generate_stage
        generate_stage(family, base, data_dir, root, plan, python=sys.executable,
                       script=ROOT / "inference_llms_instruct_math_code.py")
    if "report" in args.stages:
        from utils.llm.miniature_report import write_report

        written = write_report(root)
        print("wrote " + ", ".join(str(p) for p in written))
    print(f"[{time.time() - started:6.0f} s] done", flush=True)
    return 0


def _spec(expert: Path):
    from utils.llm.family import ExpertSpec

    return ExpertSpec(**json.loads((expert / "family_expert.json").read_text())["spec"])


if __name__ == "__main__":
    sys.exit(main())
