"""Run one recipe through merge_models.py and through mergekit, and print the max |difference| per tensor.

mergekit pins its own torch/transformers: install it in a SEPARATE environment (never in this project's
requirements), e.g. `python -m venv mkvenv && mkvenv/bin/pip install mergekit==0.1.5`, and point
--mergekit_yaml at its `mergekit-yaml`. Model paths in the recipe are resolved from the current folder.

Example:
    python scripts/compare_with_mergekit.py --config configs/recipes/ties.yml --mergekit_yaml mkvenv/bin/mergekit-yaml \
        --work_dir compare/ --json compare/ties.json
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_weights(folder: Path) -> dict:
    from utils.engine.reader import CheckpointReader

    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader.names()}


def compare(ours: dict, theirs: dict) -> dict:
    """Per tensor: max |ours − theirs| (in float64), elements that differ, and whether dtypes/shapes agree."""
    rows = {}
    for name in sorted(set(ours) | set(theirs)):
        if name not in ours or name not in theirs:
            rows[name] = {"missing_from": "ours" if name not in ours else "mergekit"}
            continue
        a, b = ours[name], theirs[name]
        if a.shape != b.shape:
            rows[name] = {"shape": [list(a.shape), list(b.shape)]}
            continue
        diff = (a.double() - b.double()).abs()
        rows[name] = {"max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
                      "differing": int((diff > 0).sum()), "numel": a.numel(),
                      "dtypes": [str(a.dtype).replace("torch.", ""), str(b.dtype).replace("torch.", "")]}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, nargs="+", help="single-document recipes (each compared)")
    parser.add_argument("--mergekit_yaml", default="mergekit-yaml", help="mergekit-yaml of the separate environment")
    parser.add_argument("--work_dir", default=None, help="where both outputs go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="--seed for us, --random-seed for mergekit")
    parser.add_argument("--json", default=None, help="also write every recipe's per-tensor table here")
    parser.add_argument("--quiet", action="store_true", help="print only each recipe's summary line")
    parser.add_argument("--mergekit_threads", type=int, default=1,
                        help="torch intra-op threads for mergekit (OMP_NUM_THREADS). Our recipe runs reduce with one "
                             "thread per worker; torch splits reductions over > 32768 elements across threads, so "
                             "slerp's norms and model_stock's cosines round the same only at the same count")
    parser.add_argument("--tie_order", choices=["index", "argsort"], default=None,
                        help="our side's --tie_order (default: merge_models.py's, argsort: mergekit's CPU order); "
                             "index: entries tied at a TIES / Breadcrumbs cut-off may differ")
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="compare-"))
    results = [compare_recipe(config, work / Path(config).stem, args) for config in args.config]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["summary"]["mismatched"] == 0 for r in results) else 1


def compare_recipe(config: str, work: Path, args: argparse.Namespace) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    ours_dir, theirs_dir = work / "mergelm", work / "mergekit"
    timings = {}
    started = time.time()
    subprocess.run([sys.executable, str(ROOT / "merge_models.py"), "--config", config, "--output_dir",
                    str(ours_dir), "--seed", str(args.seed), "--overwrite", "--no_progress",
                    *(["--tie_order", args.tie_order] if args.tie_order else [])], check=True,
                   capture_output=args.quiet)
    timings["mergelm_s"] = round(time.time() - started, 2)
    started = time.time()
    # offline: mergekit would otherwise ask the hub whether short relative paths are repositories
    subprocess.run([args.mergekit_yaml, config, str(theirs_dir), "--random-seed", str(args.seed),
                    "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--allow-crimes"], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.mergekit_threads),
                        "MKL_NUM_THREADS": str(args.mergekit_threads)}, capture_output=args.quiet)
    timings["mergekit_s"] = round(time.time() - started, 2)
    rows = compare(load_weights(ours_dir), load_weights(theirs_dir))
    width = max(len(n) for n in rows)
    for name, row in ([] if args.quiet else rows.items()):
        if "max_abs_diff" in row:
            print(f"{name:<{width}}  max|Δ| {row['max_abs_diff']:.3e}  differing {row['differing']}/{row['numel']}  "
                  f"{'/'.join(row['dtypes'])}")
        else:
            print(f"{name:<{width}}  {row}")
    diffs = [r["max_abs_diff"] for r in rows.values() if "max_abs_diff" in r]
    summary = {"config": config, "tensors": len(rows), "max_abs_diff": max(diffs) if diffs else None,
               "identical_tensors": sum(1 for r in rows.values() if r.get("differing") == 0),
               "differing_elements": sum(r.get("differing", 0) for r in rows.values()),
               "elements": sum(r.get("numel", 0) for r in rows.values()),
               "mismatched": sum(1 for r in rows.values() if "max_abs_diff" not in r), **timings}
    print(json.dumps(summary))
    return {"summary": summary, "tensors": rows}


if __name__ == "__main__":
    sys.exit(main())
