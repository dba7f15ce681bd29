"""How fast each entry script refuses a bad input (issue 26, item 6): a missing recipe / config / model
folder, a taken output folder, a value out of range. Each case runs ``main(argv)`` in a fresh interpreter,
in a scratch folder holding a few stub model folders (``base``, ``ft``, ``ft2``: a config.json each) and a
taken folder ``taken``; it prints the wall time of the whole process, the exit status, whether torch /
transformers were imported, and the message. Target: every refusal well under 2 s, without torch.

    python scripts/benchmark_refusals.py [--only merge_models] [--json out.json]

tests/test_fast_refusals.py runs the same cases (exit status 2, the message, no torch; not the time).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RECIPE = "models:\n  - model: base\n  - model: ft\n    parameters: {weight: 0.5}\nmerge_method: task_arithmetic\nbase_model: base\n"
FILES = {
    "ok.yml": RECIPE,
    "bad.yml": "models:\n  - model: base\nmerge_method: nope\n",
    "gone.yml": RECIPE.replace("model: ft", "model: ./gone"),
    "moe.yml": "base_model: base\ngate_mode: random\nexperts:\n  - source_model: ft\n  - source_model: ft2\n",
    "moe_bad.yml": "base_model: base\ngate_mode: sometimes\nexperts:\n  - source_model: ft\n",
    "template.yml": "merge_method: linear\nmodels:\n  - model: ft\n    parameters: {weight: {free: {range: [0, 1]}}}\n",
    "searched/history.jsonl": '{"kind": "header", "template_sha256": "0", "sampler": "cma"}\n',
    "gsm8k_test.jsonl": "{\"question\": \"1 + 1?\", \"answer\": \"#### 2\"}\n",
}

# (script, argv, a fragment of the one-line message)
CASES = [
    ("merge_models", ["--config", "missing.yml", "--output_dir", "o"], "missing.yml"),
    ("merge_models", ["--config", "bad.yml", "--output_dir", "o"], "unknown merge_method 'nope'"),
    ("merge_models", ["--config", "gone.yml", "--output_dir", "o"], "./gone: no such checkpoint folder"),
    ("merge_models", ["--config", "ok.yml", "--output_dir", "taken"], "already exists"),
    ("merge_models", ["--base_model", "base", "--models", "ft", "--method", "task_arithmetic", "--output_dir", "taken"], "already exists"),
    ("merge_models", ["--base_model", "./nope", "--models", "ft", "--method", "task_arithmetic", "--output_dir", "o"], "--base_model ./nope"),
    ("merge_models", ["--base_model", "base", "--models", "ft", "--method", "task_arithmetic", "--output_dir", "ft"], "overlaps"),
    ("merge_models", ["--from_manifest", "missing.json", "--output_dir", "o"], "missing.json"),
    ("merge_models", ["--base_model", "base", "--models", "ft", "--method", "dare", "--drop_rate", "1.5", "--output_dir", "o"], "1.5"),
    ("merge_moe", ["missing.yml", "--output_dir", "o"], "missing.yml"),
    ("merge_moe", ["moe_bad.yml", "--output_dir", "o"], "gate_mode"),
    ("merge_moe", ["moe.yml", "--output_dir", "taken"], "already exists"),
    ("analyze_task_vectors", ["--base_model", "base", "--models", "nope/", "--output_dir", "o"], "nope/"),
    ("analyze_task_vectors", ["--base_model", "base", "--models", "ft", "--output_dir", "taken"], "already exists"),
    ("analyze_task_vectors", ["--base_model", "base", "--models", "ft", "--output_dir", "o", "--quantiles", "1.5"], "quantile 1.5"),
    ("extract_lora", ["--base", "base", "--model", "./nope", "--output_dir", "o", "--rank", "4"], "./nope"),
    ("extract_lora", ["--base", "base", "--model", "ft", "--output_dir", "taken", "--rank", "4"], "already exists"),
    ("merge_lora", ["--adapters", "./nope", "--output_dir", "o"], "./nope"),
    ("merge_lora", ["--adapters", "ft", "ft2", "--output_dir", "taken"], "already exists"),
    ("evaluate_lm_eval", ["--model", "./nope", "--tasks", "gsm8k_local"], "./nope"),
    ("train_plms_glue", ["--dataset_name", "mrpc", "--glue_dir", "noglue", "--language_model_name", "base"], "noglue"),
    ("train_plms_glue", ["--dataset_name", "mrpc", "--glue_dir", ".", "--language_model_name", "./nope"], "./nope"),
    ("inference_plms_glue", ["--dataset_names", "mrpc", "--glue_dir", "noglue", "--language_model_name", "base"], "noglue"),
    ("merge_plms_glue", ["--dataset_names", "mrpc", "sst2", "--glue_dir", "noglue", "--language_model_name", "base",
                         "--merging_method_name", "average_merging"], "noglue"),
    ("inference_llms_instruct_math_code", ["--finetuned_model_name", "./nope", "--dataset_name", "gsm8k", "--data_dir", "."], "./nope"),
    ("inference_llms_instruct_math_code", ["--finetuned_model_name", "ft", "--dataset_name", "gsm8k", "--data_dir", "nodata"], "gsm8k"),
    ("merge_llms_instruct_math_code", ["--models_to_merge", "./nope", "ft", "--model_tasks", "math", "code", "--pretrained_model_name",
                                       "base", "--merging_method_name", "average_merging", "--data_dir", "."], "./nope"),
    ("search_merge", ["--template", "missing.yml", "--output_dir", "o", "--fitness", "x"], "missing.yml"),
    ("search_merge", ["--template", "template.yml", "--output_dir", "searched", "--fitness", "x"], "pass --resume"),
    ("search_merge", ["--template", "template.yml", "--output_dir", "searched", "--fitness", "x", "--resume"], "another template"),
]

PROBE = """
import contextlib, io, json, sys
sys.path.insert(0, {repo!r})
import {script} as module
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
        code = module.main({argv!r})
    except SystemExit as exit:
        code = exit.code
lines = err.getvalue().strip().splitlines()
print(json.dumps({{"code": code if isinstance(code, int) or code is None else str(code), "message": lines[-1] if lines else "",
                  "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}}))
"""


def workspace() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="refusals-"))
    for name in ("base", "ft", "ft2", "taken"):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text('{"model_type": "llama"}\n')
    for name, text in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def run_case(folder: Path, script: str, argv: list[str], repo: Path = REPO) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(repo), script=script, argv=argv)], cwd=folder,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    seconds = time.perf_counter() - started
    try:
        outcome = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        outcome = {"code": None, "message": (result.stderr.strip().splitlines() or ["(no output)"])[-1], "torch": None,
                   "transformers": None}
    return {"script": script, "argv": argv, "seconds": round(seconds, 3), **outcome}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="entry scripts to measure (module names)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--repo", default=str(REPO), help="checkout whose scripts run (compare before / after)")
    args = parser.parse_args(argv)
    folder = workspace()
    rows = [run_case(folder, script, case_argv, Path(args.repo)) for script, case_argv, _ in CASES if not args.only or script in args.only]
    for row in rows:
        flags = "torch" if row["torch"] else "no torch"
        print(f"{row['seconds']:6.2f} s  exit {row['code']}  {flags:8s}  {row['script']}.py {' '.join(row['argv'])}\n"
              f"          {row['message'][:150]}")
    slowest = max(row["seconds"] for row in rows)
    print(f"{len(rows)} refusals: slowest {slowest:.2f} s, {sum(bool(r['torch']) for r in rows)} loaded torch; "
          f"load {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
