"""A tiny entry script for the sweep tests (build_parser + main(argv), like the root scripts; no model).

Writes <save_dir>/toy_x<x>_seed<s>.json with value = x · 10 + seed and appends one line per call to
<save_dir>/calls.txt (so tests can count processes). --xs runs several x in one call (the batch path).
--fail_at X exits with status 3 after printing a message when x == X; --sleep S waits S seconds after
logging the call (a long setting, for the lock and stop tests), reporting its progress in ticks of 0.1 s
(utils/progress.py: the progress file and log lines a sweep reads).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--x", type=float, default=0.0)
    parser.add_argument("--xs", type=float, nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--mode", choices=["a", "b"], default="a")
    parser.add_argument("--loud", action="store_true")
    parser.add_argument("--fail_at", type=float, default=None)
    parser.add_argument("--save_dir", default=".")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after logging the call")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    save = Path(args.save_dir)
    save.mkdir(parents=True, exist_ok=True)
    xs = args.xs if args.xs is not None else [args.x]
    seeds = args.seeds if args.seeds is not None else [args.seed]
    with open(save / "calls.txt", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"xs": xs, "seeds": seeds, "mode": args.mode}) + "\n")
    if args.sleep:
        import time

        from utils.progress import track

        for _ in track(range(max(1, round(args.sleep * 10))), "toy sleep", unit="tick"):
            time.sleep(0.1)
    for x in xs:
        if args.fail_at is not None and x == args.fail_at:
            print(f"toy: failing on purpose at x = {x}", file=sys.stderr)
            raise SystemExit(3)
        for seed in seeds:
            payload = {"config": {**vars(args), "x": x, "seed": seed, "xs": None, "seeds": None}, "value": x * 10 + seed}
            (save / f"toy_x{x}_seed{seed}_{args.mode}.json").write_text(json.dumps(payload))
    print(f"toy: {len(xs) * len(seeds)} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
