"""Benchmark LoRA extraction and folding on the Llama fixture of scripts/benchmark_merge.py (bf16, sharded).

    flock /work/heavy.lock nice -n 10 .venv/bin/python scripts/benchmark_lora.py --fixture_dir /work/tmp/lora-bench \
        --mergekit_extract /work/venvs/mergekit/bin/mergekit-extract-lora --json_out docs/results/benchmark_lora.json

1. Extraction (base vs variant0, --rank R, embeddings and lm_head saved in full as mergekit does by default):
   extract_lora.py and mergekit-extract-lora, each as a whole process (wall seconds, peak RSS); then the
   same modules and ranks are checked and the reconstruction errors ‖ΔW − B A‖_F of both adapters are
   compared module by module (the first --check_layers layers; all of them with --check_layers -1).
2. Folding during a merge: merge_models.py task_arithmetic of base + [variant0, variant1] vs the same merge
   with variant1 given as base+adapter (variant1's rank-R adapter, embeddings as LoRA): the adapter is folded
   per tensor. --fold_repeats N alternates the two merges N times and reports the medians (on a 2-core
   machine one run of a 6-second merge varies by ±10 %); --fold_only skips step 1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GiB) and CPU seconds (user + system) of one child process: on a shared
    machine the CPU seconds compare tools more fairly than wall time."""
    import os

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return round(wall, 2), round(usage.ru_maxrss / 2**20, 3), round(usage.ru_utime + usage.ru_stime, 1)


def compare_errors(base: Path, model: Path, ours: Path, theirs: Path, layers: int) -> dict:
    """Same LoRA modules and ranks in both adapters; per-module errors of both, and the worst ratio."""
    import torch
    from safetensors.torch import load_file

    from utils.engine.reader import open_checkpoint

    ours_t, theirs_t = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    factor = lambda tensors: {k for k in tensors if ".lora_" in k}
    same_modules = factor(ours_t) == factor(theirs_t)
    same_ranks = same_modules and all(ours_t[k].shape == theirs_t[k].shape for k in factor(ours_t))
    base_reader, model_reader = open_checkpoint(str(base))[1], open_checkpoint(str(model))[1]
    rows, worst = [], 0.0
    for key in sorted(k for k in factor(ours_t) if k.endswith("lora_A.weight")):
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        if layers >= 0 and ".layers." in module and int(module.split(".layers.")[1].split(".")[0]) >= layers:
            continue
        delta = model_reader.get(module + ".weight").double() - base_reader.get(module + ".weight").double()
        b_key = key.replace("lora_A", "lora_B")
        errors = [float((delta - t[b_key].double() @ t[key].double()).norm()) for t in (ours_t, theirs_t)]
        rows.append({"module": module, "ours": errors[0], "mergekit": errors[1]})
        worst = max(worst, errors[0] / errors[1])
    return {"same_modules": same_modules, "same_ranks": same_ranks, "modules_checked": len(rows),
            "worst_error_ratio_ours_over_mergekit": worst, "full_tensors_ours": len(set(ours_t) - factor(ours_t)),
            "full_tensors_mergekit": len(set(theirs_t) - factor(theirs_t)), "modules": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture_dir", required=True)
    parser.add_argument("--params", type=float, default=0.84)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--mergekit_extract", default=None, help="mergekit-extract-lora of another venv")
    parser.add_argument("--check_layers", type=int, default=2)
    parser.add_argument("--json_out", default=None)
    parser.add_argument("--fold_repeats", type=int, default=1, help="alternated runs of the two merges (medians)")
    parser.add_argument("--fold_only", action="store_true", help="skip the extraction comparison (step 1)")
    args = parser.parse_args(argv)
    fixture = Path(args.fixture_dir)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_merge.py"), "--build_only", "--params",
                    str(args.params), "--variants", "2", "--fixture_dir", str(fixture)], check=True)
    base, variant0, variant1 = fixture / "base", fixture / "variant0", fixture / "variant1"
    work = Path(tempfile.mkdtemp(prefix="lora-bench-", dir=fixture))
    load = lambda: open("/proc/loadavg").read().split()[0]
    rows = {}
    comparison = None
    if not args.fold_only:
        comparison = extraction(args, base, variant0, work, rows, load)
    adapter = work / "adapter_v1"
    subprocess.run([sys.executable, str(ROOT / "extract_lora.py"), "--base", str(base), "--model", str(variant1),
                    "--output_dir", str(adapter), "--rank", str(args.rank), "--embeddings", "lora",
                    "--non_lora", "skip"], check=True, stdout=subprocess.DEVNULL)
    merge = lambda second, out: [sys.executable, str(ROOT / "merge_models.py"), "--base_model", str(base), "--models",
                                 str(variant0), second, "--method", "task_arithmetic", "--output_dir", str(out),
                                 "--no_progress"]
    runs: dict[str, list] = {"merge_full_checkpoints": [], "merge_with_adapter": []}
    for _ in range(args.fold_repeats):
        for name, second in (("merge_full_checkpoints", str(variant1)), ("merge_with_adapter", f"{base}+{adapter}")):
            out = work / "m_out"
            runs[name].append((*timed(merge(second, out)), load()))
            shutil.rmtree(out)
            print(name, runs[name][-1], flush=True)
    for name, values in runs.items():   # per column medians (wall, RSS, CPU); the load of the median-wall run
        middle = sorted(values)[len(values) // 2]
        rows[name] = (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values),
                      statistics.median(v[2] for v in values), middle[3])
    fold_ratio = rows["merge_with_adapter"][0] / rows["merge_full_checkpoints"][0]
    print(f"folding adds {100 * (fold_ratio - 1):.1f} % to the merge (median of {args.fold_repeats})", flush=True)
    result = {"params_billion": args.params, "rank": args.rank, "fold_repeats": args.fold_repeats,
              "fold_runs": runs, "fold_overhead_percent": round(100 * (fold_ratio - 1), 1),
              "rows": {k: {"wall_s": v[0], "peak_rss_gib": v[1], "cpu_s": v[2], "load_1min": v[3]}
                       for k, v in rows.items()},
              "comparison": comparison}
    print("\n| run | wall (s) | CPU (s) | peak RSS (GiB) | load |\n|---|---|---|---|---|")
    for name, (wall, rss, cpu, avg) in rows.items():
        print(f"| {name} | {wall} | {cpu} | {rss} | {avg} |")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def extraction(args, base: Path, variant0: Path, work: Path, rows: dict, load) -> dict | None:
    """Step 1: extract_lora.py vs mergekit-extract-lora on (base, variant0); the comparison of their adapters."""
    ours = work / "ours"
    rows["extract_ours"] = (*timed([sys.executable, str(ROOT / "extract_lora.py"), "--base", str(base), "--model",
                                    str(variant0), "--output_dir", str(ours), "--rank", str(args.rank),
                                    "--embeddings", "full"]), load())
    print("extract_lora.py", rows["extract_ours"], flush=True)
    comparison = None
    if args.mergekit_extract:
        theirs = work / "mergekit"
        rows["extract_mergekit"] = (*timed([args.mergekit_extract, "--model", str(variant0), "--base-model", str(base),
                                            "--out-path", str(theirs), "--max-rank", str(args.rank)]), load())
        print("mergekit-extract-lora", rows["extract_mergekit"], flush=True)
        comparison = compare_errors(base, variant0, ours, theirs, args.check_layers)
        print({k: v for k, v in comparison.items() if k != "modules"}, flush=True)
    return comparison


if __name__ == "__main__":
    sys.exit(main())
