"""Merge fine-tuned GLUE task models with average / task arithmetic / Fisher / RegMean / TIES / norm-adaptive, ± DARE.

Each group of tasks (--dataset_names, or every pair of the eight tasks) is merged for every setting of
the method's grid (configs/glue.yaml, "paper" grid by default; --merge_grid none uses the flags as the
single setting). Heads (.*classifier.*) are excluded from the merge and every task is evaluated with its
own head. Settings are selected on --select_on (validation = 10% held out of GLUE train, the default;
test = GLUE dev, the original protocol) and winners are reported on the test split (GLUE dev).
mask_merging = DARE (--weight_mask_rate grid, --use_weight_rescale, --mask_strategy, --weight_format)
followed by --mask_apply_method with that method's winning hyperparameters (read from its result file):
each task's drop rate is searched on that task's own winning setting (the original protocol); with
--mask_merging_search wide every task chooses among all the method's winning settings (a larger search).

--merging_method_names / --mask_apply_methods run several methods in one process (the data is loaded once); each
writes the same result file as its own run.

Outputs, under --save_dir:
  save_merge_results/<tasks>/<method>[/<apply_method>]/<lm><suffix>.json        winners + all settings
  save_merge_results/<tasks>/<method>[/<apply_method>]/<lm><suffix>_settings/<setting>.json
"""
from __future__ import annotations

import argparse
import itertools

from utils.cli import HelpFormatter, add_dare_arguments, dare_options_from_args, resolve_device
from utils.glue.cli import (BASE_METHODS, MASK_SEARCHES, MERGING_METHODS, WINNERS, add_run_arguments, check_tasks,
                            config_from_argv, precheck, registry_methods, user_errors)


def build_parser(config: dict) -> argparse.ArgumentParser:
    merging = config["merging"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--language_model_name", default="roberta-base", help="pretrained encoder θ_pre (hub id or folder); also names the checkpoints")
    parser.add_argument("--dataset_names", nargs="+", default=None, help="tasks whose models are merged together (default: every pair of the eight tasks)")
    extra = registry_methods()
    parser.add_argument("--merging_method_name", default="average_merging", choices=(*MERGING_METHODS, *extra),
                        help="merging method (MergeLM's, or another method of the registry: its grid names MergeOptions fields)")
    parser.add_argument("--merging_method_names", nargs="+", default=None, choices=(*BASE_METHODS, *extra), metavar="METHOD",
                        help="several methods, each searched as by --merging_method_name (same result files), from one load of the "
                             "data (replaces --merging_method_name; for DARE + several methods use --mask_apply_methods)")
    parser.add_argument("--scaling_coefficient", type=float, default=1.0, help="λ of task arithmetic / TIES / norm_adaptive (grid none)")
    parser.add_argument("--nums_fisher_examples", type=int, nargs="+", default=None, help="examples for each model's Fisher (grid none)")
    parser.add_argument("--fisher_scaling_coefficients", type=float, nargs="+", default=None, help="per-model Fisher coefficients c_k (grid none; default 1/K)")
    parser.add_argument("--normalize_fisher_weight", action="store_true", help="scale each model's coefficient by 1/(‖F_k‖ + ε), normalised")
    parser.add_argument("--minimal_fisher_weight", type=float, default=merging["minimal_fisher_weight"], help="ε added to every Fisher entry and norm")
    parser.add_argument("--nums_regmean_examples", type=int, nargs="+", default=None, help="examples for each model's Gram matrices (grid none)")
    parser.add_argument("--reduce_non_diagonal_ratio", type=float, default=1.0, help="RegMean α: off-diagonal Gram entries × α (grid none)")
    parser.add_argument("--param_value_mask_rate", type=float, default=0.8, help="TIES trim fraction (keep the top 1 − r of |δ|) (grid none)")
    parser.add_argument("--norm_mode", choices=["linear", "power", "exp"], default="exp", help="norm_adaptive weights from the task vectors' L2 norms (grid none)")
    parser.add_argument("--norm_alpha", type=float, default=1.5, help="norm_adaptive power exponent α (grid none)")
    parser.add_argument("--norm_beta", type=float, default=1.0, help="norm_adaptive exp rate β (grid none)")
    add_dare_arguments(parser)
    parser.add_argument("--mask_apply_method", default="average_merging", choices=(*BASE_METHODS, *extra), help="method applied after DARE in mask_merging")
    parser.add_argument("--mask_apply_methods", nargs="+", default=None, choices=(*BASE_METHODS, *extra), metavar="METHOD",
                        help="mask_merging with each of these methods in turn, from one load of the data (replaces --mask_apply_method)")
    parser.add_argument("--mask_merging_search", default="per_task", choices=MASK_SEARCHES,
                        help="mask_merging: per_task (the original) searches the drop rate on each task's own winning setting of the "
                             "apply method; wide lets every task choose among all the apply method's winning settings × rates")
    parser.add_argument("--merge_grid", default="paper", help="grid of configs/glue.yaml merge_grids (paper, small, ...) or none (= the flags)")
    parser.add_argument("--select_on", choices=["validation", "test"], default="validation", help="split the grid is searched on (test = the original protocol)")
    parser.add_argument("--batch_size", type=int, default=config["training"]["batch_size"], help="evaluation and statistics batch size")
    parser.add_argument("--seed", type=int, default=merging["seed"], help="seed of the DARE masks and of the Fisher/RegMean example order; the examples depend only on "
                        "(seed, count), so a setting re-run alone reproduces its grid result")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run the whole search once per seed (instead of --seed), loading data and models once (e.g. DARE mask seeds)")
    parser.add_argument("--learning_rate", type=float, default=None, help="learning rate in the checkpoint names (default: the config's table)")
    parser.add_argument("--max_seq_length", type=int, default=config["training"]["max_seq_length"], help="truncation length in tokens")
    parser.add_argument("--max_train_samples", type=int, default=None, help="use only the first N train examples for statistics")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="use only the first N examples of validation and test")
    parser.add_argument("--eval_batch_size", type=int, default=None, help="evaluation batch size (default: --batch_size; the statistics keep --batch_size, "
                        "which the Fisher depends on)")
    parser.add_argument("--max_validation_samples", type=int, default=None, help="use only the first N examples of validation (overrides --max_eval_samples there)")
    parser.add_argument("--winners", choices=WINNERS, default="all",
                        help="all: select the mean's winner and each task's own (the original); mean: only the mean's (one merged model for every task)")
    parser.add_argument("--ties_trim", default=merging["ties_trim"], choices=["global", "per_tensor"], help="TIES trim over the whole model (MergeLM GLUE) or per tensor")
    parser.add_argument("--ties_normalize", default=merging["ties_normalize"], choices=["count", "weights"], help="TIES disjoint-mean divisor")
    add_run_arguments(parser, save_dir_help="root of save_models/ (input) and save_merge_results/ (output)")
    return parser


