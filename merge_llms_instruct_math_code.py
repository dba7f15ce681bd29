r"""Merge 2-3 fine-tuned LLMs of one backbone (streaming, low memory), then evaluate the merged model.

The paper's commands run unchanged, e.g.
    python merge_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name mask_merging \
        --use_weight_rescale --weight_mask_rate 0.2 --mask_apply_method task_arithmetic --tensor_parallel_size 1

Methods (θ_k fine-tuned, δ_k = θ_k − θ_pre, K models, λ = --scaling_coefficient):
  average_merging  θ = (1/K) Σ_k θ_k
  task_arithmetic  θ = θ_pre + λ Σ_k δ_k
  ties_merging     θ = θ_pre + λ · disjoint-mean(elect-sign(trim(δ_k))), trim keeps the top
                   (1 − --param_value_mask_rate) |δ| of each tensor (per-tensor, as the paper's LLM TIES)
  mask_merging     DARE first, δ_k ← δ_k ⊙ (1 − m_k) / (1 − p), m_k ~ Bernoulli(p), then --mask_apply_method
Models: --merge_instruct / --merge_math / --merge_code pick the paper's WizardLM-13B-V1.2,
WizardMath-13B-V1.0 and llama-2-13b-code-alpaca (backbone Llama-2-13b-hf); --models_to_merge with
--pretrained_model_name takes any folders or hub ids. The merged checkpoint is written once to
<save_dir>/save_merge_models/<tasks>/<save_name> (deleted after evaluation unless --keep_model) and
evaluated on each task's benchmarks (instruct: AlpacaEval; math: GSM8K, MATH; code: HumanEval, MBPP),
each task in a child process when the backend is vLLM (one engine per process). --evaluate_only FOLDER
evaluates an already merged folder in this process (the original's direct_inference script).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.cli import HelpFormatter
from utils.llm.cli import add_merge_arguments, merge_run, precheck
from utils.llm.pipeline import run_merge, run_with_exit_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_merge_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    run = merge_run(args, child_command=[sys.executable, str(Path(__file__).resolve()), *argv])   # flag checks first
    status = precheck("merge_llms_instruct_math_code.py", args, [*(args.models_to_merge or []), args.pretrained_model_name],
                      list(args.datasets or []))   # then models and data, before torch loads
    if status is not None:
        return status
    return run_with_exit_status(run_merge, run)


if __name__ == "__main__":
    sys.exit(main())
