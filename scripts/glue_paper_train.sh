#!/usr/bin/env bash
# The paper's GLUE fine-tuning (MergeLM): bert-base-uncased and roberta-base on the eight GLUE tasks,
# with the learning rates of configs/glue.yaml (the original's best-checkpoint table), batch size 16,
# 10 epochs, max length 128, 5 runs (only run 0 is used downstream). One GPU per command; run from the
# repository root. GLUE data: --glue_dir / GLUE_DIR (local files) or the hub dataset nyu-mll/glue.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
for model in bert-base-uncased roberta-base; do
  for task in cola sst2 mrpc stsb qqp mnli qnli rte; do
    "$PYTHON" train_plms_glue.py --dataset_name "$task" --language_model_name "$model" --num_runs 5 "$@"
  done
done
# Multitask reference of the paper's Figure 5 (shared encoder, one head per task), e.g.:
#   python train_plms_glue.py --multitask_training --auxiliary_dataset_name cola --dataset_name sst2 --language_model_name roberta-base --learning_rate 1e-5
