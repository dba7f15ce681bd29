"""Evaluate a model folder (a merge, a fine-tune, a hub id) with lm-evaluation-harness, offline.

Tasks are lm-eval task names declared in configs/lm_eval/ (gsm8k_local, mbpp_local, humaneval_local,
gsm8k_answer_nll, mbpp_answer_nll) or in --include_path folders; --builtin_tasks adds lm-eval's own catalogue
(its data come from the hub). The result file save_lm_eval_results/<save_name>/summary.json is read by
scripts/aggregate_results.py into the same tables as the project's own scorers.

Example:
    python evaluate_lm_eval.py --model merged/ --tasks gsm8k_answer_nll gsm8k_local --num_fewshot 0 --limit 50 \
        --data_dir ../shared/data/math_code
"""
from __future__ import annotations

import argparse
import json
import sys

from utils.cli import HelpFormatter, run_entry


def key_values(text: str) -> dict:
    """lm_eval's ``--gen_kwargs`` form: ``k=v,k=v`` (numbers and booleans parsed), or a JSON object."""
    if text.strip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"not a JSON object: {error}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("must be a JSON object")
        return value
    result = {}
    for item in filter(None, text.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        result[key.strip()] = json.loads(raw) if raw.strip().lower() in ("true", "false") or _is_number(raw) else raw
    return result


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or hub id")
    parser.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names")
    parser.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (< 1: a fraction), as lm_eval")
    parser.add_argument("--apply_chat_template", nargs="?", const=True, default=False,
                        help="format prompts with the tokenizer's chat template (optionally its name)")
    parser.add_argument("--fewshot_as_multiturn", action="store_true", help="few-shot examples as chat turns")
    parser.add_argument("--gen_kwargs", type=key_values, default=None, help="generation settings: k=v,k=v or JSON")
    parser.add_argument("--batch_size", default="1", help="batch size, or 'auto'")
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's python, numpy, torch and few-shot seeds")
    parser.add_argument("--log_samples", action="store_true", help="also write every sample (samples_<task>.jsonl)")
    parser.add_argument("--include_path", action="append", default=[], help="more task folders (repeatable)")
    parser.add_argument("--builtin_tasks", action="store_true", help="index lm-eval's catalogue too (hub data)")
    parser.add_argument("--data_dir", default=None, help="GSM8K / MBPP files (default: $MATH_CODE_DATA_DIR, "
                                                         "else ./math_code_data)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="transformers or vLLM")
    parser.add_argument("--in_memory", action="store_true",
                        help="load the model with transformers and evaluate the resident module (lm-eval's HFLM)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: the checkpoint's)")
    parser.add_argument("--save_dir", default=".", help="where save_lm_eval_results/ goes")
    parser.add_argument("--save_name", default=None, help="result folder name (default: the model folder's name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.precheck import existing_folder, model_source, refused

    def check() -> None:
        model_source(args.model, "--model", "model folder")
        for folder in args.include_path:
            existing_folder(folder, "--include_path", "task folder")

    status = refused("evaluate_lm_eval.py", check)   # before torch loads
    if status is not None:
        return status
    from utils.lm_eval import LmEvalError, LmEvalJob, LmEvalOptions, run_lm_eval

    def work() -> int:
        batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
        options = LmEvalOptions(tasks=tuple(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit,
                                apply_chat_template=args.apply_chat_template,
                                fewshot_as_multiturn=args.fewshot_as_multiturn, gen_kwargs=args.gen_kwargs,
                                batch_size=batch, seed=args.seed, log_samples=args.log_samples,
                                include_paths=tuple(args.include_path), builtin_tasks=args.builtin_tasks,
                                data_dir=args.data_dir, backend=args.backend, device=args.device, dtype=args.dtype)
        path, record = run_lm_eval(LmEvalJob(args.model, options, args.save_dir, args.save_name, args.in_memory))
        for task, entry in record["tasks"].items():
            main = entry["main_metric"]
            print(f"{task}: {main} = {entry['metrics'].get(main)} ({entry['num_samples']} samples)")
        print(f"wrote {path}")
        return 0

    return run_entry("evaluate_lm_eval.py", work, (LmEvalError, FileNotFoundError), args.save_dir)


if __name__ == "__main__":
    sys.exit(main())
