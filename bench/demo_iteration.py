"""Where the demo's RL iteration spends its time: `nft-lit fit experiment=demo` per variant, phase by phase.

    .venv/bin/python bench/demo_iteration.py                      # 12 iterations per variant, 2 threads
    .venv/bin/python bench/demo_iteration.py --variants before,after,vllm --iterations 12
    .venv/bin/python bench/demo_iteration.py --quick              # harness check (tiny demo, own warm-up)

Each variant is one `nft-lit fit experiment=demo` in its own process on the cached warm-up base (`nft-lit
warmup` makes it; `--quick` makes a tiny one), with the held-out evaluation off, so an iteration is the RL
work alone. The run logs `seconds/<phase>` for every iteration (module.py, driver.py); this prints the
median of each phase over the warm iterations (the first pays start-up) and the whole run's wall time,
start-up included. Variants:

- ``before``: the settings of the main job before the throughput issue: MKL's COMPATIBLE reproducibility
  path and an old-log-prob pass over every optimizer step.
- ``after``: MKL's reproducible AVX2 path (``MKL_CBWR=AVX2,STRICT``, as scripts/demo.sh sets) and the first
  step's old log-probs taken from its training forward.
- ``vllm``: ``after`` with ``rollout=vllm`` (start-up of the engine included in the run's wall time).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import OFFLINE_ENV, meta, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("sync", "generate", "verify", "filter", "plan", "old_logprobs", "train", "iteration")
VARIANTS: dict[str, tuple[dict[str, str], list[str]]] = {
    "before": ({"MKL_CBWR": "COMPATIBLE"}, ["datamodule.old_logprobs_from_forward=false"]),
    "after": ({"MKL_CBWR": "AVX2,STRICT"}, []),
    "vllm": ({"MKL_CBWR": "AVX2,STRICT"}, ["rollout=vllm"]),
}
# --quick: a demo on 1-digit additions with a tiny warm-up, made on the fly (tests/test_bench.py)
QUICK_OVERRIDES = [
    "data.problems.digits=1",
    "data.problems.size=60",
    "sampling.max_new_tokens=3",
    "datamodule.prompts_per_step=8",
    "datamodule.gen_prompts_per_round=8",
    "datamodule.max_prompt_tokens=8",
]


def phase_medians(metrics_csv: Path) -> dict[str, Any]:
    """Median of each ``seconds/<phase>`` over the warm iterations (all but the first) of a run's CSV."""
    per_phase: dict[str, list[float]] = {p: [] for p in PHASES}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("seconds/iteration") or int(float(row["epoch"])) == 0:
                continue
            for p in PHASES:
                if row.get(f"seconds/{p}"):
                    per_phase[p].append(float(row[f"seconds/{p}"]))
    return {p: statistics.median(v) for p, v in per_phase.items() if v} | {
        "warm_iterations": len(per_phase["iteration"])
    }


def run_variant(name: str, iterations: int, threads: int, cache: Path, work: Path, quick: bool) -> dict[str, Any]:
    env_extra, overrides = VARIANTS[name]
    env = {
        **os.environ,
        **OFFLINE_ENV,
        **env_extra,
        "OMP_NUM_THREADS": str(threads),
        "ATEN_CPU_CAPABILITY": "avx2",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "NFT_LIT_CACHE": str(cache),
    }
    run_dir = work / name
    cmd = [
        sys.executable,
        "-m",
        "nft_lit.cli",
        "fit",
        "experiment=demo",
        f"iterations={iterations}",
        "eval.at_start=false",
        f"eval.every_n_iterations={iterations + 1}",
        f"checkpoint.every_n_iterations={iterations + 1}",
        *(QUICK_OVERRIDES if quick else []),
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"variant": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return {"variant": name, "wall_seconds": wall, **phase_medians(run_dir / "csv" / "metrics.csv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="before,after", help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2, help="OMP threads per run (scripts/demo.sh: 2)")
    parser.add_argument("--quick", action="store_true", help="tiny demo with its own tiny warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_iteration.json")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown or args.iterations < 2:
        raise SystemExit(f"--variants must name some of {list(VARIANTS)} and --iterations be >= 2")
    with tempfile.TemporaryDirectory(prefix="nft-lit-demo-iter-") as tmp:
        work = Path(tmp)
        cache = Path(os.environ.get("NFT_LIT_CACHE", ROOT / ".cache" / "nft-lit"))
        if args.quick:
            sys.path.insert(0, str(ROOT / "tests"))
            from fingerprint import tiny_warmup_config

            from nft_lit.demo.warmup import warmup

            cache = work / "cache"
            warmup(tiny_warmup_config(), cache / "warmup")
        elif not (cache / "warmup" / "demo" / "config.json").is_file():
            raise SystemExit(f"no demo base under {cache / 'warmup' / 'demo'}: run `.venv/bin/nft-lit warmup` first")
        rows = []
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows.append(run_variant(name, args.iterations, args.threads, cache, work, args.quick))
    base = next((r for r in rows if r["variant"] == "before" and "iteration" in r), None)
    for row in rows:
        if base is not None and "iteration" in row:
            row["speedup_vs_before"] = base["iteration"] / row["iteration"]
    print(f"demo iteration, median of warm iterations ({args.iterations} iterations, {args.threads} threads), seconds")
    print_table(
        rows,
        [("variant", "variant", "")]
        + [(p, p, ".3f") for p in PHASES]
        + [("wall_seconds", "run wall", ".1f"), ("speedup_vs_before", "x before", ".2f")],
    )
    for row in rows:
        if "error" in row:
            print(f"{row['variant']}: failed: {row['error']}")
    write_json(args.out, {"meta": meta(iterations=args.iterations, threads=args.threads), "rows": rows})


if __name__ == "__main__":
    main()
