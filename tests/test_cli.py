"""The `nft-lit` commands end to end on the smoke experiment (subprocesses, like a user runs them)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _rollout_fakes import ITERATION_METRICS, PARITY_OVERRIDES

from nft_lit.cli import main

TESTS = Path(__file__).parent


def _nft_lit(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "nft_lit.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _scalars(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_usage_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "export", "cli", "verify", "convert-smollm2"):
        assert name in out
    assert main(["nope"]) == 2


@pytest.mark.slow
def test_fit_export_validate_on_smoke(tmp_path):
    run = tmp_path / "run"
    _nft_lit("fit", "experiment=smoke", "iterations=2", f"hydra.run.dir={run}", *PARITY_OVERRIDES)
    tags = _scalars(run / "tb")
    for tag in (*ITERATION_METRICS, "rollout/reward_mean", "seconds/eval", "val/heldout/avg@1"):
        assert tag in tags, tag
    assert "train/loss" in (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    out = tmp_path / "hf"
    _nft_lit("export", f"ckpt_path={ckpt}", f"out={out}", f"hydra.run.dir={tmp_path / 'export'}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(model.model.embed_tokens.weight, state["model.model.embed_tokens.weight"])
    assert tok.decode(tok.encode("1+2=", add_special_tokens=False)) == "1+2="

    vdir = tmp_path / "val"
    _nft_lit(
        "validate",
        "experiment=smoke",
        f"ckpt_path={ckpt}",
        f"hydra.run.dir={vdir}",
        *PARITY_OVERRIDES,
        "eval.num_samples=2",
        "eval.pass_k=[1,2]",
        "eval.temperature=1.0",
        "eval.top_p=1.0",
    )
    res = json.loads((vdir / "validate.json").read_text())["results"]
    assert set(res) >= {"heldout/avg@2", "heldout/pass@2", "average/avg"}
    assert 0.0 <= res["heldout/avg@2"] <= res["heldout/pass@2"] <= 1.0


@pytest.mark.slow
def test_multirun_sweep_gives_one_folder_per_run(tmp_path):
    sweep = tmp_path / "sweep"
    _nft_lit(
        "fit",
        "-m",
        "experiment=smoke",
        "iterations=1",
        "algorithm=nft,grpo",
        "seed=0,1",
        "eval.at_start=false",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",
        *PARITY_OVERRIDES,
        timeout=500,
    )
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(runs) == 4
    for r in runs:
        assert (r / "csv" / "metrics.csv").is_file() and (r / "checkpoints" / "last.ckpt").is_file()
        assert any((r / "tb").iterdir())


LIGHTNING_CLI_DATA = """
data:
  problems:
    class_path: nft_lit.data.ProblemSet
    init_args:
      name: inline
      problems:
        - {id: a, question: "1+2=", answer: "3", source: t}
        - {id: b, question: "2+2=", answer: "4", source: t}
        - {id: c, question: "3+4=", answer: "7", source: t}
        - {id: d, question: "5+1=", answer: "6", source: t}
  gen_prompts_per_round: 4
  prompts_per_step: 2
trainer:
  max_epochs: 2
  default_root_dir: ROOT
"""


@pytest.mark.slow
def test_lightning_cli_fit_then_validate(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(LIGHTNING_CLI_DATA.replace("ROOT", str(tmp_path / "logs")))
    smoke = Path(__file__).parents[1] / "configs" / "lightning_cli" / "smoke.yaml"
    parity = ["--data.sampler.init_args.verifier", "_rollout_fakes.ParityVerifier"]
    _nft_lit("cli", "fit", "--config", str(smoke), "--config", str(extra), *parity)
    ckpts = sorted((tmp_path / "logs").rglob("*.ckpt"))
    assert ckpts, "LightningCLI fit wrote no checkpoint"
    proc = _nft_lit("cli", "validate", "--config", str(smoke), "--config", str(extra), "--ckpt_path", str(ckpts[-1]))
    assert "val/heldout/avg@1" in proc.stdout
    # its checkpoints carry the run config, so `nft-lit export` and `nft-lit validate` read them as well
    _nft_lit("export", f"ckpt_path={ckpts[-1]}", f"out={tmp_path / 'hf'}", f"hydra.run.dir={tmp_path / 'x'}")
    assert (tmp_path / "hf" / "config.json").is_file()
    _nft_lit("validate", "experiment=smoke", f"ckpt_path={ckpts[-1]}", f"hydra.run.dir={tmp_path / 'v'}")
    assert "heldout/avg@1" in json.loads((tmp_path / "v" / "validate.json").read_text())["results"]


def _printed_metric(stdout: str, name: str) -> float:
    """A value from Lightning's validate table (one row per metric: name, then value)."""
    row = next(line for line in stdout.splitlines() if name in line)
    return float(re.findall(r"[-+]?\d*\.\d+(?:[eE][-+]?\d+)?|\d+", row.split(name, 1)[1])[0])


