"""A run's records stay the run's: `validate`/`export` pointed at a fit run write beside it, a resume compares the
whole config, a busy folder is refused before anything is touched, and mistakes are one line naming the option."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_runs import SMOKE, _env, _nft_lit

from nft_lit.cli import main
from nft_lit.launch import LaunchError, check_command_line
from nft_lit.runs import config_changes


def _digests(run: Path) -> dict[str, str]:
    """Hash of every file of a fit run's records (config, CSV, TensorBoard, log, checkpoints)."""
    files = [p for p in run.rglob("*") if p.is_file() and p.relative_to(run).parts[0] not in ("validate", "export")]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow
def test_validate_and_export_in_a_fit_run_folder_leave_its_records_alone(tmp_path):
    run = tmp_path / "run"
    _nft_lit("fit", *SMOKE, "iterations=2", "algorithm=grpo", f"hydra.run.dir={run}")
    before = _digests(run)
    last = run / "checkpoints" / "last.ckpt"
    _nft_lit("validate", *SMOKE, f"ckpt_path={last}", f"hydra.run.dir={run}")
    _nft_lit("export", f"ckpt_path={last}", f"out={tmp_path / 'hf'}", f"hydra.run.dir={run}")
    after = _digests(run)
    assert {k: after.get(k) for k in before} == before  # config (algorithm grpo), metrics.csv, tb/, cli.log
    assert set(after) - set(before) == {"validate.log", "export.log"}  # their own logs, beside cli.log
    (written,) = (run / "validate").glob("*/validate.json")
    facts = json.loads(written.read_text())
    assert facts["algorithm"] == "grpo" and facts["checkpoint"] == {"global_step": 4, "iterations_done": 2}
    assert facts["benchmarks"][0]["name"] == "heldout" and facts["benchmarks"][0]["problems"] == 4
    assert list((run / "export").glob("*/.hydra/config.yaml"))
    report = _nft_lit("report", str(run), "--out", str(tmp_path / "report"))  # the fit run alone, labelled grpo
    assert "grpo" in report.stdout


def test_config_changes_allow_cadence_refuse_the_rest_and_name_what_state_overrides():
    saved = {"iterations": 4, "eval": {"every_n_iterations": 2}, "module": {"lr": 1e-4, "grad_clip": 1.0}}
    new = {"iterations": 8, "eval": {"every_n_iterations": 4}, "module": {"lr": 1e-2, "grad_clip": 0.5}}
    changes = config_changes(saved, new)
    assert changes.allowed == ["eval.every_n_iterations: 2 -> 4", "iterations: 4 -> 8"]
    assert changes.from_state == ["module.lr: 0.0001 -> 0.01"]
    assert changes.experiment == ["module.grad_clip: 1.0 -> 0.5"]
    newer = config_changes(saved, {**saved, "trainer": {"num_nodes": 1}})  # an option added after the checkpoint
    assert newer.allowed == ["trainer.num_nodes: None -> 1"] and not newer.experiment


@pytest.mark.slow
def test_a_resume_with_another_lr_is_refused_and_forcing_it_says_it_cannot_take_effect(tmp_path):
    run = tmp_path / "run"
    args = ["fit", *SMOKE, "iterations=2", f"hydra.run.dir={run}"]
    _nft_lit(*args)
    refused = _nft_lit(*args[:-2], "iterations=3", "module.lr=1e-2", "ckpt_path=last", f"hydra.run.dir={run}", ok=False)
    assert "module.lr: 0.0003 -> 0.01" in refused.stderr and refused.returncode == 2
    forced = _nft_lit(
        *args[:-2], "iterations=3", "module.lr=1e-2", "ckpt_path=last", "resume_force=true", f"hydra.run.dir={run}"
    )
    log_text = (run / "cli.log").read_text()
    assert "module.lr: 0.0003 -> 0.01 does NOT take effect" in forced.stderr + log_text
    assert "iterations: 2 -> 3" in log_text  # allowed, and said


def test_a_top_level_key_that_nothing_reads_is_refused_with_a_suggestion():
    with pytest.raises(LaunchError, match=r"iteration: not an option .* did you mean iterations=3\?"):
        check_command_line(["+iteration=3"], {"iterations", "seed"})
    check_command_line(["+logger.wandb.offline=true", "iterations=3"], {"iterations"})  # nested: the node checks


