"""Launches beyond one process: torchrun "nodes" on localhost, the GPU trainer config on CPU processes, vLLM
engines inside the trainer's world, and the launch checks that fail at start (launch.py)."""

import csv
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_runs import SMOKE, _csv_epochs, _env

from nft_lit import launch
from nft_lit.launch import launch_overrides, process_tag, resume_command
from nft_lit.runs import read_checkpoint, resolve_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def single_process(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "tag"),
    [
        ({}, ""),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ""),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, "rank3"),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, "rank2"),
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, "node0.local1"),  # Lightning's launcher sets no RANK
    ],
)
def test_each_process_has_its_own_log_file_in_the_one_run_folder(single_process, env, tag):
    for key, value in env.items():
        single_process.setenv(key, value)
    assert process_tag() == tag
    overrides = launch_overrides(["hydra.run.dir=/runs/a"])
    if tag:
        assert overrides == [
            f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/${{hydra.job.name}}.{tag}.log"
        ]
    else:
        assert overrides == []


def test_an_external_launch_needs_one_run_folder_for_all_ranks(single_process):
    single_process.setenv("RANK", "1")
    single_process.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"pass hydra\.run\.dir=DIR, the same on every node"):
        launch_overrides(["experiment=smoke"])
    with pytest.raises(ValueError, match=r"pass hydra\.sweep\.dir=DIR"):
        launch_overrides(["-m", "seed=0,1"])
    assert launch_overrides(["-m", "hydra.sweep.dir=/s"])  # given: only the per-rank log remains


def test_the_resume_command_is_the_run_s_own_with_last_and_its_folder():
    got = resume_command(["experiment=demo", "seed=2", "ckpt_path=auto", "hydra.run.dir=/old", "x='a b'"], "/runs/r")
    assert got == "nft-lit fit experiment=demo seed=2 'x='\"'\"'a b'\"'\"'' ckpt_path=last hydra.run.dir=/runs/r"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_nodes(nodes: int, procs_per_node: int, args: list[str]) -> list[subprocess.CompletedProcess]:
    """``nft-lit fit args`` as ``nodes`` torchrun agents on localhost (one per "node"), all at once."""
    port = _free_port()
    env = {k: v for k, v in _env().items() if k not in LAUNCH_VARS}
    agents = [
        subprocess.Popen(
            [
                *TORCHRUN,
                f"--nnodes={nodes}",
                f"--nproc-per-node={procs_per_node}",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "nft_lit.cli",
                "fit",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for node in range(nodes)
    ]
    out = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return out


def _weights_sha256(run: Path) -> str:
    state = read_checkpoint(resolve_checkpoint("last", run), weights=True)["state_dict"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode() + state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_nodes_train_then_resume_exactly(tmp_path):
    """The multi-node recipe of docs/SCALING.md with localhost as both nodes: `trainer.num_nodes=2
    trainer.devices=1` and nothing else sized by hand; the resumed run ends on the uninterrupted run's weights."""
    two_nodes = [*SMOKE, "trainer=cpu_fsdp2", "trainer.num_nodes=2", "trainer.devices=1"]
    run, straight = tmp_path / "run", tmp_path / "straight"
    for agent in _torchrun_nodes(2, 1, [*two_nodes, "iterations=2", f"hydra.run.dir={run}"]):
        assert agent.returncode == 0, agent.stderr[-3000:]
    assert (run / "cli.log").is_file() and (run / "cli.rank1.log").is_file()  # one folder, a log per rank
    resumed = _torchrun_nodes(2, 1, [*two_nodes, "iterations=3", "ckpt_path=last", f"hydra.run.dir={run}"])
    assert all(a.returncode == 0 for a in resumed), resumed[0].stderr[-3000:]
    assert "resuming" in (run / "cli.log").read_text()
    for agent in _torchrun_nodes(2, 1, [*two_nodes, "iterations=3", f"hydra.run.dir={straight}"]):
        assert agent.returncode == 0, agent.stderr[-3000:]
    assert _csv_epochs(run) == [0, 1, 2]
    assert _weights_sha256(run) == _weights_sha256(straight)


@pytest.mark.slow
@pytest.mark.distributed
def test_the_gpu_fsdp_config_trains_on_two_cpu_processes_under_torchrun(tmp_path):
    """trainer=gpu_fsdp with two devices per node (it used to size its data-parallel mesh to the node count),
    on CPU processes; its checkpoints are sharded folders."""
    run = tmp_path / "run"
    gpu_fsdp_on_cpu = ["trainer=gpu_fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
    (agent,) = _torchrun_nodes(1, 2, [*SMOKE, *gpu_fsdp_on_cpu, "iterations=2", f"hydra.run.dir={run}"])
    assert agent.returncode == 0, agent.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_dir()
    assert int(read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"]) == 1


@pytest.mark.distributed
def test_a_launch_that_does_not_match_the_config_fails_at_start_in_one_line(tmp_path):
    (agent,) = _torchrun_nodes(1, 2, [*SMOKE, "trainer=cpu_fsdp2", "trainer.num_nodes=2", f"hydra.run.dir={tmp_path}"])
    assert agent.returncode != 0
    lines = [line for line in agent.stderr.splitlines() if line.startswith("nft-lit fit:")]
    assert lines == [
        "nft-lit fit: the launcher started 2 processes but trainer.num_nodes=2 x trainer.devices=2 = 4: set them"
        " to the launch (torchrun --nnodes/--nproc-per-node, srun --nodes/--ntasks-per-node)"
    ]
    (agent,) = _torchrun_nodes(1, 2, [*SMOKE, "trainer=cpu_fsdp2"])
    assert agent.returncode != 0 and "pass hydra.run.dir=DIR, the same on every node" in agent.stderr


def _gaps(run: Path) -> list[float]:
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        return [float(r["rollout/logprob_gap"]) for r in csv.DictReader(handle) if r.get("rollout/logprob_gap")]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["null", "external_launcher"])
def test_fsdp2_with_one_vllm_engine_per_rank_keeps_the_gap_at_float_precision(tmp_path, backend):
    """`trainer=cpu_fsdp2 rollout=vllm` under Lightning's own launcher (which sets no RANK, the external
    launcher's need): each rank's engine joins the trainer's world and samples from the synced weights."""
    pytest.importorskip("vllm")
    run = tmp_path / "run"
    args = [
        *SMOKE,
        "iterations=3",
        "trainer=cpu_fsdp2",
        "rollout=vllm",
        f"rollout.distributed_executor_backend={backend}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "nft_lit.cli", "fit", *args, f"hydra.run.dir={run}"],
        capture_output=True,
        text=True,
        env={**_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    gaps = _gaps(run)
    assert gaps and max(gaps) < 1e-5, gaps
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 2
    assert os.path.isdir(run / "engine_init")  # the random-init policy's folder the engines started from


def test_rank_zero_says_why_and_the_other_ranks_wait_before_failing(monkeypatch, capsys):
    # torchrun stops every process once one has exited: a rank > 0 that exits at once can stop rank 0 mid-sentence
    waited = []
    monkeypatch.setattr(launch.time, "sleep", waited.append)
    monkeypatch.setenv("RANK", "1")
    launch.say_once("nft-lit fit: bad input")
    assert capsys.readouterr().err == "" and waited == [launch.FAILURE_GRACE_S]
    monkeypatch.setenv("RANK", "0")
    launch.say_once("nft-lit fit: bad input")
    assert capsys.readouterr().err == "nft-lit fit: bad input\n" and waited == [launch.FAILURE_GRACE_S]
