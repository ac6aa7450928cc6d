"""SIGTERM (a scheduler's preemption, `timeout`, `kill`) ends a run at a complete state: exit 143, one line with
the command that resumes it, and `checkpoints/last.ckpt` holding the newest complete iteration. Under SLURM
(simulated by its environment variables) the requeued job's unchanged command line (`ckpt_path=auto`) resumes."""

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch import _weights_sha256
from test_runs import SMOKE, _csv_epochs, _env

from nft_lit.launch import PREEMPTED_EXIT
from nft_lit.runs import read_checkpoint, resolve_checkpoint

ITERATIONS = 8
SLURM_JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "nft-lit",
    "SLURM_NTASKS": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def _terminated_run(args: list[str], run: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Start ``nft-lit fit args``, send SIGTERM once two iterations are complete, and wait for it to end."""
    cmd = [sys.executable, "-m", "nft_lit.cli", "fit", *args]
    stderr = run.parent / f"{run.name}.stderr"  # a file, not a pipe nobody reads while the run goes on
    with open(stderr, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=sink, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if read_checkpoint(resolve_checkpoint("last", run)).get("epoch", -1) >= 1:
                break
        except ValueError:
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", stderr.read_text())


def _finish(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "nft_lit.cli", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_exits_non_zero_with_the_command_that_resumes_exactly(tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    args = [*SMOKE, f"iterations={ITERATIONS}", "eval.every_n_iterations=100", f"hydra.run.dir={run}"]
    stopped = _terminated_run(args, run, _env())
    assert stopped.returncode == PREEMPTED_EXIT, stopped.stderr[-3000:]
    said = [line for line in stopped.stderr.splitlines() if line.startswith("nft-lit fit:")]
    assert len(said) == 1 and "stopped by SIGTERM" in said[0], stopped.stderr[-3000:]
    done = int(read_checkpoint(resolve_checkpoint("last", run))["epoch"]) + 1
    assert 2 <= done < ITERATIONS, "the run ended before SIGTERM reached it"
    assert f"holds iteration {done} of {ITERATIONS} (complete)" in said[0]
    assert not (run / ".lock").exists()

    command = shlex.split(said[0].split("Resume with: ", 1)[1])
    assert command[:2] == ["nft-lit", "fit"] and command[-2:] == ["ckpt_path=last", f"hydra.run.dir={run}"]
    _finish(command[1:], _env())
    _finish(["fit", *args[:-1], f"hydra.run.dir={straight}"], _env())
    assert _csv_epochs(run) == list(range(ITERATIONS))
    assert _weights_sha256(run) == _weights_sha256(straight)


@pytest.mark.slow
def test_a_preempted_slurm_job_resumes_when_requeued_with_the_same_command(tmp_path):
    """docs/SCALING.md's sbatch script: one command line with ckpt_path=auto, run again by the requeue."""
    run = tmp_path / "run"
    args = [*SMOKE, f"iterations={ITERATIONS}", "eval.every_n_iterations=100", "ckpt_path=auto", f"hydra.run.dir={run}"]
    env = {**_env(), **SLURM_JOB}
    stopped = _terminated_run(args, run, env)
    assert stopped.returncode == PREEMPTED_EXIT, stopped.stderr[-3000:]
    done = int(read_checkpoint(resolve_checkpoint("last", run))["epoch"]) + 1
    assert done < ITERATIONS
    _finish(["fit", *args], env)  # the requeued job: same command, same environment
    assert f"resuming {run / 'checkpoints' / 'last.ckpt'}" in (run / "cli.log").read_text()
    assert int(read_checkpoint(resolve_checkpoint("last", run))["epoch"]) == ITERATIONS - 1
    assert _csv_epochs(run) == list(range(ITERATIONS))
