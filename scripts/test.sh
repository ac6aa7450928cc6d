#!/usr/bin/env bash
# The README's test command: set up .venv if needed, lint, then the whole suite (vllm, slow,
# notebooks and distributed tests included; gpu tests skip themselves without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check src tests bench notebooks
.venv/bin/ruff format --check src tests bench
.venv/bin/python -m pytest "$@"
