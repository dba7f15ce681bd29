r"""Merge PEFT LoRA adapters of one base into one adapter, in adapter space (no base weights needed).

Combinations: PEFT's add_weighted_adapter types (linear, cat, svd, ties, ties_svd, dare_linear, dare_ties,
dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd), with PEFT's semantics, and KnOTS
(knots_linear, knots_ties, knots_dare_linear, knots_dare_ties: SVD alignment, then the rule on the aligned
coefficients). docs/lora.md states each formula.

Example:
    python merge_lora.py --adapters lora_math/ lora_code/ --weights 0.6 0.4 --combination cat --output_dir merged_lora/
    python merge_lora.py --adapters a/ b/ --combination knots_ties --density 0.5 --output_dir knots/

Exit status: 0 written; 2 bad input (one line; nothing written); 130 / 143 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from utils.cli import HelpFormatter, finite_float, run_entry
from utils.lora.combinations import COMBINATIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--adapters", nargs="+", required=True, help="PEFT LoRA adapter folders or hub ids")
    parser.add_argument("--weights", type=finite_float, nargs="+", default=None, help="one weight per adapter (default 1 each)")
    parser.add_argument("--combination", choices=COMBINATIONS, default="linear",
                        help="add_weighted_adapter's combination_type, or knots_*")
    parser.add_argument("--density", type=float, default=None,
                        help="keep fraction of ties / dare_* / magnitude_prune (and their _svd / knots_ forms)")
    parser.add_argument("--majority_sign_method", choices=["total", "frequency"], default="total",
                        help="ties / dare_ties sign election")
    parser.add_argument("--svd_rank", type=int, default=None, help="*_svd: output rank (default: the largest input rank)")
    parser.add_argument("--svd_clamp", type=float, default=None, help="*_svd: clamp quantile of the factors' entries")
    parser.add_argument("--knots_eps", type=float, default=1e-4, help="knots_*: singular values kept are > eps")
    parser.add_argument("--seed", type=int, default=0, help="dare_* draws (per module from (seed, module name))")
    parser.add_argument("--base_model", default=None,
                        help="optional: check every adapter against this base (module names, shapes, recorded base)")
    parser.add_argument("--output_dir", required=True, help="adapter folder to create (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return parser


def precheck(args: argparse.Namespace) -> int | None:
    """Refusals before torch loads: local adapter / model folders that do not exist, the output folder."""
    from utils.precheck import model_source, model_sources, output_folder, refused

    def check() -> None:
        model_sources(args.adapters, "--adapters", "adapter folder")
        model_source(args.base_model, "--base_model")
        output_folder(args.output_dir, args.overwrite, {**{f"--adapters {a}": a for a in args.adapters},
                                                        "--base_model": args.base_model})

    return refused("merge_lora.py", check)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    status = precheck(args)   # refused before torch loads
    if status is not None:
        return status
    from utils.engine.reader import CheckpointError
    from utils.lora.combine import CombineError, CombineOptions
    from utils.lora.merge import LoraMergeJob, merge_adapters

    def work() -> int:
        options = CombineOptions(args.combination, args.density, args.majority_sign_method, args.svd_rank,
                                 args.svd_clamp, args.knots_eps, args.seed)
        record = merge_adapters(LoraMergeJob(args.adapters, args.output_dir, args.weights, options, args.base_model,
                                             args.overwrite))
        print(f"merged {len(args.adapters)} adapters ({args.combination}) into {args.output_dir}: rank {record['rank']}, "
              f"{record['modules']} modules")
        return 0

    return run_entry("merge_lora.py", work, (CheckpointError, CombineError), args.output_dir)


if __name__ == "__main__":
    sys.exit(main())
