#!/usr/bin/env bash
# The fair comparison protocol on the CPU demo task, end to end and resumable (docs/RESULTS.md):
#   stage 1 (experiment=tune_lr_cpu): NFT and RFT at lr 3e-5, 1e-4, 3e-4, seeds 0 and 1, scored on a
#     VALIDATION split (disjoint from the test problems and from training); per algorithm, the lr with the best
#     mean over seeds of the validation accuracy at the last iteration is chosen (ties: the smaller lr);
#   stage 2 (experiment=negatives_cpu): NFT lambda in {0, 0.5, 1} at omega = 1 - r_hat, lambda in {0, 1} at
#     omega = 1, and RFT, then the default NFT at epsilon 0.1 and 2.0 (paper Fig. 10; its epsilon 1 is the
#     lambda 1 arm), seeds 0-4, each at its algorithm's stage-1 lr, scored on the 500 held-out TEST problems.
#   bash scripts/compare_protocol.sh                      # one run at a time
#   JOBS=2 nohup nice -n 19 bash scripts/compare_protocol.sh > /tmp/compare_protocol.log 2>&1 &
# Runs live in multirun/<stage>/<override_dirname>/ (the folders `nft-lit fit -m experiment=<stage>` makes); a
# run with a FINISHED file (written here when fit exits 0) or a checkpoint of its final iteration is skipped, a
# run with checkpoints/last.ckpt resumes from it (ckpt_path=last; the override is then dropped from the run's
# .hydra/overrides.yaml so that the report groups it with its seeds). Outputs per stage in docs/results/<stage>/:
# report.md and PNGs (`nft-lit report`), runs.csv (one row per fit: git commit, dirty file count, a hash of the
# uncommitted changes under src/ and configs/ (the changes themselves in worktree/<hash>.diff), start, end, exit
# status) and, for stage 1, selection.md / selection.csv (the chosen lr).
# Knobs (env): JOBS (runs side by side, default 1), SEEDS1 / SEEDS2, LRS (Hydra's spelling, as the folder names),
# ITERATIONS (default 200), OUT_ROOT (default multirun), RESULTS_ROOT (default docs/results), EXTRA (more Hydra
# overrides for every run, e.g. for a quick check; they do not enter the folder names).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/nft-lit ] || bash scripts/setup.sh
# One thread per run; MKL on its reproducible AVX2 path and torch's AVX2 kernels (as scripts/demo.sh): pinned,
# not inherited, so every run of the protocol rounds the same way whatever the caller's environment.
export OMP_NUM_THREADS=1 MKL_CBWR=AVX2,STRICT ATEN_CPU_CAPABILITY=avx2
export VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# This checkout's code, not the src/ the shared .venv was installed from (editable): a clone pinned at a commit and
# sharing another checkout's .venv would otherwise import that checkout's working tree, and runs.csv would name the
# wrong commit.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

JOBS=${JOBS:-1}
ITERATIONS=${ITERATIONS:-200}
OUT_ROOT=${OUT_ROOT:-multirun}
RESULTS_ROOT=${RESULTS_ROOT:-docs/results}
SEEDS1=${SEEDS1:-0 1}
SEEDS2=${SEEDS2:-0 1 2 3 4}
LRS=${LRS:-3e-05 0.0001 0.0003}   # = module.lr=3e-5,1e-4,3e-4 as Hydra's sweeper writes them
read -r -a extra <<<"${EXTRA:-}"
nft=.venv/bin/nft-lit

log() { echo "[$(date -u +%FT%TZ)] $*"; }

# The folder name Hydra's override_dirname gives these overrides: sorted, joined with ','.
dirname_of() { printf '%s\n' "$@" | LC_ALL=C sort | paste -sd, -; }

finished() {  # run folder
    [ -f "$1/FINISHED" ] && return 0
    compgen -G "$1/checkpoints/epoch=$((ITERATIONS - 1))-step=*.ckpt" >/dev/null
}

