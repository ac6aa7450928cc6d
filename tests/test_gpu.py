"""The GPU paths on one CUDA device: FSDP2 through ModelParallelStrategy (trainer=gpu_fsdp) and bf16-true
training, each through the same fit as the CPU tests, over NCCL. Skipped without CUDA (`pytest -m gpu`).

On one device FSDP2 shards nothing, so its fp32 loss curve must equal the plain single-GPU run; what it does
exercise is the DTensor wrapping, HF rollouts and old log-probs on the wrapped model, gradient clipping across
DTensors, NCCL collectives of the metrics and the distributed checkpoint format.
"""

import csv
import math

import pytest
import torch
from _rollout_fakes import PARITY_OVERRIDES
from test_cli import _nft_lit
from test_distributed import run_fit_script

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def single_gpu_fp32(tmp_path_factory) -> dict:
    return run_fit_script(tmp_path_factory.mktemp("gpu"), 1, accelerator="gpu", strategy="auto")


def test_fsdp2_matches_the_single_gpu_run(tmp_path, single_gpu_fp32):
    sharded = run_fit_script(tmp_path, 1, accelerator="gpu", strategy="fsdp2")
    print(f"single GPU {single_gpu_fp32['losses']}\nFSDP2 {sharded['losses']}")
    assert sharded["steps"] == single_gpu_fp32["steps"] == 6
    assert sharded["changed"] == 1.0 and sharded["sharded"] and not single_gpu_fp32["sharded"]
    assert any(abs(x) > 1e-6 for x in single_gpu_fp32["losses"][1:])
    for a, b in zip(single_gpu_fp32["losses"], sharded["losses"], strict=True):
        assert b == pytest.approx(a, abs=1e-4, rel=1e-3)


@pytest.mark.parametrize("strategy", ["auto", "fsdp2"])
def test_bf16_true_trains_in_bf16(tmp_path, strategy):
    run = run_fit_script(tmp_path, 1, accelerator="gpu", strategy=strategy, precision="bf16-true")
    print(f"bf16 {strategy}: {run['losses']}")
    assert run["dtypes"] == ["torch.bfloat16"]
    assert run["steps"] == 6 and all(math.isfinite(x) for x in run["losses"])
    assert run["changed"] >= 0.9  # bf16 rounding may swallow a tiny update to some tensor


TRAINER_CONFIGS = {
    "gpu": [],
    # as the paper configs run it: FSDP2 with activation checkpointing
    "gpu_fsdp": ["module.activation_checkpointing=true"],
}


@pytest.mark.parametrize("trainer", sorted(TRAINER_CONFIGS))
def test_nft_lit_fit_with_gpu_trainer_configs(tmp_path, trainer):
    """`nft-lit fit experiment=smoke trainer=<gpu config>` (parity rewards: mixed groups every iteration): HF
    rollouts, held-out evaluation and checkpoints."""
    run = tmp_path / "run"
    overrides = [f"trainer={trainer}", "trainer.devices=1", "iterations=2", "eval.every_n_iterations=2"]
    overrides += [f"hydra.run.dir={run}", *PARITY_OVERRIDES, *TRAINER_CONFIGS[trainer]]
    _nft_lit("fit", "experiment=smoke", *overrides)
    assert (run / "checkpoints" / "last.ckpt").exists()
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    gaps = [float(r["rollout/logprob_gap"]) for r in rows if r.get("rollout/logprob_gap")]
    print(f"{trainer}: losses {losses}, bf16 HF-engine log-prob gap {gaps}")
    assert losses and all(math.isfinite(x) for x in losses)
    assert gaps and all(math.isfinite(g) for g in gaps)
    assert any(r.get("val/heldout/avg@1") for r in rows)


def test_gpu_fsdp_sharded_checkpoint_resumes_and_exports(tmp_path):
    """trainer=gpu_fsdp's default sharded (DCP) checkpoints on one GPU: `ckpt_path=last` resumes from the
    folder, and `nft-lit export` consolidates it into an HF folder (tests/test_sharded_checkpoints.py does the
    same on 2 CPU processes)."""
    run = tmp_path / "run"
    base = ["experiment=smoke", "trainer=gpu_fsdp", "trainer.devices=1", *PARITY_OVERRIDES, f"hydra.run.dir={run}"]
    _nft_lit("fit", *base, "iterations=2")
    assert (run / "checkpoints" / "last.ckpt").is_dir()
    resumed = _nft_lit("fit", *base, "iterations=3", "ckpt_path=last")
    assert "resuming" in resumed.stderr + (run / "cli.log").read_text()
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    assert sorted({int(float(r["epoch"])) for r in rows if r.get("train/loss")}) == [0, 1, 2]
    _nft_lit("export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'hf'}")
    assert (tmp_path / "hf" / "config.json").is_file()
