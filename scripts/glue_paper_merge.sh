#!/usr/bin/env bash
# The paper's GLUE merges (MergeLM merge_plms_glue.py): every pair of the eight tasks, five methods with
# the paper's grids (configs/glue.yaml merge_grids.paper), then DARE + each method (drop rate grid on top
# of the method's winner). Default protocol: select on the 10% validation split, report GLUE dev.
# Add --select_on test to reproduce the original protocol (selection on GLUE dev itself).
# Needs save_models/ from scripts/glue_paper_train.sh. Fisher merging as in the README example
# (--normalize_fisher_weight).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
for model in bert-base-uncased roberta-base; do
  for method in average_merging task_arithmetic fisher_merging regmean_merging ties_merging; do
    extra=()
    [ "$method" = fisher_merging ] && extra=(--normalize_fisher_weight)
    "$PYTHON" merge_plms_glue.py --language_model_name "$model" --merging_method_name "$method" "${extra[@]}" "$@"
    "$PYTHON" merge_plms_glue.py --language_model_name "$model" --merging_method_name mask_merging --mask_apply_method "$method" \
      --use_weight_rescale "${extra[@]}" "$@"
  done
done
