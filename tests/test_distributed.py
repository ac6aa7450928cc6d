"""2-process CPU FSDP2 (ModelParallelStrategy + fully_shard) gives the 1-process loss curve at equal global batch.

The rollouts come from the rank-independent fake engine, so both runs train on identical data; any
difference would come from sharding, gradient reduction or the loss normalisation over ranks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
import lightning.pytorch as pl
import torch
sys.path.insert(0, sys.argv[3])
from _rollout_fakes import make_datamodule
from nft_lit.datamodule import ROLLOUT_TRAINER_SETTINGS
from nft_lit.losses import NFTLoss
from nft_lit.models import ModelSpec
from nft_lit.module import PolicyModule
from nft_lit.rollout.vllm_engine import _full_state_dict

world, out, accelerator, strategy_name, precision, compile = int(sys.argv[1]), sys.argv[2], *sys.argv[4:8]


def full_weights(module):  # a collective under FSDP2 (full_tensor): every rank calls it
    return {k: v.detach().float().cpu().clone() for k, v in _full_state_dict(module.model)}


class Recorder(pl.Callback):
    def __init__(self):
        self.losses = []
        self.metrics = []

    def on_train_start(self, trainer, pl_module):
        self.initial = full_weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs is not None:
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            logged = trainer.callback_metrics.items()
            self.metrics.append({k: float(v) for k, v in logged if k.startswith(("train/ratio/", "train/loss/"))})


spec = ModelSpec(tokenizer="char:0123456789+=", config=dict(hidden_size=64, num_layers=2, num_heads=2,
                 intermediate_size=64, seed=5))
module = PolicyModule(spec, NFTLoss(), lr=1e-2, warmup_steps=0, grad_clip=1.0, compile=compile == "compile")
dm = make_datamodule(prompts_per_step=4, gen_prompts_per_round=8, num_mini_batches=2, micro_batch_size=3)
if strategy_name == "fsdp2":  # FSDP2: fully_shard in PolicyModule.configure_model
    from lightning.pytorch.strategies import ModelParallelStrategy
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False,
                                     process_group_backend="gloo" if accelerator == "cpu" else None)
else:
    strategy = strategy_name
rec = Recorder()
trainer = pl.Trainer(accelerator=accelerator, devices=world, strategy=strategy, precision=precision, max_epochs=3,
                     **ROLLOUT_TRAINER_SETTINGS, limit_val_batches=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[rec])
trainer.fit(module, dm)
final, initial = full_weights(module), rec.initial
if trainer.global_rank == 0:
    json.dump({
        "losses": rec.losses,
        "metrics": rec.metrics,
        "steps": trainer.global_step,
        "sharded": any(type(p).__name__ == "DTensor" for p in module.model.parameters()),
        "dtypes": sorted({str(p.dtype) for p in module.model.parameters()}),
        "changed": sum(not torch.equal(final[k], initial[k]) for k in initial) / len(initial),
    }, open(out, "w"))
"""


def run_fit_script(
    tmp_path: Path,
    world: int,
    accelerator: str = "cpu",
    strategy: str | None = None,
    precision: str = "32-true",
    compile: bool = False,
) -> dict:
    """Three NFT iterations on fake rollouts; `strategy` auto or fsdp2 (the default on several ranks)."""
    strategy = strategy or ("fsdp2" if world > 1 else "auto")
    script = tmp_path / "dist_fit.py"
    script.write_text(SCRIPT)
    mode = "compile" if compile else "eager"
    out = tmp_path / f"{accelerator}_{strategy}_{precision}_{mode}_world{world}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(world), str(out), str(Path(__file__).parent), accelerator, strategy, precision, mode]
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tmp_path):
    one = run_fit_script(tmp_path, 1)
    two = run_fit_script(tmp_path, 2)
    assert two["sharded"] and not one["sharded"]
    assert one["changed"] == two["changed"] == 1.0
    assert one["steps"] == two["steps"] == 6
    assert len(one["losses"]) == len(two["losses"]) == 6
    assert any(abs(x) > 1e-6 for x in one["losses"][1:])
    print("1 process:", one["losses"], "\n2 processes:", two["losses"])
    for a, b in zip(one["losses"], two["losses"], strict=True):
        assert b == pytest.approx(a, abs=1e-4, rel=1e-3)
    # the loss's step metrics are reduced over ranks too: the same numbers from other micro-batch layouts
    keys = {"train/ratio/mean", "train/ratio/min", "train/ratio/max", "train/loss/positive", "train/loss/negative"}
    assert one["metrics"] and all(keys <= set(m) for m in one["metrics"] + two["metrics"])
    assert any(m["train/ratio/max"] > m["train/ratio/min"] + 1e-3 for m in one["metrics"])  # off-policy steps
    for a, b in zip(one["metrics"], two["metrics"], strict=True):
        assert {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, abs=1e-4, rel=1e-3)


@pytest.mark.distributed
@pytest.mark.slow
def test_compiled_forward_under_fsdp2_matches_eager_one_process(tmp_path):
    """module.compile=true composes with FSDP2's hooks: the same loss curve as the eager single process."""
    eager = run_fit_script(tmp_path, 1)
    compiled = run_fit_script(tmp_path, 2, compile=True)
    assert compiled["sharded"] and compiled["steps"] == eager["steps"] == 6
    for a, b in zip(eager["losses"], compiled["losses"], strict=True):
        assert b == pytest.approx(a, abs=1e-4, rel=1e-3)


@pytest.mark.distributed
@pytest.mark.slow
def test_nft_lit_fit_with_cpu_fsdp2_trainer_config(tmp_path):
    """`nft-lit fit trainer=cpu_fsdp2`: Lightning's launcher starts rank 1 from the same command line."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nft_lit.cli",
            "fit",
            "experiment=smoke",
            "trainer=cpu_fsdp2",
            "iterations=2",
            "eval.every_n_iterations=2",
            f"hydra.run.dir={run}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "MEMBER: 2/2" in proc.stderr + proc.stdout or (run / "train_ddp_process_1.log").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "rollout/pass_rate" in header and "val/heldout/avg@1" in header