def test_an_unwritable_run_folder_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert main(["fit", "experiment=smoke", f"hydra.run.dir={tmp_path / 'x'}"]) == 2
    assert capsys.readouterr().err.strip().endswith("is not writable; choose another folder")


@pytest.mark.slow
def test_a_second_fit_in_a_busy_folder_is_refused_at_once_touching_nothing(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "nft_lit.cli", "fit", *SMOKE, "iterations=200", f"hydra.run.dir={run}"]
    live = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
            time.sleep(0.2)
        before = (run / "cli.log").read_text()
        second = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"in use by another `nft-lit fit` (pid {live.pid})" in second.stderr
        # refused before Hydra set up logging or anything was built: its only output is that one line
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert (run / "cli.log").read_text().startswith(before) and "in use" not in (run / "cli.log").read_text()
    finally:
        live.kill()
        live.wait()


def _rows(run: Path) -> list[tuple]:
    """metrics.csv as comparable rows: wall-clock columns (seconds, throughput) left out, the rest exact."""
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    timed = ("seconds", "per_second", "tokens_per_second", "s/it")
    return sorted(tuple(sorted((k, v) for k, v in r.items() if v and not any(t in k for t in timed))) for r in rows)


def _tb_steps(run: Path, tag: str) -> list[int]:
    """The steps TensorBoard shows for ``tag`` after it has applied the resumed runs' purges."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tb"), purge_orphaned_data=True)
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


@pytest.mark.slow
def test_every_iteration_s_rows_survive_random_kills_once_each(tmp_path):
    """A 40-iteration smoke run killed (SIGKILL) at three random moments and resumed each time logs exactly the
    rows of an uninterrupted run, in CSV and TensorBoard: none lost, none twice."""
    import random
    import signal

    args = [*SMOKE, "iterations=40", "eval.every_n_iterations=3", "logger=[csv,tensorboard]"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    _nft_lit("fit", *args, f"hydra.run.dir={straight}")
    rng = random.Random(0)
    cmd = [sys.executable, "-m", "nft_lit.cli", "fit", *args, "ckpt_path=auto", f"hydra.run.dir={run}"]
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 2.0))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed: lengthen it"
    _nft_lit(*cmd[3:])
    assert _rows(run) == _rows(straight)
    for tag in ("train/loss", "rollout/reward_mean", "val/heldout/avg@1"):
        steps = _tb_steps(run, tag)
        assert steps == sorted(set(steps)) == _tb_steps(straight, tag), tag


NOISE = ("💡", "in eval mode at the start of training", "exists and is not empty", "LeafSpec", "args parameter")


@pytest.mark.slow
def test_the_console_carries_only_what_a_user_acts_on(tmp_path):
    """A pretrained policy (it used to train in eval mode, with Lightning's warning about it), a resume (the
    checkpoint-folder warning) and the LightningCLI (tips, a deprecation, the args warning) say nothing of it."""
    from nft_lit.models import ModelSpec, build_char_tokenizer, load_model, save_hf_folder

    alphabet = "0123456789+-*="
    tokenizer = build_char_tokenizer(alphabet)
    spec = ModelSpec(tokenizer=f"char:{alphabet}", config={"hidden_size": 64, "num_layers": 2, "num_heads": 2})
    folder = save_hf_folder(load_model(spec, tokenizer).eval(), tokenizer, tmp_path / "pretrained")
    run = tmp_path / "run"
    pretrained = [*SMOKE, "~model.config", f"+model.pretrained={folder}", "model.tokenizer=null"]
    first = _nft_lit("fit", *pretrained, "iterations=1", f"hydra.run.dir={run}")
    resumed = _nft_lit("fit", *pretrained, "iterations=2", "ckpt_path=last", f"hydra.run.dir={run}")
    smoke = Path(__file__).parents[1] / "configs" / "lightning_cli" / "smoke.yaml"
    lightning_cli = _nft_lit(
        "cli", "fit", "--config", str(smoke), "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path)
    )
    for proc in (first, resumed, lightning_cli):
        console = proc.stdout + proc.stderr
        assert not [n for n in NOISE if n in console], console[-2000:]


def test_report_errors_are_one_line_naming_the_path(tmp_path, capsys):
    from nft_lit.report import report_command

    lightning_logs = tmp_path / "lightning_logs" / "version_0"
    lightning_logs.mkdir(parents=True)
    (lightning_logs / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n")
    for path in (tmp_path / "missing", tmp_path / "lightning_logs"):
        assert report_command([str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(path) in err
