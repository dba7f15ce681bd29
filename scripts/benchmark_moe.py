"""Benchmark merge_moe.py: wall time and peak RSS of whole build processes, per gate mode.

By default the experts are SmolLM2-135M-Instruct (utils/llm/smollm2.py) and two copies of it with perturbed
MLPs (bf16), built once in --work_dir; --base and --experts name other local folders instead. Each build
runs as a child process (peak RSS from wait4), next to the RSS of a process that only imports torch and
transformers; a table and a JSON line are printed. This process itself never imports torch: Linux counts
the RSS a child had before exec (a copy of its parent's) in the child's peak, so a large parent would
inflate every figure; the copies are therefore made in a child process too.

    .venv/bin/python scripts/benchmark_moe.py --gate_modes hidden uniform_random --threads 1
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

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [["Tell me about the history of France", "Write a short poem about the sea"],
           ["What is 12 times 7?", "Solve the equation 3x + 5 = 20"],
           ["Write a Python function that reverses a string", "def fibonacci(n):"]]


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--experts", nargs="+", default=None,
                        help="expert folders (default: the base and two perturbed copies)")
    parser.add_argument("--gate_modes", nargs="+", default=["hidden", "uniform_random"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", default="1", help="passed to merge_moe.py --threads")
    parser.add_argument("--work_dir", default=None, help="where copies and outputs go (default: a temp dir)")
    parser.add_argument("--copies_only", action="store_true", help="only make the perturbed copies of --base")
    args = parser.parse_args(argv)
    if args.copies_only:
        sys.path.insert(0, str(ROOT))
        from utils.llm.smollm2 import perturbed_copies
        perturbed_copies(Path(args.base), Path(args.work_dir), 2)
        return 0

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="benchmark_moe_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.base is None:
        sys.path.insert(0, str(ROOT))
        from utils.llm.smollm2 import ensure_smollm2
        base = ensure_smollm2()
    else:
        base = Path(args.base)
    experts = [Path(e) for e in args.experts] if args.experts else None
    if experts is None:
        subprocess.run([sys.executable, __file__, "--copies_only", "--base", str(base), "--work_dir", str(work)],
                       check=True)
        experts = [base, work / "copy1", work / "copy2"]
    floor_wall, floor_rss = timed([sys.executable, "-c", "import torch, transformers, safetensors, pydantic; "
                                   "from transformers import AutoModelForCausalLM, MixtralConfig"])
    rows = []
    for mode in args.gate_modes:
        config = {"base_model": str(base), "gate_mode": mode, "dtype": args.dtype, "experts_per_token": 2,
                  "experts": [{"source_model": str(e), "positive_prompts": PROMPTS[i % len(PROMPTS)]}
                              for i, e in enumerate(experts)]}
        config_path, output = work / f"moe_{mode}.yml", work / f"moe_{mode}"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        wall, rss = timed([sys.executable, str(ROOT / "merge_moe.py"), str(config_path), "--output_dir",
                           str(output), "--overwrite", "--no_progress", "--threads", args.threads])
        manifest = json.loads((output / "merge_manifest.json").read_text())
        rows.append({"gate_mode": mode, "wall_s": round(wall, 1), "peak_rss_gib": round(rss, 3),
                     "output_mib": round(manifest["output"]["total_bytes"] / 2**20, 1),
                     "experts": len(experts)})
    print(f"{'gate_mode':<16}{'wall s':>8}{'peak RSS GiB':>14}{'output MiB':>12}")
    for row in rows:
        print(f"{row['gate_mode']:<16}{row['wall_s']:>8}{row['peak_rss_gib']:>14}{row['output_mib']:>12}")
    print(f"{'import only':<16}{floor_wall:>8.1f}{floor_rss:>14.3f}")
    print(json.dumps({"base": str(base), "rows": rows, "import_only_peak_rss_gib": round(floor_rss, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
