"""Search a merge recipe template's free parameters (weights, densities, DARE rates, gradient points, method)
with CMA-ES or a grid, merging into a resident model and evaluating it in memory.

Fitness = Σ weight · metric on the selection split (validation); the best trial is reported on the held-out
split (GLUE dev). Outputs in --output_dir: history.jsonl (one line per trial; --resume continues it),
best_recipe.yml, history.png, search_result.json, and with --compare a table of this search against others
(e.g. grid-searched baselines at the same number of trials): comparison.md.

Example (two MiniLM GLUE experts, TIES weights and densities, 30 trials):
    python search_merge.py --template configs/search/pair_ties.yml --var BASE=all-MiniLM-L6-v2 \
        --experts mrpc=ckpt/mrpc sst2=ckpt/sst2 --fitness mrpc=1 sst2=1 --budget 30 --output_dir search/ties_cma
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model_merging_methods.options import DEFAULT_TIE_ORDER, TIE_ORDERS
from utils.cli import HelpFormatter, run_entry


def assignments(values: list[str], what: str) -> dict[str, str]:
    from utils.precheck import InputError

    result = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep or not key or not path:
            raise InputError(f"{what}: expected NAME=VALUE, got {value!r}")
        result[key] = path
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--template", required=True, help="recipe template (YAML with free: parameters)")
    parser.add_argument("--output_dir", required=True, help="folder of the history and results")
    parser.add_argument("--fitness", nargs="+", required=True, help="TASK[:METRIC]=WEIGHT terms (METRIC: main)")
    parser.add_argument("--evaluator", choices=["glue", "lm_eval"], default="glue", help="what judges a merge")
    parser.add_argument("--experts", nargs="+", default=[], help="glue: TASK=FOLDER of each task's fine-tuned model")
    parser.add_argument("--glue_dir", default=None, help="glue: the GLUE files (default: configs/glue.yaml's)")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="glue: first N of each validation split")
    parser.add_argument("--max_report_samples", type=int, default=None, help="glue: first N of each test split")
    parser.add_argument("--batch_size", type=int, default=64, help="glue: evaluation batch size")
    parser.add_argument("--max_seq_length", type=int, default=128, help="glue: tokens per example")
    parser.add_argument("--model", default=None, help="lm_eval: the resident model's folder (e.g. the base)")
    parser.add_argument("--lm_eval_tasks", nargs="+", default=[], help="lm_eval: tasks on the selection split")
    parser.add_argument("--lm_eval_report_tasks", nargs="+", default=None,
                        help="lm_eval: tasks on the report split (default: the selection tasks)")
    parser.add_argument("--limit", type=float, default=None, help="lm_eval: examples per task")
    parser.add_argument("--num_fewshot", type=int, default=None, help="lm_eval: few-shot examples")
    parser.add_argument("--data_dir", default=None, help="lm_eval: GSM8K / MBPP files")
    parser.add_argument("--budget", type=int, default=20, help="number of trials")
    parser.add_argument("--sampler", choices=["cma", "grid"], default="cma", help="CMA-ES or a grid")
    parser.add_argument("--grid_points", type=int, default=3, help="grid: values per continuous dimension")
    parser.add_argument("--popsize", type=int, default=None, help="CMA-ES: candidates per generation")
    parser.add_argument("--sigma0", type=float, default=0.25, help="CMA-ES: initial step in [0, 1] units")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed and merge seed (DARE draws)")
    parser.add_argument("--workers", type=int, default=1, help="trials evaluated in parallel (each holds a model)")
    parser.add_argument("--launcher", choices=["local", "ray"], default="local", help="where parallel workers run")
    parser.add_argument("--tie_order", choices=TIE_ORDERS, default=DEFAULT_TIE_ORDER, help="rank cut-off ties")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--resume", action="store_true", help="continue the history in --output_dir")
    parser.add_argument("--var", nargs="+", default=[], help="NAME=VALUE for ${NAME} in the template (experts: ${TASK})")
    parser.add_argument("--compare", nargs="*", default=[], help="other searches' output folders for the table")
    return parser


def evaluator_spec(args):
    from utils.lm_eval import LmEvalOptions
    from utils.search import EvaluatorSpec, GlueEvalOptions, SearchError

    if args.evaluator == "glue":
        if not args.experts:
            raise SearchError("--evaluator glue needs --experts TASK=FOLDER ...")
        glue = GlueEvalOptions(args.glue_dir, args.max_eval_samples, args.max_report_samples, args.batch_size,
                               args.max_seq_length, args.device)
        return EvaluatorSpec("glue", experts=assignments(args.experts, "--experts"), glue=glue)
    if not args.model or not args.lm_eval_tasks:
        raise SearchError("--evaluator lm_eval needs --model and --lm_eval_tasks")
    common = dict(num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed, data_dir=args.data_dir,
                  device=args.device)
    return EvaluatorSpec("lm_eval", model=args.model, lm_eval={
        "validation": LmEvalOptions(tasks=tuple(args.lm_eval_tasks), **common),
        "test": LmEvalOptions(tasks=tuple(args.lm_eval_report_tasks or args.lm_eval_tasks), **common)})


def precheck(args: argparse.Namespace) -> int | None:
    """Refusals before torch loads: --experts / --var, the template (and that it instantiates to a recipe),
    an existing history without --resume, and a resumed history from another template or sampler."""
    from model_merging_methods import MergeError
    from utils.precheck import refused
    from utils.search.history import check_resume
    from utils.search.template import Template, TemplateError

    def check() -> None:
        variables = {**assignments(args.experts, "--experts"), **assignments(args.var, "--var")}
        template = Template.load(args.template, variables)
        template.recipe(template.space.values(template.space.start()))
        check_resume(Path(args.output_dir) / "history.jsonl",
                     {"template_sha256": template.fingerprint, "sampler": args.sampler}, args.resume)

    return refused("search_merge.py", check, (TemplateError, MergeError))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = precheck(args)   # refused before torch loads
    if status is not None:
        return status
    from utils.glue.data import GlueDataError
    from utils.lm_eval import LmEvalError
    from utils.recipes.schema import RecipeError
    from utils.search import FitnessError, SearchError, SearchOptions, Template, TemplateError

    def work() -> int:
        from utils.records import write_text_atomic
        from utils.search import comparison_table, parse_fitness, run_search

        variables = {**assignments(args.experts, "--experts"), **assignments(args.var, "--var")}
        template = Template.load(args.template, variables)
        options = SearchOptions(budget=args.budget, sampler=args.sampler, grid_points=args.grid_points,
                                popsize=args.popsize, sigma0=args.sigma0, seed=args.seed, workers=args.workers,
                                launcher=args.launcher, tie_order=args.tie_order)
        template.recipe(template.space.values(template.space.start()))   # the template instantiates to a recipe
        result = run_search(template, args.template, evaluator_spec(args), parse_fitness(args.fitness), options,
                            Path(args.output_dir), resume=args.resume, variables=variables)
        if args.compare:
            others = []
            for folder in args.compare:
                path = Path(folder) / "search_result.json"
                if not path.is_file():
                    raise SearchError(f"--compare {folder}: no search_result.json there")
                others.append(json.loads(path.read_text(encoding="utf-8")))
            names = [Path(args.output_dir).name, *[Path(f).name for f in args.compare]]
            table = comparison_table([result, *others], names)
            write_text_atomic(Path(args.output_dir) / "comparison.md", table)
            print(table)
        return 0

    errors = (TemplateError, FitnessError, SearchError, RecipeError, LmEvalError, GlueDataError, FileNotFoundError)
    return run_entry("search_merge.py", work, errors, args.output_dir)


if __name__ == "__main__":
    sys.exit(main())