@pytest.mark.slow
def test_validate_and_lightning_cli_validate_agree_on_one_checkpoint(tmp_path):
    """One evaluation path: `nft-lit validate` and `nft-lit cli validate` score the same checkpoint alike."""
    run = tmp_path / "run"
    _nft_lit("fit", "experiment=smoke", "iterations=1", "eval.at_start=false", f"hydra.run.dir={run}")
    verifier = "_rollout_fakes.GoldParityVerifier"  # a score strictly inside (0, 1) from a random model
    parity = f"reward.verifier._target_={verifier}"
    ckpt = run / "checkpoints" / "last.ckpt"
    vdir = tmp_path / "val"
    _nft_lit("validate", "experiment=smoke", f"ckpt_path={ckpt}", parity, f"hydra.run.dir={vdir}")
    hydra_avg = json.loads((vdir / "validate.json").read_text())["results"]["heldout/avg@1"]
    smoke = Path(__file__).parents[1] / "configs" / "lightning_cli" / "smoke.yaml"
    proc = _nft_lit(
        "cli",
        "validate",
        "--config",
        str(smoke),
        "--data.sampler.init_args.verifier",
        verifier,
        "--trainer.default_root_dir",
        str(tmp_path / "cli"),
        "--ckpt_path",
        str(ckpt),
    )
    assert 0.0 < hydra_avg < 1.0
    assert _printed_metric(proc.stdout, "val/heldout/avg@1") == pytest.approx(hydra_avg, abs=1e-6)


ALGORITHMS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "algorithm").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_smoke_experiment_runs_every_algorithm(tmp_path, algorithm):
    """The real smoke experiment (synthetic task, random-init model, HF engine), in process."""
    import csv

    from hydra import compose, initialize_config_dir

    from nft_lit.cli import run_fit
    from nft_lit.compose import CONFIG_DIR

    extra = {"dapo": ["algorithm.overlong_buffer=2"]}.get(algorithm, [])
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smoke", f"algorithm={algorithm}", f"run_dir={tmp_path}", *extra])
    metrics = run_fit(cfg)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    iterations = [r for r in rows if r.get("rollout/kept_groups")]
    assert len(iterations) == 4
    # one optimizer step per mini-batch (2, or one per kept group when fewer: groups stay whole), none when
    # an iteration kept no group
    steps = 0
    for r in iterations:
        kept = int(float(r["rollout/kept_groups"]))
        if kept:
            assert float(r["rollout/optimizer_steps"]) == min(2, kept)
            steps += min(2, kept)
    assert sum(1 for r in rows if r.get("train/loss")) == steps
    assert "val/heldout/avg@1" in metrics and 0.0 <= metrics["val/heldout/avg@1"] <= 1.0
    # held-out evaluations: before training, then after iterations 2 and 4, each its own logged point
    assert sum(1 for r in rows if r.get("val/heldout/avg@1")) == 3
    assert {"rollout/pass_rate", "rollout/gen_tokens_per_second", "seconds/train", "seconds/iteration"} <= set(metrics)
    assert any((tmp_path / "tb").iterdir())


VLLM_LOAD = """
import sys, json
import torch
from transformers import AutoModelForCausalLM
from vllm import LLM, SamplingParams
folder = sys.argv[1]
llm = LLM(model=folder, enforce_eager=True, dtype="float32", max_model_len=64, seed=0, gpu_memory_utilization=0.1)
out = llm.generate([{"prompt_token_ids": [5, 6, 13]}], SamplingParams(temperature=0, max_tokens=3))
hf_model = AutoModelForCausalLM.from_pretrained(folder)
hf = hf_model.generate(torch.tensor([[5, 6, 13]]), max_new_tokens=3, do_sample=False)
print(json.dumps({"vllm": list(out[0].outputs[0].token_ids), "hf": hf[0, 3:].tolist()}))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_exported_folder_loads_in_vllm(tmp_path):
    run = tmp_path / "run"
    overrides = ["iterations=1", "eval.at_start=false", f"hydra.run.dir={run}", *PARITY_OVERRIDES]
    _nft_lit("fit", "experiment=smoke", *overrides)
    out = tmp_path / "hf"
    _nft_lit(
        "export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out={out}", f"hydra.run.dir={tmp_path / 'e'}"
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_LOAD, str(out)], capture_output=True, text=True, env=env, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["vllm"] == result["hf"] and len(result["vllm"]) >= 1


def test_validate_without_checkpoint_evaluates_the_configured_model(tmp_path):
    from hydra import compose, initialize_config_dir

    from nft_lit.cli import run_validate
    from nft_lit.compose import CONFIG_DIR, ConfigError

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smoke", f"run_dir={tmp_path}"])
        cfg.eval.out = str(tmp_path / "validate.json")
        results = run_validate(cfg)
    assert 0.0 <= results["heldout/avg@1"] <= 1.0
    written = json.loads((tmp_path / "validate.json").read_text())
    assert written["results"]["heldout/avg@1"] == pytest.approx(results["heldout/avg@1"])
    cfg.model = None
    with pytest.raises(ConfigError, match="ckpt_path"):
        run_validate(cfg)
