"""Benchmark analyze_task_vectors.py against a merge of the same inputs (target: analysis ≤ 3× the merge).

By default the inputs are SmolLM2-135M-Instruct (utils/llm/smollm2.py) and two copies of it with perturbed
MLPs (bf16; utils.llm.smollm2.perturbed_copies), built once in --work_dir; --base and --models name other
local folders instead. Each command runs as a whole child process (imports, reading, hashing, writing, the
analysis's figures included), `--repeats` times after one untimed warm-up of each (page cache and the file
hash cache warm, as for a user who merges and analyses the same models). Prints each wall time, the best
of each and their ratio, and one JSON line.

    flock /work/heavy.lock nice -n 10 .venv/bin/python scripts/benchmark_analysis.py --work_dir /tmp/bench
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str], output: Path) -> float:
    """Wall seconds of one child process writing `output` (removed first: both tools refuse to overwrite)."""
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--models", nargs="+", default=None, help="model folders (default: two perturbed copies)")
    parser.add_argument("--method", default="task_arithmetic",
                        help="merge method timed (default task_arithmetic: reads the base and every model, as "
                             "the analysis does)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each command")
    parser.add_argument("--work_dir", default=None, help="where copies and outputs go (default: a temp dir)")
    args = parser.parse_args(argv)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="benchmark_analysis_"))
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    base = args.base
    if base is None:
        base = subprocess.run([python, "-m", "utils.llm.smollm2"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip().splitlines()[-1]
    models = args.models
    if models is None:   # in a child process: this one stays free of torch
        code = ("import sys; from pathlib import Path; from utils.llm.smollm2 import perturbed_copies; "
                "print(*perturbed_copies(Path(sys.argv[1]), Path(sys.argv[2]), 2))")
        models = subprocess.run([python, "-c", code, base, str(work / "copies")], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.split()
    inputs = ["--base_model", base, "--models", *models]
    merge = [python, "merge_models.py", *inputs, "--method", args.method, "--output_dir", str(work / "merged"),
             "--no_progress"]
    analysis = [python, "analyze_task_vectors.py", *inputs, "--output_dir", str(work / "analysis"), "--no_progress"]
    runs = (("merge", merge, work / "merged"), ("analysis", analysis, work / "analysis"))
    times: dict[str, list[float]] = {"merge": [], "analysis": []}
    for name, command, output in runs:
        timed(command, output)     # warm-up: page cache, hash cache
    for _ in range(args.repeats):
        for name, command, output in runs:
            times[name].append(timed(command, output))
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    best = {name: min(values) for name, values in times.items()}
    ratio = best["analysis"] / best["merge"]
    print(f"best merge ({args.method}) {best['merge']:.1f} s, best analysis {best['analysis']:.1f} s: "
          f"analysis = {ratio:.2f}x the merge (target <= 3x); load {os.getloadavg()[0]:.2f}")
    print(json.dumps({"base": base, "models": models, "method": args.method, "times": times, "ratio": ratio,
                      "load_1min": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
