"""Cut-down README demo: tiny warm-up, 2 NFT iterations through `nft-lit fit experiment=demo`, report."""

import os
import subprocess
import sys

import pytest

from nft_lit.demo.warmup import warmup
from nft_lit.models import ModelSpec, load_model
from nft_lit.report import report

# ~10 s on an idle 2-core machine, ~50 s under load: below the 60 s bar for `slow`.


def test_cut_down_demo_produces_all_artefacts(tmp_path, tiny_warmup):
    base = warmup(
        tiny_warmup(name="demo"),
        tmp_path / "cache" / "warmup",
    )
    assert (base.path / "config.json").is_file() and (base.path / "model.safetensors").is_file()
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=demo",
        f"hydra.run.dir={run_dir}",
        "iterations=2",
        "data.problems.digits=1",
        "data.problems.size=60",
        "eval.heldout.digits=1",
        "eval.heldout.size=8",
        "eval.every_n_iterations=1",
        "sampling.max_new_tokens=3",
        "datamodule.prompts_per_step=8",
        "datamodule.gen_prompts_per_round=8",
        "datamodule.max_prompt_tokens=8",
        "checkpoint.every_n_iterations=1",
    ]
    # The demo's model path reads NFT_LIT_CACHE, as `nft-lit warmup` writes there.
    env = {**os.environ, "NFT_LIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "nft_lit.cli", "fit", *overrides], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    table, pngs = report([run_dir], run_dir)
    assert {p.name for p in pngs} == {
        "heldout_accuracy.png",
        "train_reward.png",
        "entropy.png",
        "response_length.png",
        "truncation.png",
        "logprob_gap.png",
    }
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert "held-out avg@1 before (%)" in table and "| nft | 1 |" in table
    # where the time goes: every phase the run logged, and the throughput
    header = next(line for line in table.splitlines() if line.startswith("| run | sync (s)"))
    for column in ("generate (s)", "old_logprobs (s)", "train (s)", "eval (s)", "iteration (s)", "train tok/s"):
        assert column in header, column
    assert (run_dir / "report.md").read_text().startswith(table)
    # The run started from the warmed-up folder, not a random init.
    assert load_model(ModelSpec(pretrained=str(base.path))).config.hidden_size == 64


def test_report_rejects_a_folder_without_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        report([tmp_path], tmp_path / "out")


def test_report_groups_seeds(tmp_path):
    import csv

    for seed, accs in ((0, (0.2, 0.5)), (1, (0.3, 0.7))):
        run = tmp_path / f"{seed}_seed={seed}"
        (run / ".hydra").mkdir(parents=True)
        (run / "csv").mkdir()
        (run / ".hydra" / "config.yaml").write_text(
            f"seed: {seed}\nalgorithm: {{name: nft}}\neval: {{at_start: true}}\n"
        )
        (run / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n- algorithm=nft\n")
        with open(run / "csv" / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["epoch", "step", "val/heldout/avg@4", "train/entropy", "seconds/generate", "rollout/logprob_gap"]
            )
            w.writerow([0, 0, accs[0], "", "", ""])
            w.writerow([0, 1, "", 0.4, "", 2e-6 * (1 + seed)])
            w.writerow([0, 2, "", 0.2, 1.0 + seed, ""])
            w.writerow([0, 2, accs[1], "", "", ""])
    table, pngs = report([tmp_path], tmp_path / "out")
    assert "| run | generate (s) |" in table.splitlines()  # only the phases the runs logged
    assert "held-out avg@4 before (%)" in table and "max log-prob gap |" in table  # the k the runs sampled
    assert "| nft | 1.5 |" in table  # median per run (1.0 and 2.0), mean over the seeds
    row = next(line for line in table.splitlines() if line.startswith("| nft |"))
    # before 25.0 ± 7.1, after 60.0 ± 14.1, gain 35.0 ± 7.1; entropy of iteration 1 = mean of its steps
    assert "| 2 | 25.0 ± 7.1 | 60.0 ± 14.1 | 35.0 ± 7.1 |" in row
    assert "0.300 → 0.300" in row
    assert row.endswith("| 4.0e-06 |")  # the largest gap of any iteration and seed
    # one row per run: every held-out point (iteration: %), and "–" for curves the run did not log
    assert "| nft | 0 | 0: 20.0, 1: 50.0 | – | – | – |" in table and "| nft | 1 | 0: 30.0, 1: 70.0 |" in table
    assert {"heldout_accuracy.png", "logprob_gap.png"} <= {p.name for p in pngs}


def test_report_says_when_no_evaluation_followed_training(tmp_path):
    """A run evaluated only before training has no 'after' and no gain (not a gain of 0.0)."""
    import csv

    run = tmp_path / "0_seed=0"
    (run / ".hydra").mkdir(parents=True)
    (run / "csv").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seed: 0\nalgorithm: {name: nft}\neval: {at_start: true}\n")
    with open(run / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "val/heldout/avg@1", "train/entropy"])
        w.writerow([0, 0, 0.25, ""])
        w.writerow([0, 1, "", 0.4])
    table, pngs = report([tmp_path], tmp_path / "out")
    row = next(line for line in table.splitlines() if line.startswith("| nft |"))
    assert "| 1 | 25.0 | – | – |" in row
    assert "no held-out evaluation after training" in table
    assert any(p.name == "heldout_accuracy.png" for p in pngs)
