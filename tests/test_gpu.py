"""The GPU paths on one CUDA device: Lightning's FSDPStrategy (FSDP1), FSDP2 through ModelParallelStrategy, and
bf16-true training, each through the same fit as the CPU tests. Skipped without CUDA (`pytest -m gpu`).

On one device the sharded strategies shard nothing, so their fp32 loss curves must equal the plain single-GPU
run; what they do exercise is the wrapping, the gathered rollouts (HF generate and old log-probs outside the
training forward), gradient clipping through the wrapped model and the checkpoint formats.
"""

import csv
import math

import pytest
import torch
from test_cli import DATA, _nft_lit
from test_distributed import run_fit_script

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def single_gpu_fp32(tmp_path_factory) -> dict:
    return run_fit_script(tmp_path_factory.mktemp("gpu"), 1, accelerator="gpu", strategy="auto")


@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2"])
def test_fsdp_strategies_match_the_single_gpu_run(tmp_path, single_gpu_fp32, strategy):
    sharded = run_fit_script(tmp_path, 1, accelerator="gpu", strategy=strategy)
    print(f"single GPU {single_gpu_fp32['losses']}\n{strategy} {sharded['losses']}")
    assert sharded["steps"] == single_gpu_fp32["steps"] == 6
    assert sharded["changed"] == 1.0 and sharded["sharded"] == (strategy == "fsdp2")
    assert any(abs(x) > 1e-6 for x in single_gpu_fp32["losses"][1:])
    for a, b in zip(single_gpu_fp32["losses"], sharded["losses"], strict=True):
        assert b == pytest.approx(a, abs=1e-4, rel=1e-3)


@pytest.mark.parametrize("strategy", ["auto", "fsdp1", "fsdp2"])
def test_bf16_true_trains_in_bf16(tmp_path, strategy):
    run = run_fit_script(tmp_path, 1, accelerator="gpu", strategy=strategy, precision="bf16-true")
    print(f"bf16 {strategy}: {run['losses']}")
    assert run["dtypes"] == ["torch.bfloat16"]
    assert run["steps"] == 6 and all(math.isfinite(x) for x in run["losses"])
    assert run["changed"] >= 0.9  # bf16 rounding may swallow a tiny update to some tensor


TRAINER_CONFIGS = {
    "gpu": [],
    # the configured wrap unit is Qwen2's decoder layer; the smoke model is a Llama
    "gpu_fsdp": ["trainer.strategy.layer_class=transformers.models.llama.modeling_llama.LlamaDecoderLayer"],
    "gpu_fsdp2": [],
}


@pytest.mark.parametrize("trainer", sorted(TRAINER_CONFIGS))
def test_nft_lit_fit_with_gpu_trainer_configs(tmp_path, trainer):
    """`nft-lit fit experiment=smoke trainer=<gpu config>` (parity rewards: mixed groups every iteration): HF
    rollouts, held-out evaluation and checkpoints."""
    run = tmp_path / "run"
    overrides = [f"trainer={trainer}", "trainer.devices=1", "iterations=2", "eval.every_n_iterations=2"]
    _nft_lit("fit", "experiment=smoke", *overrides, f"hydra.run.dir={run}", *DATA, *TRAINER_CONFIGS[trainer])
    assert (run / "checkpoints" / "last.ckpt").exists()
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    gaps = [float(r["rollout/logprob_gap"]) for r in rows if r.get("rollout/logprob_gap")]
    print(f"{trainer}: losses {losses}, bf16 HF-engine log-prob gap {gaps}")
    assert losses and all(math.isfinite(x) for x in losses)
    assert gaps and all(math.isfinite(g) for g in gaps)
    assert any(r.get("val/heldout/avg@1") for r in rows)
