"""Time the frontier methods on ONE weight matrix of given shapes (T task vectors), next to task arithmetic's
sum of the same task vectors, in one process and one thread: the per-matrix cost that a whole-model merge
repeats for every matrix (scripts/benchmark_merge.py times whole merges, I/O included).

    .venv/bin/python scripts/benchmark_frontier.py --shapes 2048x2048 5632x2048 --models 3 --wudi_steps 5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model_merging_methods.frontier import FRONTIER_METHODS, merge_tensor, resolve_parameters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["2048x2048"], help="matrix shapes ROWSxCOLS")
    parser.add_argument("--models", type=int, default=3, help="task vectors T")
    parser.add_argument("--methods", nargs="+", default=list(FRONTIER_METHODS), choices=list(FRONTIER_METHODS))
    parser.add_argument("--wudi_steps", type=int, default=5, help="WUDI Adam steps timed (its cost is linear in them)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for text in args.shapes:
        shape = tuple(int(x) for x in text.split("x"))
        generator = torch.Generator().manual_seed(0)
        deltas = [torch.randn(shape, generator=generator) * 1e-3 for _ in range(args.models)]
        started = time.perf_counter()
        total = deltas[0].clone()
        for delta in deltas[1:]:
            total.add_(delta)
        reference = time.perf_counter() - started
        print(f"{text:>12s} {'task arithmetic (sum)':24s} {reference:8.3f} s", flush=True)
        for method in args.methods:
            params = resolve_parameters(method, {"iter_num": args.wudi_steps} if method == "wudi_merging" else {})
            started = time.perf_counter()
            merge_tensor(method, [d.clone() for d in deltas], params, layer=0, num_layers=2)
            seconds = time.perf_counter() - started
            rows.append({"shape": text, "method": method, "seconds": round(seconds, 3), "sum_seconds": round(reference, 3),
                         **({"wudi_steps": args.wudi_steps} if method == "wudi_merging" else {})})
            print(f"{text:>12s} {method:24s} {seconds:8.3f} s  ({seconds / reference:7.1f}× the sum)", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
