"""How a launch (nodes, processes per node, the launcher, signals) maps onto one training run.

- ``parallel_strategy``: Lightning's ``ModelParallelStrategy`` with its data-parallel size computed from the
  launch, ``num_nodes x devices / tensor_parallel_size``, so a trainer config never hand-sets it (Lightning's
  own ``"auto"`` means "the number of nodes", which leaves one-node multi-GPU runs without a valid mesh);
- ``check_launch``: the sizes a trainer config asks for against the processes the launcher started, before
  anything is built;
- ``process_rank`` and ``per_rank_log_overrides``: which process this is, and a log file per rank, so that
  every rank of a torchrun/SLURM launch writes into one run folder without interleaving one file.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any


class LaunchError(ValueError):
    """Parallel sizes that do not fit the launch; the message names the options."""


def _as_count(devices: Any, accelerator: str, option: str) -> int:
    """Number of processes per node that ``trainer.devices`` asks for (an int, a list of ids, or ``auto``)."""
    if isinstance(devices, list | tuple):
        return len(devices)
    if devices == "auto" or devices == -1 or devices == "-1":
        local = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun says how many it started on this node
        if local is not None:
            return int(local)
        if accelerator in ("gpu", "cuda"):
            import torch

            return max(torch.cuda.device_count(), 1)
        return 1
    try:
        count = int(devices)
    except (TypeError, ValueError):
        raise LaunchError(f"{option}={devices!r}: expected a number of devices, a list of ids, or auto") from None
    if count < 1:
        raise LaunchError(f"{option}={devices!r}: expected at least 1")
    return count


def parallel_sizes(num_nodes: int, devices: Any, accelerator: str, tensor_parallel_size: int) -> tuple[int, int]:
    """(world size, data-parallel size) of ``num_nodes`` x ``devices`` processes with tensor-parallel groups
    of ``tensor_parallel_size``; a tensor-parallel size that does not divide the world fails, naming both."""
    if int(num_nodes) < 1:
        raise LaunchError(f"trainer.num_nodes={num_nodes}: expected at least 1")
    world = int(num_nodes) * _as_count(devices, accelerator, "trainer.devices")
    tp = int(tensor_parallel_size)
    if tp < 1 or world % tp:
        raise LaunchError(
            f"trainer.strategy.tensor_parallel_size={tp} does not divide the world size {world}"
            f" (trainer.num_nodes={num_nodes} x trainer.devices={devices})"
        )
    return world, world // tp


def parallel_strategy(
    num_nodes: int, devices: Any, accelerator: str = "cpu", tensor_parallel_size: int = 1, **strategy_options: Any
) -> Any:
    """``ModelParallelStrategy`` (FSDP2 over the data-parallel dimension) sized from the launch.

    ``strategy_options`` go to the strategy unchanged (``save_distributed_checkpoint``,
    ``process_group_backend``, ``timeout``).
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    _, data_parallel = parallel_sizes(num_nodes, devices, accelerator, tensor_parallel_size)
    return ModelParallelStrategy(
        data_parallel_size=data_parallel, tensor_parallel_size=int(tensor_parallel_size), **strategy_options
    )


def launched_world_size() -> int | None:
    """The number of processes an external launcher started (torchrun sets WORLD_SIZE, SLURM SLURM_NTASKS);
    None when Lightning starts them itself (or in a single process)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ):
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return None


def check_launch(trainer: Any) -> int:
    """The world size the composed ``trainer`` node asks for; fails at start when it does not fit the processes
    this launch has."""
    strategy = trainer.get("strategy")
    tp = strategy.get("tensor_parallel_size", 1) if hasattr(strategy, "get") else 1
    world, _ = parallel_sizes(trainer.get("num_nodes", 1), trainer.get("devices", 1), trainer.accelerator, tp)
    launched = launched_world_size()
    if launched is not None and launched != world:
        raise LaunchError(
            f"the launcher started {launched} processes but trainer.num_nodes={trainer.get('num_nodes', 1)} x"
            f" trainer.devices={trainer.get('devices', 1)} = {world}: set them to the launch (torchrun"
            " --nnodes/--nproc-per-node, srun --nodes/--ntasks-per-node)"
        )
    return world


def process_tag() -> str:
    """Which process of the launch this is, for file names: "" for the first one (global rank 0), else
    ``rank<N>`` (torchrun and SLURM set the global rank), or ``node<N>.local<M>`` under Lightning's own
    launcher, which sets only NODE_RANK and LOCAL_RANK."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return "" if os.environ[var] == "0" else f"rank{os.environ[var]}"
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", "0")
    return "" if local == node == "0" else f"node{node}.local{local}"


