"""Compare merge_moe.py with mergekit-moe 0.1.5 tensor by tensor (names, shapes, bits).

Builds the same MoE config with both tools and prints, per gate mode, how many tensors are identical, which
names only one of them writes, and the largest |Δ| of the others. mergekit-moe runs from its own virtual
environment (it pins its own dependencies; never install it in the project's):

    python3 -m venv /work/venvs/mergekit && /work/venvs/mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5
    .venv/bin/python scripts/compare_moe_with_mergekit.py --mergekit_bin /work/venvs/mergekit/bin/mergekit-moe

By default the base is SmolLM2-135M-Instruct (utils/llm/smollm2.py) and the experts are two perturbed copies
of it. Random gate modes are not compared (mergekit-moe draws them from torch's global generator).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [["What is 12 times 7?", "Solve the equation 3x + 5 = 20", "Compute the area of a circle"],
           ["Write a Python function that reverses a string", "def fibonacci(n):"]]
NEGATIVE = [["def main():"], None]


def load_all(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit_bin", required=True, help="the mergekit-moe executable of its own venv")
    parser.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--experts", nargs=2, default=None, help="two expert folders (default: perturbed copies)")
    parser.add_argument("--gate_modes", nargs="+", default=["hidden", "hidden_avg", "cheap_embed"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--work_dir", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from utils.llm.smollm2 import ensure_smollm2, perturbed_copies

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="compare_moe_"))
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else ensure_smollm2()
    experts = [Path(e) for e in args.experts] if args.experts else perturbed_copies(base, work / "copies", 2)
    results = []
    for mode in args.gate_modes:
        config = {"base_model": str(base), "gate_mode": mode, "dtype": args.dtype, "experts_per_token": 2,
                  "experts": [{"source_model": str(e), "positive_prompts": p} | ({"negative_prompts": n} if n else {})
                              for e, p, n in zip(experts, PROMPTS, NEGATIVE)]}
        recipe = work / f"{mode}.yml"
        recipe.write_text(yaml.safe_dump(config, sort_keys=False))
        ours, theirs = work / f"ours_{mode}", work / f"mergekit_{mode}"
        for folder, command in ((ours, [sys.executable, "merge_moe.py", str(recipe), "--output_dir",
                                        str(work / f"ours_{mode}"), "--overwrite", "--no_progress"]),
                                (theirs, [args.mergekit_bin, str(recipe), str(theirs), "--device", "cpu"])):
            if not folder.exists():
                subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        a, b = load_all(ours), load_all(theirs)
        common = sorted(set(a) & set(b))
        identical = sum(torch_equal(a[n], b[n]) for n in common)
        worst = max((float((a[n].double() - b[n].double()).abs().max()) for n in common
                     if a[n].shape == b[n].shape), default=0.0)
        row = {"gate_mode": mode, "tensors": len(common), "identical": identical, "max_abs_diff": worst,
               "only_ours": sorted(set(a) - set(b))[:5], "only_mergekit": sorted(set(b) - set(a))[:5]}
        results.append(row)
        print(json.dumps(row))
    return 0 if all(r["identical"] == r["tensors"] and not r["only_ours"] and not r["only_mergekit"]
                    for r in results) else 1


def torch_equal(x, y) -> bool:
    import torch

    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)


if __name__ == "__main__":
    sys.exit(main())