run() {  # stage override... : one `nft-lit fit` in OUT_ROOT/stage/<override_dirname>; never fails the script
    local stage=$1 dir resume=() rc=0 start end commit dirty
    shift
    dir="$OUT_ROOT/$stage/$(dirname_of "$@")"
    if finished "$dir"; then log "$dir: finished, skipped"; return 0; fi
    [ -f "$dir/checkpoints/last.ckpt" ] && resume=(ckpt_path=last)
    mkdir -p "$dir"
    commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    dirty=$(git status --short 2>/dev/null | wc -l)
    # what the run imports beyond the commit: uncommitted changes under src/ and configs/, saved once per content
    code=$({ git status --short -- src configs; git diff HEAD -- src configs; } 2>/dev/null | sha256sum | cut -c1-12)
    mkdir -p "$RESULTS_ROOT/$stage/worktree"
    [ -f "$RESULTS_ROOT/$stage/worktree/$code.diff" ] ||
        { git status --short -- src configs; git diff HEAD -- src configs; } >"$RESULTS_ROOT/$stage/worktree/$code.diff" 2>&1
    start=$(date -u +%FT%TZ)
    log "$dir: start${resume:+ (resume)}"
    # the folder name holds '=' and ',': quoted, or Hydra's override grammar reads a sweep
    "$nft" fit "experiment=$stage" "$@" "iterations=$ITERATIONS" "hydra.run.dir='$dir'" "${extra[@]}" "${resume[@]}" \
        >>"$dir/fit.log" 2>&1 || rc=$?
    end=$(date -u +%FT%TZ)
    if [ "$rc" -eq 0 ]; then
        echo "$end" >"$dir/FINISHED"
        # a resumed run's overrides carry ckpt_path=last; without it the report groups the run with its seeds
        [ -f "$dir/.hydra/overrides.yaml" ] && sed -i '/^- ckpt_path=last$/d' "$dir/.hydra/overrides.yaml"
        log "$dir: done"
    else
        log "$dir: FAILED (exit $rc, see $dir/fit.log)"
    fi
    # one short line per append: atomic under O_APPEND, so parallel runs do not interleave; the run's folder
    # name and MKL_CBWR hold commas, hence quoted
    echo "\"$(basename "$dir")\",$commit,$dirty,$code,$start,$end,$rc,${resume:+resumed},$OMP_NUM_THREADS,\"$MKL_CBWR\"" \
        >>"$RESULTS_ROOT/$stage/runs.csv"
}

stage_runs() {  # stage, then one line of overrides per run on stdin: runs them JOBS at a time
    local stage=$1 line
    mkdir -p "$RESULTS_ROOT/$stage"
    [ -s "$RESULTS_ROOT/$stage/runs.csv" ] ||
        echo "run,git_commit,git_dirty_files,worktree_diff,start_utc,end_utc,exit_status,resumed,omp_threads,mkl_cbwr" \
            >"$RESULTS_ROOT/$stage/runs.csv"
    while read -r line; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
        # shellcheck disable=SC2086  # one override per word
        run "$stage" $line </dev/null &
    done
    wait
}

log "commit $(git rev-parse HEAD), $(git status --short | wc -l) files differ from it; JOBS=$JOBS"
"$nft" warmup --name demo   # the base policy, cached in .cache/nft-lit/warmup/demo

# ---------------------------------------------------------------- stage 1: lr on the validation split
stage1=tune_lr_cpu
stage_runs $stage1 < <(
    for seed in $SEEDS1; do for lr in $LRS; do for algorithm in nft rft; do
        echo "algorithm=$algorithm module.lr=$lr seed=$seed"
    done; done; done
)

