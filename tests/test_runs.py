"""A run's folder over its life (issue "Runs you can trust"): checkpoints, kills, resume, lock, bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _rollout_fakes import PARITY_OVERRIDES

from nft_lit.cli import main
from nft_lit.launch import hydra_arguments
from nft_lit.runs import RunError, RunLock, config_changes, resolve_checkpoint

TESTS = Path(__file__).parent
SMOKE = ["experiment=smoke", "eval.every_n_iterations=2", *PARITY_OVERRIDES, "logger=[csv]"]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }


def _nft_lit(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nft_lit.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=400)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def _epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


def _csv_epochs(run: Path) -> list[int]:
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        return sorted({int(float(r["epoch"])) for r in csv.DictReader(handle) if r.get("train/loss")})


@pytest.mark.slow
def test_last_checkpoint_is_the_final_state_and_resume_continues_the_metrics(tmp_path):
    run = tmp_path / "run"
    _nft_lit("fit", *SMOKE, "iterations=3", "checkpoint.every_n_iterations=2", f"hydra.run.dir={run}")
    ckpts = run / "checkpoints"
    assert _epoch(ckpts / "last.ckpt") == 2  # the final iteration, though numbered ones come every 2
    numbered = [p for p in ckpts.glob("epoch=*.ckpt")]
    assert [p.name for p in numbered] == ["epoch=1-step=4.ckpt"]

    # resume by the name Lightning wrote ('=' inside the value), to more iterations: said, not silent
    proc = _nft_lit("fit", *SMOKE, "iterations=5", f"ckpt_path={numbered[0]}", f"hydra.run.dir={run}")
    said = next(line for line in (proc.stdout + proc.stderr).splitlines() if "(allowed on resume)" in line)
    assert "iterations: 3 -> 5" in said and "ckpt_path" not in said
    assert _epoch(ckpts / "last.ckpt") == 4 and not list(ckpts.glob("last-v*.ckpt"))
    assert _csv_epochs(run) == [0, 1, 2, 3, 4]  # iteration 2 was re-run from the checkpoint: logged once
    from nft_lit.report import report

    table, _ = report([run], tmp_path / "report")  # the resumed run's curves are whole again
    assert "| nft | 1 |" in table

    # another experiment on this checkpoint: refused, naming what differs; resume_force takes it anyway
    refused = _nft_lit(
        "fit", *SMOKE, "algorithm=grpo", "iterations=6", "ckpt_path=last", f"hydra.run.dir={run}", ok=False
    )
    assert "algorithm.name: 'nft' -> 'grpo'" in refused.stderr and "Traceback" not in refused.stderr
    assert refused.returncode == 2
    _nft_lit("fit", *SMOKE, "iterations=6", "ckpt_path=last", "resume_force=true", f"hydra.run.dir={run}")
    assert _epoch(ckpts / "last.ckpt") == 5


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_a_killed_run_resumes_from_its_newest_complete_checkpoint(tmp_path, sig):
    run = tmp_path / "run"
    args = ["fit", *SMOKE, "iterations=6", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", "nft_lit.cli", *args], env=_env(), stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert last.exists()
    killed_at = _epoch(resolve_checkpoint("last", run))
    assert killed_at < 5, "the run finished before it could be killed"
    _nft_lit(*args, "ckpt_path=last")
    assert _epoch(last) == 5
    assert _csv_epochs(run) == [0, 1, 2, 3, 4, 5]
    assert not (run / ".lock").exists()


def _fake_checkpoint(path: Path, step: int) -> Path:
    torch.save({"global_step": step, "epoch": step}, path)
    return path


def test_ckpt_path_last_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _fake_checkpoint(folder / "epoch=0-step=2.ckpt", 2)
    newest = _fake_checkpoint(folder / "epoch=1-step=4.ckpt", 4)
    (folder / "last.ckpt").write_bytes(newest.read_bytes()[:100])  # a save cut short
    assert resolve_checkpoint("last", tmp_path) == newest
    (folder / "last.ckpt").unlink()
    assert resolve_checkpoint("last", tmp_path) == newest
    for p in folder.iterdir():
        p.write_text("garbage")
    with pytest.raises(RunError, match="no complete checkpoint"):
        resolve_checkpoint("last", tmp_path)
    with pytest.raises(RunError, match=r"ckpt_path=.*garbage.ckpt does not exist"):
        resolve_checkpoint(str(tmp_path / "garbage.ckpt"), tmp_path)
    with pytest.raises(RunError, match="not a complete checkpoint"):
        resolve_checkpoint(str(folder / "epoch=1-step=4.ckpt"), tmp_path)


def test_checkpoint_paths_with_equals_signs_reach_hydra_quoted():
    quoted = hydra_arguments(["ckpt_path=d/epoch=2-step=6.ckpt", "seed=1"], "fit")
    assert quoted == ["ckpt_path='d/epoch=2-step=6.ckpt'", "seed=1"]
    kept = hydra_arguments(["ckpt_path=last", "+ckpt_path='a=b'"], "validate")
    assert kept == ["hydra.job.name=validate", "ckpt_path=last", "+ckpt_path='a=b'"]


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_cfg_job_may_end_the_command_line(command, capsys):
    # The help shows `[KEY=VALUE ...] [-m] [--cfg job]`: the overrides the CLI adds must not follow the flag.
    assert main([command, "experiment=smoke", "seed=3", "--cfg", "job"]) == 0
    assert "seed: 3" in capsys.readouterr().out


def test_run_lock_refuses_a_live_holder_and_clears_a_stale_one(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
        with (
            pytest.raises(RunError, match=f"in use by another `nft-lit fit` \\(pid {os.getpid()}\\)"),
            RunLock(tmp_path),
        ):
            pass
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text("999999999")  # a killed run's
    with RunLock(tmp_path):
        pass


def test_run_lock_held_by_a_killed_process_does_not_block(tmp_path):
    code = f"import time\nfrom nft_lit.runs import RunLock\nlock = RunLock({str(tmp_path)!r})\nlock.__enter__()\n"
    code += "print('held', flush=True)\ntime.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(RunError, match=f"in use by another `nft-lit fit` \\(pid {holder.pid}\\)"),
            RunLock(tmp_path),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".lock").read_text() == str(holder.pid)  # left behind by the kill, but no longer locked
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_run_lock_on_a_filesystem_without_flock_says_so(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(RunError, match="filesystem without flock"), RunLock(tmp_path):
        pass


def test_config_changes_name_each_differing_key():
    saved = {"algorithm": {"name": "nft", "loss": {"epsilon": 1.0}}, "seed": 0, "iterations": 5}
    new = {"algorithm": {"name": "nft", "loss": {"epsilon": 0.5}}, "seed": 0, "iterations": 50}
    changes = config_changes(saved, new)
    assert changes.experiment == ["algorithm.loss.epsilon: 1.0 -> 0.5"]
    assert changes.allowed == ["iterations: 5 -> 50"] and changes.from_state == []  # iterations may change


def test_bad_checkpoint_and_bad_values_fail_in_one_line():
    garbage = Path(os.environ.get("TMPDIR", "/tmp")) / f"nft-lit-garbage-{os.getpid()}.ckpt"
    garbage.write_text("not a checkpoint")
    try:
        proc = _nft_lit("validate", f"ckpt_path={garbage}", ok=False)
    finally:
        garbage.unlink()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"nft-lit validate: ckpt_path={garbage} is not a complete checkpoint" in proc.stderr
    proc = _nft_lit("fit", "experiment=smoke", "algorithm.num_answers=1", ok=False)
    assert "nft-lit fit: algorithm.num_answers (K) must be >= 2" in proc.stderr and "Traceback" not in proc.stderr


def test_each_command_has_its_own_help():
    out = _nft_lit("fit", "--help").stdout
    assert out.startswith("usage: nft-lit fit") and "powered by Hydra" not in out and len(out.splitlines()) < 25


@pytest.mark.slow
def test_validate_uses_the_prompt_given_and_saves_every_answer(tmp_path):
    run = tmp_path / "run"
    _nft_lit("fit", *SMOKE, "iterations=1", f"hydra.run.dir={run}")
    ckpt = run / "checkpoints" / "last.ckpt"
    common = [
        "validate",
        "experiment=smoke",
        f"ckpt_path={ckpt}",
        "reward.verifier._target_=_rollout_fakes.GoldParityVerifier",
    ]
    _nft_lit(*common, f"hydra.run.dir={tmp_path / 'v1'}")
    _nft_lit(*common, "prompt.template='{question}='", f"hydra.run.dir={tmp_path / 'v2'}")
    one, two = (json.loads((tmp_path / v / "validate.json").read_text()) for v in ("v1", "v2"))
    assert one["ckpt_path"] == str(ckpt) and one["model"]["config"]["hidden_size"] == 64
    assert one["prompt"]["template"] == "{question}" and two["prompt"]["template"] == "{question}="
    answers = [json.loads(line) for line in (tmp_path / "v2" / "generations.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and {"question", "gold", "response", "correct", "truncated"} <= set(answers[0])
    assert sum(a["correct"] for a in answers) / 8 == pytest.approx(two["results"]["heldout/avg@1"])


@pytest.mark.slow
def test_every_logger_of_the_logger_group_records_the_run(tmp_path, monkeypatch):
    """TensorBoard, CSV, W&B (offline) and MLflow (local store): each holds the run's metrics and its config."""
    run = tmp_path / "run"
    env = {**_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "nft_lit.cli", "fit", "experiment=smoke", "iterations=2", f"hydra.run.dir={run}"]
    cmd.append("logger=[tensorboard,csv,wandb,mlflow]")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hparams = (run / "tb" / "hparams.yaml").read_text()  # the resolved config as TensorBoard hyper-parameters
    assert "algorithm:" in hparams and "name: nft" in hparams
    assert "train/loss" in (run / "csv" / "metrics.csv").read_text().splitlines()[0]

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as runs.LocalMLFlowLogger does
    client = MlflowClient(tracking_uri=f"file:{run / 'mlruns'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("nft-lit").experiment_id])
    assert len(client.get_metric_history(mlflow_run.info.run_id, "train.loss")) == 1  # one optimizer step
    assert mlflow_run.data.params["seed"] == "0" and "val.heldout.avg_at1" in mlflow_run.data.metrics

    (wandb_log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")  # protobuf records, keys as plain text
    data = wandb_log.read_bytes()
    assert b"train/loss" in data and b"rollout/pass_rate" in data and b"algorithm" in data


@pytest.mark.slow
def test_a_second_run_in_a_busy_folder_is_refused_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    _nft_lit("fit", *SMOKE, "iterations=1", f"hydra.run.dir={run}")
    config = (run / ".hydra" / "config.yaml").read_text()
    with RunLock(run):  # a live `fit` holds the folder
        proc = _nft_lit("fit", *SMOKE, "iterations=1", "seed=1", f"hydra.run.dir={run}", ok=False)
    assert "is in use by another `nft-lit fit`" in proc.stderr
    assert (run / ".hydra" / "config.yaml").read_text() == config  # still the running run's seed 0
    assert len(list((run / "checkpoints").iterdir())) == 2


@pytest.mark.slow
def test_the_console_shows_each_message_once_and_ends_with_a_summary(tmp_path):
    proc = _nft_lit("fit", *SMOKE, "iterations=2", f"hydra.run.dir={tmp_path / 'run'}")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "INFO" in line or "WARN" in line]
    messages = [line.split("] - ", 1)[-1].removeprefix("INFO: ") for line in lines]
    assert len(messages) == len(set(messages)), messages  # Lightning's own handler no longer repeats Hydra's
    text = proc.stdout + proc.stderr
    assert "Tip:" not in text and "sync_dist" not in text and "generation flags are not valid" not in text
    assert "held-out evaluation at step 0: heldout/avg@1" in text
    assert "nft-lit fit: 2 iterations" in proc.stdout and "val/heldout/avg@1" in proc.stdout
