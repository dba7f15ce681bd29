#!/usr/bin/env bash
# The paper's LLM experiments in miniature (scripts/llm_miniature.py --help): resumable; --tiny for a quick check.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/llm_miniature.py "$@"
