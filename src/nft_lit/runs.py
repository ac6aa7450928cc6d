"""A run's folder over its life: the lock, its checkpoints, resuming, and metrics that survive a resume.

``nft-lit fit`` writes everything of a run into its Hydra run dir. What this module guarantees there:
- one run at a time (``RunLock``): a second `fit` pointed at a folder in use is refused, naming the pid;
- ``checkpoints/last.ckpt`` is always the newest complete iteration (``LastCheckpoint``, written atomically at the
  end of every iteration; numbered ``epoch=E-step=S.ckpt`` files every ``checkpoint.every_n_iterations``);
- ``ckpt_path=last`` resumes from the newest complete checkpoint of the folder, and any ``ckpt_path`` is checked
  to be a readable checkpoint before anything is built (``resolve_checkpoint``);
- a resume refuses a changed algorithm, model, data, prompt, reward, sampling or seed (``config_changes``);
- ``csv/metrics.csv`` keeps the rows logged before the resumed checkpoint (``ContinuingCSVLogger``).
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

# Config groups whose change makes a resumed run a different experiment.
RESUME_MUST_MATCH = ("algorithm", "model", "data", "prompt", "reward", "sampling", "seed")


class RunError(ValueError):
    """A run folder or checkpoint that cannot be used as asked; the message says why and what to do."""


class RunLock:
    """``run_dir/.lock`` holding the pid of the run using the folder; a live holder makes a second run fail."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / ".lock"

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = self.path.read_text().strip()
            if holder.isdigit() and _alive(int(holder)):
                raise RunError(
                    f"run dir {self.path.parent} is in use by another `nft-lit fit` (pid {holder}); "
                    "give this run its own hydra.run.dir, or wait for that one to end"
                ) from None
            self.path.unlink(missing_ok=True)  # left by a killed run
            return self.__enter__()
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: the state at the end of every iteration, overwritten in place (no ``-v1`` copies).

    Lightning's own ``save_last`` follows the numbered checkpoints' schedule, so with ``every_n_epochs=2`` it
    lags behind the final iteration; this one does not. Saves are atomic (Lightning writes to a temporary
    file and renames), so a kill during a save leaves the previous ``last.ckpt`` whole.
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="last",
            save_top_k=1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    @property
    def state_key(self) -> str:
        return f"LastCheckpoint{{dirpath={self.dirpath}}}"

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # ModelCheckpoint skips a save when the global step has not moved since its last one; an iteration
        # that kept no group makes no optimizer step, yet it consumed prompts and must be resumed after.
        self._last_global_step_saved = -1
        super().on_train_epoch_end(trainer, pl_module)


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a complete checkpoint file; None if it is truncated or not a checkpoint."""
    import torch

    if not zipfile.is_zipfile(path):  # torch.save's zip format: a truncated file has no central directory
        return None
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception:
        return None


def resolve_checkpoint(ckpt_path: str, run_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint file ``ckpt_path`` names: ``last`` is the newest complete checkpoint of ``run_dir``."""
    if ckpt_path == "last":
        folder = Path(run_dir) / "checkpoints"
        found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
        complete = [(step, p.name == "last.ckpt", p) for p in found if (step := checkpoint_step(p)) is not None]
        if not complete:
            what = f"only incomplete ones: {[p.name for p in found]}" if found else "none"
            raise RunError(f"ckpt_path=last: no complete checkpoint in {folder} ({what})")
        return max(complete)[2]
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        raise RunError(
            f"ckpt_path={ckpt_path} is a sharded checkpoint folder; consolidate it first with"
            " `python -m lightning.pytorch.utilities.consolidate_checkpoint`"
        )
    if not path.is_file():
        raise RunError(f"ckpt_path={ckpt_path} does not exist")
    if checkpoint_step(path) is None:
        raise RunError(f"ckpt_path={ckpt_path} is not a complete checkpoint (truncated, or not written by Lightning)")
    return path


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: saved -> new`` for every value under ``RESUME_MUST_MATCH`` that differs between two resolved configs."""
    before = _flatten({k: saved.get(k) for k in RESUME_MUST_MATCH})
    after = _flatten({k: new.get(k) for k in RESUME_MUST_MATCH})
    return [
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]


class _ContinuingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` up to ``keep_up_to_step`` (Lightning's writer deletes it), so a resumed
    run's rows follow the ones logged before its checkpoint; rows of an iteration that was cut short go."""

    def __init__(self, log_dir: str, keep_up_to_step: int) -> None:
        self.keep_up_to_step = keep_up_to_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= self.keep_up_to_step]
            keys = list(reader.fieldnames or [])
        self.metrics_keys = sorted(keys)
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume: rows up to ``keep_up_to_step`` stay (-1: none)."""

    def __init__(self, save_dir: str, keep_up_to_step: int = -1, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, **kwargs)
        self.keep_up_to_step = keep_up_to_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self.keep_up_to_step)
        return self._experiment


class LocalMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` for a local file store (``tracking_uri: file:DIR``). There a metric is a file, so
    ``train/loss`` and ``train/loss/positive`` cannot both exist: ``/`` becomes ``.`` in metric names. MLflow 3
    also refuses its file store unless asked (``MLFLOW_ALLOW_FILE_STORE``); a local folder needs no server."""

    def __init__(self, **kwargs: Any) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        super().__init__(**kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({k.replace("/", ".").replace("@", "_at"): v for k, v in metrics.items()}, step)
