#!/usr/bin/env bash
# The DARE paper's LLM merges (WizardLM-13B-V1.2 = instruct, WizardMath-13B-V1.0 = math,
# llama-2-13b-code-alpaca = code; backbone Llama-2-13b-hf), for GPU machines with vLLM installed.
# Merging streams tensors on the CPU (a few GB of RAM, not the ~750 GB of the original); each task is
# then evaluated in its own child process, so TENSOR_PARALLEL_SIZE GPUs suffice (not K x TP).
#
#   bash scripts/llm_paper_merge.sh readme   # README examples: LM & Math with average, TA, DARE + average
#   bash scripts/llm_paper_merge.sh table1   # the settings the author gave for Table 1 (issues #6, #21, #39)
#   bash scripts/llm_paper_merge.sh ties     # TIES-Merging +/- DARE grid (issue #39 ranges)
#   bash scripts/llm_paper_merge.sh all
#
# MODEL_DIR (default ./models) holds <name> folders (else the hub is used); DATA_DIR, ALPACA_EVAL_PATH,
# SAVE_DIR as in llm_paper_inference.sh. The author selected hyperparameters on a 10% sample of each
# benchmark (issue #44); --start_index/--end_index give contiguous slices only.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
TP=${TENSOR_PARALLEL_SIZE:-1}
LAMBDAS=${LAMBDAS:-"0.5 0.6 0.7 0.8 0.9 1.0"}
RETAIN=${RETAIN:-"0.5 0.7 0.9"}
RATES=${RATES:-"0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9"}
COMMON=(--tensor_parallel_size "$TP" --model_dir "${MODEL_DIR:-models}" --data_dir "${DATA_DIR:-math_code_data}"
        --save_dir "${SAVE_DIR:-.}")

run() { echo "+ $PYTHON merge_llms_instruct_math_code.py $*"; "$PYTHON" merge_llms_instruct_math_code.py "$@" "${COMMON[@]}"; }

readme() {
    run --merge_instruct --merge_math --merging_method_name average_merging
    run --merge_instruct --merge_math --merging_method_name task_arithmetic --scaling_coefficient 1.0
    run --merge_instruct --merge_math --merging_method_name mask_merging --use_weight_rescale --weight_mask_rate 0.2 \
        --mask_apply_method average_merging
}

table1() {
    # LM & Math & Code (issue #21): average; TA λ 1.0; DARE + average p 0.5; DARE + TA p 0.1 λ 1.0.
    run --merge_instruct --merge_math --merge_code --merging_method_name average_merging
    run --merge_instruct --merge_math --merge_code --merging_method_name task_arithmetic --scaling_coefficient 1.0
    run --merge_instruct --merge_math --merge_code --merging_method_name mask_merging --use_weight_rescale \
        --weight_mask_rate 0.5 --mask_apply_method average_merging
    run --merge_instruct --merge_math --merge_code --merging_method_name mask_merging --use_weight_rescale \
        --weight_mask_rate 0.1 --mask_apply_method task_arithmetic --scaling_coefficient 1.0
    # LM & Code DARE + TA p 0.3 λ 1.0 (issue #6).
    run --merge_instruct --merge_code --merging_method_name mask_merging --use_weight_rescale --weight_mask_rate 0.3 \
        --mask_apply_method task_arithmetic --scaling_coefficient 1.0
    # Best TA + DARE settings per cell (issue #39): "tasks λ p" (each cell of a row may use its own setting).
    local cells=("instruct math:1.0:0.2" "instruct math:0.5:0.6" "instruct code:0.5:0.4" "math code:1.0:0.5"
                 "math code:0.5:0.9" "instruct math code:0.5:0.5")
    for cell in "${cells[@]}"; do
        IFS=: read -r tasks lambda rate <<< "$cell"
        local flags=()
        for task in $tasks; do flags+=("--merge_$task"); done
        run "${flags[@]}" --merging_method_name mask_merging --use_weight_rescale --weight_mask_rate "$rate" \
            --mask_apply_method task_arithmetic --scaling_coefficient "$lambda"
    done
}

ties() {
    # TIES keeps the top `retain` fraction of each delta tensor: --param_value_mask_rate = 1 - retain.
    for lambda in $LAMBDAS; do
        for retain in $RETAIN; do
            local trim
            trim=$(awk -v r="$retain" 'BEGIN { printf "%.1f", 1 - r }')
            run --merge_instruct --merge_math --merge_code --merging_method_name ties_merging \
                --scaling_coefficient "$lambda" --param_value_mask_rate "$trim"
            for rate in $RATES; do
                run --merge_instruct --merge_math --merge_code --merging_method_name mask_merging \
                    --mask_apply_method ties_merging --use_weight_rescale --weight_mask_rate "$rate" \
                    --scaling_coefficient "$lambda" --param_value_mask_rate "$trim"
            done
        done
    done
}

case "${1:-readme}" in
    readme) readme ;;
    table1) table1 ;;
    ties) ties ;;
    all) readme; table1; ties ;;
    *) echo "usage: $0 [readme|table1|ties|all]" >&2; exit 2 ;;
esac