def options_from_args(args: argparse.Namespace, groups: list[list[str]]) -> MergeRunOptions:
    from utils.glue.search import FlagSetting, MergeRunOptions, MethodOptions  # torch loads after parsing

    return MergeRunOptions(
        language_model_name=args.language_model_name, groups=tuple(tuple(group) for group in groups),
        method=args.merging_method_name, apply_method=args.mask_apply_method, grid=args.merge_grid, select_on=args.select_on,
        dare=dare_options_from_args(args),
        flag_setting=FlagSetting(args.scaling_coefficient, args.param_value_mask_rate, args.nums_fisher_examples,
                                 args.fisher_scaling_coefficients, args.nums_regmean_examples, args.reduce_non_diagonal_ratio,
                                 args.norm_mode, args.norm_alpha, args.norm_beta),
        methods=MethodOptions(args.ties_trim, args.ties_normalize, args.normalize_fisher_weight, args.minimal_fisher_weight),
        seed=args.seed, learning_rate=args.learning_rate, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, glue_dir=args.glue_dir,
        save_dir=args.save_dir, allow_pickle=args.allow_pickle, progress=not args.no_progress,
        flags={**vars(args), "progress": not args.no_progress}, mask_search=args.mask_merging_search,
        max_validation_samples=args.max_validation_samples, winners=args.winners, eval_batch_size=args.eval_batch_size,
        seeds=tuple(args.seeds) if args.seeds else None,
        batch_methods=tuple(args.merging_method_names or args.mask_apply_methods or ()) or None,
    )


def main(argv=None) -> list[dict]:
    config = config_from_argv(argv)
    parser = build_parser(config)
    args = parser.parse_args(argv)
    tasks = args.dataset_names or list(config["tasks"])
    check_tasks(parser, config, tasks)
    if len(set(tasks)) != len(tasks) or len(tasks) < 2:
        parser.error(f"--dataset_names needs at least two distinct tasks, got {tasks}")
    for name in ("max_validation_samples", "eval_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("merging_method_names", "mask_apply_methods"):
        values = getattr(args, name)
        if values is not None and len(set(values)) != len(values):
            parser.error(f"--{name} names a method twice: {' '.join(values)}")
    if args.mask_apply_methods is not None and args.merging_method_name != "mask_merging":
        parser.error("--mask_apply_methods needs --merging_method_name mask_merging")
    if args.merging_method_names is not None and args.merging_method_name == "mask_merging":
        parser.error("--merging_method_names replaces --merging_method_name; for DARE + several methods use --mask_apply_methods")
    precheck("merge_plms_glue.py", args, config)
    groups = [tasks] if args.dataset_names else [list(pair) for pair in itertools.combinations(tasks, 2)]
    options = options_from_args(args, groups)
    with user_errors():
        from utils.glue.search import run_merge_search

        return run_merge_search(options, config, resolve_device(args.device, args.gpu))


if __name__ == "__main__":
    main()
