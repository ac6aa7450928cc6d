#!/usr/bin/env bash
# Regenerate the README figure (paper Fig. 4 analogue): execute notebooks/gradient_weights.ipynb headless
# (outputs are not saved into the notebook) and copy the PNG it writes to docs/figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/jupyter execute --kernel_name=python3 notebooks/gradient_weights.ipynb
mkdir -p docs/figures
cp notebooks/figures/gradient_weights/gradient_weights.png docs/figures/gradient_weights.png
echo "wrote docs/figures/gradient_weights.png"
