"""Evaluate fine-tuned GLUE checkpoints, optionally after DARE / DropOnly / magnitude pruning.

For each task: load save_models/<task>/<lm>_lr<lr> (lr from the config's table unless --learning_rate),
and if --weight_mask_rate p > 0 replace every non-head parameter by
  delta_weight:     θ' = θ_pre + M(θ_ft − θ_pre)      finetuned_weight:  θ' = M(θ_ft)
where M drops entries (random: Bernoulli(p) per entry; magnitude: the int(n·p) smallest |x| per tensor)
and, with --use_weight_rescale, divides the kept ones by (1 − p). DARE = random + rescale; DropOnly =
random without rescale. Heads (regex .*classifier.*) are left untouched. Masks are seeded by --seed.
Writes save_model_results/<task>/<name>/<name>.json, with the original's name:
  <lm>_lr<lr>_inference_mask_<p>[_rescale_<bool>][_strategy_magnitude][_weight_format_finetuned_weight][_seed<s>]
--weight_mask_rates / --seeds evaluate several rates / mask seeds of one variant from one load of the
weights; each (rate, seed) writes the file, with the config, of a call with that single rate and seed.
"""
from __future__ import annotations

import argparse

from utils.cli import HelpFormatter, add_dare_arguments, dare_options_from_args, drop_rate, resolve_device
from utils.glue.cli import add_run_arguments, check_tasks, config_from_argv, precheck, user_errors


def build_parser(config: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--language_model_name", default="roberta-base", help="pretrained encoder (hub id or folder): θ_pre and the checkpoint folder name")
    parser.add_argument("--dataset_names", nargs="+", default=list(config["tasks"]), help="tasks to evaluate")
    parser.add_argument("--batch_size", type=int, default=config["training"]["batch_size"], help="evaluation batch size")
    add_dare_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the DARE masks")
    parser.add_argument("--weight_mask_rates", type=drop_rate, nargs="+", default=None,
                        help="several drop rates evaluated from one load (replaces --weight_mask_rate)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="several mask seeds evaluated from one load (replaces --seed)")
    parser.add_argument("--learning_rate", type=float, default=None, help="learning rate in the checkpoint name (default: the config's table)")
    parser.add_argument("--eval_splits", nargs="+", choices=["validation", "test"], default=["test"], help="splits to evaluate (test = GLUE dev)")
    parser.add_argument("--max_seq_length", type=int, default=config["training"]["max_seq_length"], help="truncation length in tokens")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="use only the first N examples of each evaluated split")
    add_run_arguments(parser, save_dir_help="root of save_models/ (input) and save_model_results/ (output)")
    return parser


def options_from_args(args: argparse.Namespace) -> InferenceOptions:
    from utils.glue.inference import InferenceOptions  # torch loads only after parsing (fast --help)

    return InferenceOptions(
        language_model_name=args.language_model_name, tasks=tuple(args.dataset_names), dare=dare_options_from_args(args),
        seed=args.seed, eval_splits=tuple(args.eval_splits), learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_seq_length=args.max_seq_length, max_eval_samples=args.max_eval_samples, glue_dir=args.glue_dir,
        save_dir=args.save_dir, allow_pickle=args.allow_pickle, progress=not args.no_progress, flags=dict(vars(args)),
        batch_rates=tuple(args.weight_mask_rates) if args.weight_mask_rates else None,
        batch_seeds=tuple(args.seeds) if args.seeds else None, batch_flags=("weight_mask_rates", "seeds"),
    )


def main(argv=None) -> list[dict]:
    config = config_from_argv(argv)
    parser = build_parser(config)
    args = parser.parse_args(argv)
    check_tasks(parser, config, args.dataset_names)
    precheck("inference_plms_glue.py", args, config)   # before torch loads
    options = options_from_args(args)
    with user_errors():
        from utils.glue.inference import run_inference

        return run_inference(options, config, resolve_device(args.device, args.gpu))


if __name__ == "__main__":
    main()