FAILURE_GRACE_S = 2.0
"""How long a process other than rank 0 waits before exiting on an error that every rank hits the same way."""


def say_once(line: str) -> None:
    """Print why the launch failed, once for all ranks: rank 0 says it, the others only wait ``FAILURE_GRACE_S``
    before they exit, since torchrun/srun stop every process as soon as one has failed and would otherwise stop
    rank 0 before it has said anything."""
    if process_tag():
        time.sleep(FAILURE_GRACE_S)
    else:
        print(line, file=sys.stderr)


def launch_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides this process adds to ``argv``: a non-first process logs to ``<job>.<tag>.log`` in the
    same run folder (the first keeps ``<job>.log``), so ranks never interleave one file. Under an external
    launcher every process composes its own config, so each would resolve ``${now:}`` in the default run
    folder itself, a second apart on another node: the folder must be given, the same for all."""
    launched = launched_world_size()
    if launched is not None and launched > 1:
        key = "hydra.sweep.dir" if any(a in ("-m", "--multirun") for a in argv) else "hydra.run.dir"
        if not any(a.startswith(f"{key}=") for a in argv):
            raise LaunchError(
                f"{launched} processes were launched (torchrun/srun): pass {key}=DIR, the same on every node,"
                " so that all ranks write one run folder"
            )
    tag = process_tag()
    if not tag:
        return []
    return [f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/${{hydra.job.name}}.{tag}.log"]


PREEMPTED_EXIT = 143
"""Exit status of a run stopped by SIGTERM: 128 + 15, what a shell reports for a process the signal ended, so a
scheduler or a ``set -e`` script never mistakes a preempted run for a finished one."""


class Preempted(Exception):
    """SIGTERM (a scheduler's preemption, ``timeout``, ``kill``) stopped the run; the message says how to resume."""


def resume_command(overrides: list[str], run_dir: str) -> str:
    """The command line that continues a run: its own overrides, ``ckpt_path=last`` and its folder."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("ckpt_path=", "hydra.run.dir="))]
    return shlex.join(["nft-lit", "fit", *kept, "ckpt_path=last", f"hydra.run.dir={run_dir}"])


def preempted_message(run_dir: str, iterations: int, overrides: list[str]) -> str:
    """What a SIGTERM left: the newest complete iteration on disk and the command that continues from it."""
    from nft_lit.runs import RunError, read_checkpoint, resolve_checkpoint

    try:
        path = resolve_checkpoint("last", run_dir)
    except RunError:
        return f"stopped by SIGTERM before any iteration completed (nothing to resume in {run_dir}); rerun it"
    done = int(read_checkpoint(path).get("epoch", -1)) + 1
    return (
        f"stopped by SIGTERM; {path} holds iteration {done} of {iterations} (complete). Resume with: "
        + resume_command(overrides, str(run_dir))
    )


def check_command_line(argv: list[str], known: set[str]) -> None:
    """Refuse, before Hydra touches anything, what would otherwise be accepted and ignored or fail with a
    traceback: a new top-level key (``+iteration=3``: Hydra's own hint for a typo adds a key nothing reads;
    ``known`` are configs/train.yaml's keys and groups), and a run folder this process cannot write."""
    import difflib

    for arg in argv:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+~")
        if sep and key.startswith("+") and "." not in name and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]}={value}?" if close else ""
            raise LaunchError(f"{name}: not an option of configs/train.yaml, nothing would read it{hint}")
        if sep and name == "hydra.run.dir":
            folder = Path(value).expanduser()
            existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
            if not os.access(existing, os.W_OK):
                raise LaunchError(f"hydra.run.dir={value}: {existing} is not writable; choose another folder")


def hydra_arguments(argv: list[str], command: str) -> list[str]:
    """``argv`` as Hydra must see it for ``command``: checkpoint paths quoted (Lightning names them
    ``epoch=3-step=9.ckpt``; Hydra would read the '=' as a second assignment), this process's own log file
    (``launch_overrides``), and for ``validate`` / ``export`` a log of their own (``validate.log``), never the
    ``cli.log`` of a fit run whose folder they are pointed at. The added overrides go first: Hydra's flags
    (``--cfg job``) may end the command line, and argparse takes no overrides after them."""
    added = launch_overrides(argv)
    if command != "fit" and not any(a.startswith("hydra.job.name=") for a in argv):
        added.insert(0, f"hydra.job.name={command}")
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "ckpt_path" and "=" in value and value[:1] not in "'\"":
            arg = f"{key}='{value}'"
        out.append(arg)
    return [*added, *out]
