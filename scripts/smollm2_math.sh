#!/usr/bin/env bash
# The SmolLM2 sections of docs/RESULTS.md end to end: SmolLM2-135M-Instruct learning word problems through vLLM
# rollouts, math-verify and the chat template (experiment=smollm2_math). Not part of CI: ~80 s per iteration with
# one thread per run (docs/RESULTS.md has the profile).
#   bash scripts/smollm2_math.sh                 # NFT and RFT, seeds 0 and 1, two runs at a time (20 iterations)
#   ARMS="nft rft nft_no_neg" SEEDS="0 1 2" PARALLEL=1 OUT=outputs/smollm2_compare \
#       RESULTS=docs/results/smollm2_compare bash scripts/smollm2_math.sh iterations=30 eval.every_n_iterations=15
#                                                # the comparison of RESULTS.md (held-out at 0, 15 and 30)
#   SCREEN=1 bash scripts/smollm2_math.sh        # train on a fresh in-band screen instead of the committed one
# An arm is an algorithm config name (nft, rft, grpo, ...) or nft_no_neg: NFT with the negative term off
# (lambda = 0, algorithm.loss.neg_weight=0) at NFT's omega, which isolates what the negatives add.
# Arguments after the knobs are Hydra overrides for every run. The runs train on the committed selection
# data/selections/smollm2_words/ (the in-band screen of docs/RESULTS.md), so every machine trains on the same
# questions; SCREEN=1 screens into .cache/nft-lit/band/words (once: delete the folder to screen again) and trains
# on that. Each run lives in $OUT/<arm>_s<seed>/ (default outputs/smollm2_math) and resumes from its last checkpoint
# if stopped; a finished run (marked by this script with a FINISHED file) is skipped. The table and PNGs go to
# $RESULTS (default docs/results/smollm2_math).
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
# This checkout's code, not the src/ that a shared (editable) .venv was installed from.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-outputs/smollm2_math}
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

arm_overrides() {  # arm -> its Hydra overrides
    case $1 in
        nft_no_neg) echo "algorithm=nft algorithm.loss.neg_weight=0" ;;
        *) echo "algorithm=$1" ;;
    esac
}

run() {  # arm seed [overrides...]
    local dir="$out/$1_s$2" resume=() arm
    if [ -f "$dir/FINISHED" ]; then echo "$dir: finished, skipped"; return; fi
    [ -f "$dir/checkpoints/last.ckpt" ] && resume=(ckpt_path=last)
    mkdir -p "$dir"
    read -r -a arm <<<"$(arm_overrides "$1")"
    echo "$dir: start $(date -u +%FT%TZ)"  # the code it ran: $dir/provenance.jsonl (one line per launch)
    .venv/bin/nft-lit fit experiment=smollm2_math "${arm[@]}" "seed=$2" "data.selection=$selection" \
        "hydra.run.dir=$dir" "${engine[@]}" "${resume[@]}" "${@:3}" >>"$dir/fit.log" 2>&1 \
        && { date -u >"$dir/FINISHED"; echo "$dir: done $(date -u +%FT%TZ)"; } || echo "$dir: FAILED (see $dir/fit.log)"
}

jobs=()
for seed in ${SEEDS:-0 1}; do for arm in ${ARMS:-nft rft}; do jobs+=("$arm $seed"); done; done
for job in "${jobs[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-2}" ]; do wait -n; done
    run $job "$@" &
done
wait
.venv/bin/nft-lit report "$out"/*_s* --out "${RESULTS:-docs/results/smollm2_math}"
