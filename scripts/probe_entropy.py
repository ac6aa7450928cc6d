"""The probe-set entropy (``evaluation.ProbeEntropy``, ``val/probe/entropy``) of finished runs, after the fact:
the base policy and each run's final checkpoint, on the demo's probe (the first N held-out problems' gold
answers, teacher-forced at the sampling temperature). For runs made before the probe was logged during ``fit``.

    .venv/bin/python scripts/probe_entropy.py multirun/negatives_cpu --out docs/results/negatives_cpu/probe.csv

Prints and writes one row per run (its overrides, base and final probe entropy); the base is measured once.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from nft_lit.compose import CONFIG_DIR, instantiate_node, load_policy
from nft_lit.evaluation import ProbeEntropy
from nft_lit.models import load_model
from nft_lit.runs import read_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a folder of run folders (each with checkpoints/last.ckpt)")
    parser.add_argument("--experiment", default="demo", help="the experiment whose held-out set and prompt to use")
    parser.add_argument("--size", type=int, default=64, help="probe problems (eval.probe_size)")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    args = parser.parse_args(argv)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=.", f"experiment={args.experiment}"])
    tokenizer = instantiate_node(cfg.tokenizer)
    problems = list(instantiate_node(cfg.eval.heldout))[: args.size]
    probe = ProbeEntropy(problems, tokenizer, instantiate_node(cfg.prompt), float(cfg.sampling.temperature))
    base = probe.run(load_model(instantiate_node(cfg.model), tokenizer))
    rows = []
    for run in sorted(p for p in args.sweep.iterdir() if (p / "checkpoints" / "last.ckpt").exists()):
        last = run / "checkpoints" / "last.ckpt"
        module, _ = load_policy(str(last))
        done = int(read_checkpoint(last)["epoch"]) + 1
        rows.append({"run": run.name, "iterations": done, "base": base, "final": probe.run(module.model)})
        print(f"{run.name}: {base:.4f} -> {rows[-1]['final']:.4f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["run", "iterations", "base", "final"])
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
