r"""Evaluate one fine-tuned LLM, optionally after DARE, on AlpacaEval / GSM8K / MATH / HumanEval / MBPP.

The paper's command line runs unchanged, e.g.
    python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 \
        --tensor_parallel_size 1 --weight_mask_rate 0.9 --use_weight_rescale

With --weight_mask_rate p > 0 the streaming engine writes θ' = θ_pre + DARE(θ_ft − θ_pre) (or DARE(θ_ft)
with --weight_format finetuned_weight), DARE(x) = x ⊙ (1 − m) / (1 − p), m ~ Bernoulli(p) per entry
(no rescale without --use_weight_rescale; --mask_strategy magnitude drops the int(n·p) smallest |x|),
after the paper's vocabulary alignment (rows added for a pad token are set to the mean of the existing
rows). The checkpoint goes to <save_dir>/save_models/<dataset>/<save_name> and is removed after the
evaluation unless --keep_model. Unlike the original, --weight_mask_rate defaults to 0.0 (the model as is).
"""
from __future__ import annotations

import argparse
import sys

from utils.cli import HelpFormatter
from utils.llm.cli import add_inference_arguments, inference_run, precheck
from utils.llm.pipeline import run_inference, run_with_exit_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_inference_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = inference_run(args)   # flag checks first
    status = precheck("inference_llms_instruct_math_code.py", args, [args.finetuned_model_name, args.pretrained_model_name],
                      [args.dataset_name])   # then models and data, before torch loads
    if status is not None:
        return status
    return run_with_exit_status(run_inference, run)


if __name__ == "__main__":
    sys.exit(main())
