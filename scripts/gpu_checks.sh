#!/usr/bin/env bash
# Every GPU check in one go (about 10 min on an H200): the `gpu` tests (FSDP2/bf16 fits on one device over
# NCCL, trainer=gpu/gpu_fsdp fits, a sharded-checkpoint resume and export, ~3 min), bench/gpu_check.py (bf16
# step MFU, loss kernels, HF generation, ~1 min), its torch.compile variant (~1.5 min), then bench/gpu_loop.py (module.compile inside Trainer.fit, and token-budget vs fixed
# micro-batches at 512-8k long-tail lengths, ~3 min). Each stage has a timeout (300/120/150/300 s).
# Logs and JSON go to OUT_DIR; STAGES picks a subset (default "tests bench compile loop").
#
#   bash scripts/gpu_checks.sh [OUT_DIR]      # default bench/results
#
# It runs under the machine's own python3, which must hold torch (CUDA), lightning, transformers,
# torchmetrics, tensorboard and pytest. Pure-Python packages that machine lacks (hydra-core, omegaconf,
# antlr4 4.9.3, math-verify, jsonargparse) can come as wheels in .whl/ (docs/PERFORMANCE.md says how):
# they are installed into a private folder, nothing else is touched.
set -uo pipefail
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nft_lit_site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/nft_lit_site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_env.txt"
python3 -c "import sys, torch, lightning, transformers; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu_env.txt"
status=0
for stage in ${STAGES:-tests bench compile loop}; do
    case $stage in
    tests) timeout 300 python3 -m pytest -m gpu tests/test_gpu.py -v -s -p no:cacheprovider \
        --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" || status=1 ;;
    bench) timeout 120 python3 bench/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log" \
        || status=1 ;;
    compile) timeout 150 python3 bench/gpu_check.py --compile --micro-batches 8 --checkpointing off \
        --out "$out/gpu_check_compile.json" 2>&1 | tee "$out/gpu_check_compile.log" || status=1 ;;
    loop) timeout 300 python3 bench/gpu_loop.py --out "$out/gpu_loop.json" 2>&1 | tee "$out/gpu_loop.log" \
        || status=1 ;;
    *) echo "scripts/gpu_checks.sh: unknown stage '$stage' in STAGES (expected tests, bench, compile, loop)" >&2; exit 2 ;;
    esac
done
exit $status
