#!/usr/bin/env bash
# The SmolLM2 section of docs/RESULTS.md end to end: SmolLM2-135M-Instruct learning word problems through vLLM
# rollouts, math-verify and the chat template (experiment=smollm2_math). Not part of CI: 32-41 min per run, two
# runs side by side on 2 cores.
#   bash scripts/smollm2_math.sh                 # NFT and RFT, seeds 0 and 1, two runs at a time
#   ALGORITHMS="nft rft grpo" SEEDS="0 1 2" PARALLEL=1 bash scripts/smollm2_math.sh [extra Hydra overrides]
#   SCREEN=1 bash scripts/smollm2_math.sh        # train on a fresh in-band screen instead of the committed one
# The runs train on the committed selection data/selections/smollm2_words/ (the in-band screen of docs/RESULTS.md),
# so every machine trains on the same questions; SCREEN=1 screens into .cache/nft-lit/band/words (once: delete
# the folder to screen again) and trains on that. Each run lives in outputs/smollm2_math/<algorithm>_s<seed>/ and
# resumes from its last checkpoint if stopped; a finished run (marked by this script with a FINISHED file) is
# skipped. The table and PNGs go to docs/results/smollm2_math/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One thread per run, two runs side by side; vLLM's CPU backend must not pin threads to cores that the other
# run (or anything else on a shared machine) uses: `nobind` was 10x faster here than its default binding.
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} VLLM_CPU_OMP_THREADS_BIND=nobind
# Pinned before any python starts, as scripts/demo.sh: MKL on its alignment-independent AVX2 path, and torch's
# own CPU kernels on AVX2 (they round differently on AVX-512 machines). vLLM's own CPU kernels are not pinned.
export MKL_CBWR=${MKL_CBWR:-AVX2,STRICT} ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=outputs/smollm2_math
selection=data/selections/smollm2_words
[ -d "$HOME/.cache/nft-lit/smollm2-135m-instruct" ] || .venv/bin/nft-lit convert-smollm2
if [ "${SCREEN:-0}" = 1 ]; then
    selection=.cache/nft-lit/band/words
    [ -f "$selection/selection.jsonl" ] || .venv/bin/python -m nft_lit.band --data synthetic_words --questions 256 \
        --samples 4 --max-new-tokens 128 --temperature 0.8 --heldout-fraction 0.4 --out "$selection"
fi

# Two runs side by side: size each vLLM engine to this run (prompts <= 58 tokens + 128 new; 32 answers per
# call, 29 x 4 held-out) instead of the model's 8192-token context, whose KV cache takes half the RAM per run.
engine=(rollout.max_model_len=512 rollout.max_num_seqs=128)

run() {  # algorithm seed [overrides...]
    local dir="$out/$1_s$2" resume=()
    if [ -f "$dir/FINISHED" ]; then echo "$dir: finished, skipped"; return; fi
    [ -f "$dir/checkpoints/last.ckpt" ] && resume=(ckpt_path=last)
    mkdir -p "$dir"
    .venv/bin/nft-lit fit experiment=smollm2_math "algorithm=$1" "seed=$2" "data.selection=$selection" \
        "hydra.run.dir=$dir" "${engine[@]}" "${resume[@]}" "${@:3}" >>"$dir/fit.log" 2>&1 \
        && { date -u >"$dir/FINISHED"; echo "$dir: done"; } || echo "$dir: FAILED (see $dir/fit.log)"
}

jobs=()
for seed in ${SEEDS:-0 1}; do for algorithm in ${ALGORITHMS:-nft rft}; do jobs+=("$algorithm $seed"); done; done
for job in "${jobs[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-2}" ]; do wait -n; done
    run $job "$@" &
done
wait
.venv/bin/nft-lit report $out/*_s* --out docs/results/smollm2_math
