#!/usr/bin/env bash
# The README's main job, end to end on a CPU: set-up, SFT warm-up of the base policy (cached: re-runs
# reuse it), NFT online on 3-digit addition, then the before/after table and PNG curves.
#   bash scripts/demo.sh [extra Hydra overrides for `nft-lit fit`, e.g. seed=1 algorithm=grpo]
# Outputs: outputs/demo/<timestamp>/ (checkpoints, TensorBoard logs in tb/, metrics in csv/, report.md, *.png)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
# MKL's default path may round differently with the memory alignment of its inputs and with the CPU model;
# its conditional-reproducibility mode on the AVX2 path, strict (alignment-independent), makes the warm-up
# (hundreds of SFT steps) and the run repeatable at AVX2 speed (COMPATIBLE, used before, is ~4x slower).
export MKL_CBWR=${MKL_CBWR:-AVX2,STRICT}
# torch's own vectorised kernels round differently on AVX-512 and AVX2 machines; AVX2 is on every x86 one.
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
run_dir=${DEMO_RUN_DIR:-outputs/demo/$(date +%Y-%m-%d_%H-%M-%S)}
.venv/bin/nft-lit warmup --name demo ${DEMO_WARMUP_ARGS:-}
.venv/bin/nft-lit fit experiment=demo "hydra.run.dir=$run_dir" "$@"
.venv/bin/nft-lit report "$run_dir"
echo "TensorBoard: .venv/bin/tensorboard --logdir $run_dir/tb"
