r"""Merge Hugging Face checkpoints tensor by tensor (DARE, average, task arithmetic, TIES, SLERP, ...).

Example:
    python merge_models.py --base_model base/ --models ft_a/ ft_b/ --method task_arithmetic \
        --drop_rate 0.9 --scaling_coefficient 1.0 --output_dir merged/
    python merge_models.py --from_manifest merged/merge_manifest.json --output_dir again/
    python merge_models.py --config configs/recipes/ties.yml --output_dir merged/   # a mergekit-style recipe

Exit status: 0 written; 2 bad input (a one-line message names the file, tensor or value; nothing is
written); 130 / 143 interrupted by Ctrl-C / SIGTERM (the staging folder is removed).
"""
from __future__ import annotations

import argparse
import sys

# light imports only: torch and transformers load after the arguments are parsed (--help answers at once)
from utils.cli import run_entry, warnings_to_stderr
from utils.engine import flags
from utils.engine.flags import check_arguments, job_from_args, precheck, recipe_job_from_args  # noqa: F401 (tests use them)


def build_parser():
    return flags.build_parser(__doc__)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args, sys.argv[1:] if argv is None else argv)
    status = precheck(args)   # paths, recipe schema, output folder: refused before torch loads
    if status is not None:
        return status
    from model_merging_methods import MergeError
    from utils.engine.reader import CheckpointError

    return run_entry("merge_models.py", lambda: _merge(args), (MergeError, CheckpointError), args.output_dir)


def _merge(args: argparse.Namespace) -> int:
    """Run the merge and report it (errors are reported by utils.cli.run_entry)."""
    from utils.engine.streaming import job_from_manifest_file, run_stream_merge

    with warnings_to_stderr("merge_models.py", "mergelm.engine"):
        if args.config:
            from utils.recipes.job import run_recipe_job

            manifest = run_recipe_job(recipe_job_from_args(args))[-1]   # the last document's: the output
        else:
            job = (job_from_manifest_file(args.from_manifest, args.output_dir, overwrite=args.overwrite,
                                          progress=not args.no_progress, threads=args.threads)
                   if args.from_manifest else job_from_args(args))
            manifest = run_stream_merge(job)
    print(f"wrote {args.output_dir} ({manifest['output']['num_tensors']} tensors, "
          f"{manifest['wall_seconds']:.1f} s); manifest: {args.output_dir}/merge_manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
