"""Analyse task vectors δ_i = θ_i − θ_base: per-tensor statistics, per-layer and per-kind norms, pairwise
cosine similarity and sign agreement, figures and a report. Streams tensor by tensor (memory: a few tensors).

Example:
    python analyze_task_vectors.py --base_model base/ --models ft_a/ ft_b/ --output_dir analysis/

Outputs (--output_dir, written atomically): analysis.json (everything; the manifest fields: inputs with file sha256, time, commit, versions),
<model>/summary.json, tensors.csv, layers.csv, pairwise.csv, figures/*.png, report.md.
The global L2 norms feed `merge_models.py --method norm_adaptive --norms_from <output_dir>/analysis.json`.
"""
from __future__ import annotations

import argparse
import os
import sys

from utils.analysis.defaults import COMPUTE_DTYPE_NAMES, DEFAULT_QUANTILES
from utils.cli import HelpFormatter, run_entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--base_model", required=True, help="pretrained model θ_base: folder or hub id")
    parser.add_argument("--models", nargs="+", required=True, help="fine-tuned models: folders or hub ids")
    parser.add_argument("--output_dir", required=True, help="folder to create (refused if it exists)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=sorted(COMPUTE_DTYPE_NAMES), default="float32",
                        help="computation dtype of δ (sums are float64 in any case)")
    parser.add_argument("--exclude_param_names_regex", nargs="*", default=[],
                        help="tensors matching any regex (re.match) are left out")
    parser.add_argument("--quantiles", type=float, nargs="+", default=list(DEFAULT_QUANTILES),
                        help="quantiles of |δ| per tensor (exact, any tensor size)")
    parser.add_argument("--top_k", type=int, default=10, help="tensors listed per model in summaries and report")
    parser.add_argument("--rel_tol", type=float, default=1e-6,
                        help="|δ| ≤ rel_tol·|θ_base| counts as unchanged")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="tensors analysed at once, on worker threads (results do not depend on it)")
    parser.add_argument("--no_figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="accept .bin checkpoints (torch.load with weights_only=True)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def options_from_args(args: argparse.Namespace) -> AnalysisOptions:
    from utils.analysis import AnalysisOptions  # torch loads only after parsing (fast --help)

    return AnalysisOptions(base_model=args.base_model, models=args.models, output_dir=args.output_dir,
                           device=args.device, dtype=args.dtype, exclude_regex=args.exclude_param_names_regex,
                           quantiles=tuple(args.quantiles), top_k=args.top_k, rel_tol=args.rel_tol,
                           overwrite=args.overwrite, allow_pickle=args.allow_pickle, figures=not args.no_figures,
                           threads=args.threads)


def precheck(args: argparse.Namespace) -> int | None:
    """Refusals before torch loads: local model folders that do not exist, the output folder."""
    from utils.precheck import InputError, model_source, model_sources, output_folder, refused

    def check() -> None:
        for q in args.quantiles:   # AnalysisOptions.validate says the same once torch is loaded
            if not 0.0 <= q <= 1.0:
                raise InputError(f"quantile {q} is outside [0, 1]")
        if args.top_k < 0:
            raise InputError(f"top_k = {args.top_k} is negative")
        model_source(args.base_model, "--base_model")
        model_sources(args.models, "--models")
        output_folder(args.output_dir, args.overwrite, {"the base model": args.base_model,
                                                        **{f"the model {m}": m for m in args.models}})

    return refused("analyze_task_vectors.py", check)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = precheck(args)   # refused before torch loads
    if status is not None:
        return status
    from utils.analysis import AnalysisError
    from utils.engine.reader import CheckpointError
    from utils.records import OutputExistsError

    return run_entry("analyze_task_vectors.py", lambda: _analyze(args), (AnalysisError, CheckpointError,
                                                                         OutputExistsError), args.output_dir)


def _analyze(args: argparse.Namespace) -> int:
    from utils.analysis import run_analysis

    analysis = run_analysis(options_from_args(args), progress=not args.no_progress)
    for model in analysis["models"]:
        print(f"{model['label']}: ‖δ‖₂ = {model['global']['l2']:.6g}, ‖δ‖₁ = {model['global']['l1']:.6g}, "
              f"{model['global']['numel']:,} entries")
    for pair in analysis["pairwise"]:
        cosine = "undefined" if pair["cosine"] is None else f"{pair['cosine']:.4f}"
        print(f"cosine({pair['a']}, {pair['b']}) = {cosine}")
    print(f"wrote {args.output_dir} ({analysis['num_tensors']} tensors, {analysis['wall_seconds']:.1f} s); "
          f"report: {args.output_dir}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
