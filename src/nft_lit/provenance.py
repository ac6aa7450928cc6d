"""What code and numeric environment a run ran on, one record per launch, kept in the run folder.

A run's numbers depend on more than its config: the nft_lit source that was imported (a clone sharing another
checkout's editable install imports *that* checkout's working tree), uncommitted edits, and the pins that decide
how CPU kernels round (``MKL_CBWR``, ``ATEN_CPU_CAPABILITY``, ``OMP_NUM_THREADS``; README, "Bit-equal runs").
``record_launch`` appends one JSON line per ``fit`` launch to ``<run>/provenance.jsonl``, so a run resumed on
other code says so line by line instead of silently mixing commits.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# Environment variables that change a run's numbers or its reproducibility (README, "Bit-equal runs").
NUMERIC_ENV = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")
FILE_NAME = "provenance.jsonl"


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def source_state(package_dir: Path) -> dict[str, Any]:
    """The imported package's folder and, when it lies in a git checkout, the commit and what differs from it.

    Uncommitted changes under ``src/`` and ``configs/`` are summarised by a count and a hash of their diff (the
    same content gives the same hash), not stored: the record names the code, it does not archive it.
    """
    state: dict[str, Any] = {"package": str(package_dir)}
    root = _git(package_dir, "rev-parse", "--show-toplevel")
    if root is None:  # an installed wheel: its version is the identity
        from importlib.metadata import PackageNotFoundError, version

        try:
            state["version"] = version("nft-lit")
        except PackageNotFoundError:
            state["version"] = None
        return state
    repo = Path(root.strip())
    changed = (_git(repo, "status", "--short", "--", "src", "configs") or "").splitlines()
    diff = _git(repo, "diff", "HEAD", "--", "src", "configs") or ""
    state["git_commit"] = (_git(repo, "rev-parse", "HEAD") or "").strip() or None
    state["changed_files"] = len(changed)
    state["diff_sha256"] = hashlib.sha256(("\n".join(changed) + diff).encode()).hexdigest()[:12] if changed else None
    return state


def launch_record(resumed_at_step: int | None) -> dict[str, Any]:
    """One launch: when, which code, which numeric pins, which CPU kernels and library versions."""
    import torch

    import nft_lit

    return {
        "start_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "resumed_at_step": resumed_at_step,
        **source_state(Path(nft_lit.__file__).resolve().parent),
        "env": {name: os.environ.get(name) for name in NUMERIC_ENV},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def record_launch(run_dir: str | os.PathLike[str], resumed_at_step: int | None) -> dict[str, Any]:
    """Append this launch's record to ``<run_dir>/provenance.jsonl`` and return it."""
    record = launch_record(resumed_at_step)
    path = Path(run_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def describe(record: dict[str, Any]) -> str:
    """The record as one log line: where the code came from and how it differs from its commit."""
    if "git_commit" not in record:
        return f"code: nft_lit {record.get('version')} from {record['package']}"
    dirty = f", {record['changed_files']} files changed under src/ configs/" if record["changed_files"] else ""
    return f"code: nft_lit from {record['package']} at {str(record['git_commit'])[:12]}{dirty}"
