#!/usr/bin/env bash
# Merge search on real MiniLM GLUE experts, at equal evaluation budgets (trials):
#   searched: ties and dare_ties with every expert's weight and density free (CMA-ES);
#   grids:    task arithmetic (one λ), ties (one λ × one density), della (one λ × one density).
# Selection on the validation split (10% of GLUE train), report on GLUE dev; comparison.md holds the table.
# Usage: scripts/glue_search_demo.sh SET OUT BASE GLUE_DIR BUDGET MAX_EVAL TASK=FOLDER...
#   SET: pair (mrpc + sst2) or glue6 (cola sst2 mrpc stsb rte qqp); BUDGET: trials per search (a square: the
#   2-D grids take sqrt(BUDGET) points per axis); MAX_EVAL: validation examples per task (first N).
#   Environment: MAX_REPORT (test examples per task, default all), POP (CMA-ES population, default 6 / 8).
set -euo pipefail
cd "$(dirname "$0")/.."
SET=$1; OUT=$2; BASE=$3; GLUE=$4; BUDGET=$5; MAXEVAL=$6; shift 6
EXPERTS=("$@")
TASKS=(); for e in "${EXPERTS[@]}"; do TASKS+=("${e%%=*}=1"); done
SIDE=$(python3 -c "import math; print(round(math.sqrt($BUDGET)))")
POP=${POP:-$([ "$SET" = glue6 ] && echo 8 || echo 6)}
common=(--experts "${EXPERTS[@]}" --var BASE="$BASE" --glue_dir "$GLUE" --fitness "${TASKS[@]}"
        --max_eval_samples "$MAXEVAL" --budget "$BUDGET" --seed 0)
[ -n "${MAX_REPORT:-}" ] && common+=(--max_report_samples "$MAX_REPORT")
run() { name=$1; shift; [ -f "$OUT/$name/search_result.json" ] && return 0
        .venv/bin/python search_merge.py --output_dir "$OUT/$name" "${common[@]}" "$@" \
          $([ -f "$OUT/$name/history.jsonl" ] && echo --resume) 2>&1 | grep -v "Warning\|it/s\]" ; }
run ta_grid --template configs/search/${SET}_ta_grid.yml --sampler grid --grid_points "$BUDGET"
run ties_grid --template configs/search/${SET}_ties_grid.yml --sampler grid --grid_points "$SIDE"
run della_grid --template configs/search/${SET}_della_grid.yml --sampler grid --grid_points "$SIDE"
run dare_ties_cma --template configs/search/${SET}_dare_ties.yml --popsize "$POP"
rm -f "$OUT/ties_cma/search_result.json"
run ties_cma --template configs/search/${SET}_ties.yml --popsize "$POP" \
    --compare "$OUT/dare_ties_cma" "$OUT/ta_grid" "$OUT/ties_grid" "$OUT/della_grid"
