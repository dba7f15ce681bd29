#!/usr/bin/env bash
# The paper's single-model drop experiments on GLUE (MergeLM inference_plms_glue.py): for each model,
# the fine-tuned checkpoints of the eight tasks evaluated on GLUE dev after
#   DARE (random drop + rescale), DropOnly (no rescale), magnitude pruning, dropping fine-tuned weights,
# at p in {0.0, 0.1, ..., 0.9, 0.99}. Needs save_models/ from scripts/glue_paper_train.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
for model in bert-base-uncased roberta-base; do
  "$PYTHON" inference_plms_glue.py --language_model_name "$model" --weight_mask_rate 0.0 "$@"
  for p in 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 0.99; do
    "$PYTHON" inference_plms_glue.py --language_model_name "$model" --weight_mask_rate "$p" --use_weight_rescale "$@"
    "$PYTHON" inference_plms_glue.py --language_model_name "$model" --weight_mask_rate "$p" "$@"
    "$PYTHON" inference_plms_glue.py --language_model_name "$model" --weight_mask_rate "$p" --mask_strategy magnitude "$@"
    "$PYTHON" inference_plms_glue.py --language_model_name "$model" --weight_mask_rate "$p" --use_weight_rescale --weight_format finetuned_weight "$@"
  done
done