# The choice, and stage 1's report. `nft-lit report` reads val/heldout/avg@k only; stage 1 logs
# val/validation/avg@k, so it is reported here through nft_lit.report with that column (labelled "validation").
chosen=$(.venv/bin/python - "$OUT_ROOT/$stage1" "$RESULTS_ROOT/$stage1" "$ITERATIONS" "$SEEDS1" "$LRS" <<'PY'
import re, statistics, sys
from pathlib import Path

import pandas as pd
import yaml

sweep, out, iterations = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
seeds, lrs = sys.argv[4].split(), sys.argv[5].split()
col = "val/validation/avg@1"
rows, missing = [], []
for algorithm in ("nft", "rft"):
    for lr in lrs:
        finals = []
        for seed in seeds:
            run = sweep / f"algorithm={algorithm},module.lr={lr},seed={seed}"
            csv = run / "csv" / "metrics.csv"
            done = (run / "FINISHED").exists() or any((run / "checkpoints").glob(f"epoch={iterations - 1}-step=*.ckpt"))
            frame = pd.read_csv(csv) if done and csv.is_file() else None
            if frame is None or col not in frame:
                missing.append(str(run))
                continue
            evals = frame[frame[col].notna()]
            last_epoch = int(evals["epoch"].iloc[-1])
            if last_epoch != iterations - 1:
                missing.append(f"{run} (last validation after iteration {last_epoch + 1}, not {iterations})")
                continue
            finals.append(float(evals[col].iloc[-1]))
        if finals:
            mean = statistics.fmean(finals)
            std = statistics.stdev(finals) if len(finals) > 1 else 0.0
            rows.append((algorithm, lr, len(finals), mean, std, finals))
if missing:
    sys.exit("stage 1 incomplete, no lr chosen; missing or unfinished:\n  " + "\n  ".join(missing))
out.mkdir(parents=True, exist_ok=True)
best = {}
for algorithm, lr, n, mean, std, _ in rows:  # ties: the smaller lr
    key = (mean, -float(lr))
    if algorithm not in best or key > best[algorithm][0]:
        best[algorithm] = (key, lr)
lines = [
    f"Stage 1: validation avg@1 (%) after iteration {iterations} (eval.heldout: split=validation), mean ± std "
    f"over seeds {' '.join(seeds)}; chosen per algorithm: the best mean (ties: the smaller lr).",
    "",
    "| algorithm | lr | seeds | validation after (%) | per seed (%) | chosen |",
    "|---|---|---|---|---|---|",
]
with open(out / "selection.csv", "w") as f:
    f.write("algorithm,lr,seeds,validation_mean,validation_std,chosen\n")
    for algorithm, lr, n, mean, std, finals in rows:
        chosen = best[algorithm][1] == lr
        f.write(f"{algorithm},{lr},{n},{mean:.4f},{std:.4f},{int(chosen)}\n")
        per_seed = ", ".join(f"{100 * v:.1f}" for v in finals)
        lines.append(
            f"| {algorithm} | {lr} | {n} | {100 * mean:.1f} ± {100 * std:.1f} | {per_seed} | {'**yes**' if chosen else ''} |"
        )
(out / "selection.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines), file=sys.stderr)

try:  # the report's tables and curves, on the validation column
    import nft_lit.report as report

    report.HELDOUT = re.compile(r"^val/validation/avg@(\d+)$")
    metric, _ = report.CURVES["heldout_accuracy"]
    report.CURVES["heldout_accuracy"] = (metric, "validation accuracy (avg@k)")
    table, pngs = report.report([sweep], out)
    (out / "report.md").write_text((out / "report.md").read_text().replace("held-out", "validation"))
    if (out / "heldout_accuracy.png").exists():
        (out / "heldout_accuracy.png").replace(out / "validation_accuracy.png")
except Exception as error:  # the choice above does not depend on it
    print(f"stage 1 report not written: {error!r}", file=sys.stderr)
print(best["nft"][1], best["rft"][1])
PY
)
read -r lr_nft lr_rft <<<"$chosen"
log "stage 1 chose lr $lr_nft for NFT, $lr_rft for RFT ($RESULTS_ROOT/$stage1/selection.md)"

# ---------------------------------------------------------------- stage 2: the negative term, on the test split
stage2=negatives_cpu
# Arm by arm, the isolating pair first (lambda 1 vs 0 at the same omega = 1 - r_hat), so that a cut-short protocol
# still has whole seed sets for the comparisons that matter most.
stage_runs $stage2 < <(
    for arm in "dr_grpo 1" "dr_grpo 0" "rft" "dr_grpo 0.5" "uniform 1" "uniform 0" "eps 0.1" "eps 2.0"; do
        read -r omega lambda <<<"$arm"
        for seed in $SEEDS2; do
            if [[ $omega == rft ]]; then
                echo "algorithm=rft module.lr=$lr_rft seed=$seed"
            elif [[ $omega == eps ]]; then  # Fig. 10: the default NFT (lambda 1, omega 1 - r_hat) at another epsilon
                echo "algorithm=nft algorithm.loss.epsilon=$lambda module.lr=$lr_nft seed=$seed"
            else
                echo "algorithm=nft algorithm.loss.omega=$omega algorithm.loss.neg_weight=$lambda module.lr=$lr_nft seed=$seed"
            fi
        done
    done
)
"$nft" report "$OUT_ROOT/$stage2" --out "$RESULTS_ROOT/$stage2"
log "protocol done: $RESULTS_ROOT/$stage1/selection.md, $RESULTS_ROOT/$stage2/report.md"
