#!/usr/bin/env bash
# The learning-rate pilot of the SmolLM2 comparison (docs/RESULTS.md, "SmolLM2: NFT, RFT and NFT without negatives"):
# every arm at every lr in LRS on seed 0, 30 iterations (scripts/smollm2_math.sh, the comparison's settings), then
# each run's final policy scored on a VALIDATION set: 64 questions of the word-problem generator's held-out split,
# which no run trains on and which the comparison's held-out score (the selection's held-out part, drawn from the
# generator's train split) never contains. Per arm, the lr with the best validation avg@4 is chosen (ties: the
# smaller lr); the table goes to $RESULTS/selection.md and selection.csv. The algorithms are piloted, not the arms:
# NFT without negatives (nft_no_neg) runs at NFT's lr, as the demo protocol's lambda arms run at NFT's stage-1 lr.
#   bash scripts/smollm2_pilot.sh                          # nft and rft at lr 5e-6 and 1e-5, one run at a time
#   PARALLEL=2 LRS="2e-6 5e-6 1e-5" ARMS="nft rft grpo" bash scripts/smollm2_pilot.sh
# Runs live in $OUT/lr<lr>/<arm>_s0/ (default outputs/smollm2_pilot); finished runs and scored runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/smollm2_pilot}
results=${RESULTS:-docs/results/smollm2_pilot}
lrs=${LRS:-5e-6 1e-5}
arms=${ARMS:-nft rft}
validation='+eval.heldout={_target_:nft_lit.word_problems.word_problems,split:heldout,size:64,seed:0,operations:["+","-"],max_operand:10,heldout_fraction:0.1}'

for lr in $lrs; do  # one lr after the other; PARALLEL runs of one lr side by side
    OUT="$out/lr$lr" ARMS="$arms" SEEDS=0 PARALLEL=${PARALLEL:-1} RESULTS="$results/lr$lr" \
        bash scripts/smollm2_math.sh iterations=30 eval.every_n_iterations=15 "module.lr=$lr"
done

# The same environment as the runs (scripts/smollm2_math.sh exports it for its own children only).
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} VLLM_CPU_OMP_THREADS_BIND=nobind
export MKL_CBWR=${MKL_CBWR:-AVX2,STRICT} ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
for lr in $lrs; do for arm in $arms; do
    run="$out/lr$lr/${arm}_s0"
    [ -f "$run/FINISHED" ] || { echo "$run did not finish: no lr chosen" >&2; exit 1; }
    compgen -G "$run/validate/*/validate.json" >/dev/null && continue  # scored before
    # pointed at the run's folder, validate writes into <run>/validate/<time>/ (never a run of its own to `report`)
    .venv/bin/nft-lit validate experiment=smollm2_math "ckpt_path=$run/checkpoints/last.ckpt" '~eval.heldout' "$validation" \
        eval.name=validation rollout.max_model_len=512 rollout.max_num_seqs=128 "hydra.run.dir=$run" \
        >"$run/validation.log" 2>&1 || { echo "validation of $run failed: $run/validation.log" >&2; exit 1; }
done; done

.venv/bin/python - "$out" "$results" "$lrs" "$arms" <<'PY'
import json, sys
from pathlib import Path

out, results, lrs, arms = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
def validation(run: Path) -> float:  # the newest scoring of the run's final policy
    newest = sorted(run.glob("validate/*/validate.json"))[-1]
    return json.loads(newest.read_text())["results"]["validation/avg@4"]


score = {(arm, lr): validation(out / f"lr{lr}" / f"{arm}_s0") for arm in arms for lr in lrs}
chosen = {arm: max(lrs, key=lambda lr: (score[arm, lr], -float(lr))) for arm in arms}
lines = ["Validation avg@4 (%) after 30 iterations, seed 0; 64 questions x 4 answers of the word-problem generator's "
         "held-out split. Chosen per arm: the best (ties: the smaller lr).", "",
         "| arm | " + " | ".join(f"lr {lr}" for lr in lrs) + " | chosen |", "|---|" + "---|" * (len(lrs) + 1)]
lines += [f"| {arm} | " + " | ".join(f"{100 * score[arm, lr]:.1f}" for lr in lrs) + f" | {chosen[arm]} |" for arm in arms]
results.mkdir(parents=True, exist_ok=True)
(results / "selection.md").write_text("\n".join(lines) + "\n")
(results / "selection.csv").write_text("arm,lr,validation_avg4,chosen\n" + "".join(
    f"{arm},{lr},{score[arm, lr]:.4f},{int(chosen[arm] == lr)}\n" for arm in arms for lr in lrs))
print("\n".join(lines))
PY
