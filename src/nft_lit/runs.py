"""A run's folder over its life: the lock, its checkpoints, resuming, and metrics that survive a resume.

``nft-lit fit`` writes everything of a run into its Hydra run dir. What this module guarantees there:
- one run at a time (``RunLock``): a second `fit` pointed at a folder in use is refused, naming the pid;
- ``checkpoints/last.ckpt`` is always the newest complete iteration (``LastCheckpoint``, written atomically at the
  end of every iteration; numbered ``epoch=E-step=S.ckpt`` files every ``checkpoint.every_n_iterations``);
- a checkpoint is a file, or, with ``strategy.save_distributed_checkpoint=true`` (``trainer=gpu_fsdp``), a
  sharded folder of the same name (``torch.distributed.checkpoint`` shards + ``.metadata``, and Lightning's
  ``meta.pt`` with everything but the weights and optimizer states); ``checkpoint_step`` tells a complete one of
  either kind from a cut-short one, ``read_checkpoint`` reads either (a folder's weights consolidated in one
  process, so ``nft-lit validate`` / ``export`` take it as they take a file);
- ``ckpt_path=last`` resumes from the newest complete checkpoint of the folder, file or sharded folder, and any
  ``ckpt_path`` is checked to be a complete checkpoint before anything is built (``resolve_checkpoint``);
- a resume compares the whole resolved config (``config_changes``): how long, how often to evaluate or save
  and where to log may change; anything else, or a value the checkpoint's optimizer state overrides, is refused;
- one step axis for every logged row (``Resume.log_step``): ``csv/metrics.csv`` keeps exactly the completed
  iterations' rows (``ContinuingCSVLogger``) and TensorBoard purges the cut iteration's events (``purge_step``);
- ``validate`` / ``export`` pointed at the folder write into a sub-folder of their own (``own_folder``).
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import proxy

from filelock import FileLock, Timeout
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

# What a resume may change, by resolved key or key prefix: how long the run goes on, how often it evaluates and
# saves, where it logs and speed knobs that draw the same distribution. Every other change makes it another run.
RESUME_MAY_CHANGE = (
    "iterations",
    "trainer.max_epochs",
    "eval.",
    "logger.",
    "checkpoint.",
    "run_dir",
    "trainer.default_root_dir",
    "out",
    "sampler.chunk_prompts",
    "datamodule.max_logprob_gap",
)
# Restored from the checkpoint's optimizer state (AdamW's param groups and the schedule's base lr), so a new
# value cannot take effect in a resumed run.
RESUME_FROM_STATE = ("module.lr", "module.betas", "module.weight_decay")

# A sharded checkpoint folder: Lightning's ``meta.pt`` (lightning.fabric.utilities.load._METADATA_FILENAME, the
# checkpoint dict less ``state_dict`` and ``optimizer_states``) and DCP's ``.metadata`` (shard index).
SHARDED_META = "meta.pt"
DCP_METADATA = ".metadata"


class RunError(ValueError):
    """A run folder or checkpoint that cannot be used as asked; the message says why and what to do."""


class RunLock:
    """``run_dir/.lock``: an flock (``filelock.FileLock``) on a file holding the pid of the run using the folder.

    A second run is refused at once (no waiting), naming that pid. The kernel drops an flock when its holder dies,
    so the file a killed run leaves behind never blocks the next one; a clean exit removes it.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / ".lock"
        self._lock = FileLock(self.path, timeout=0, on_acquired=_write_pid)

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            try:
                holder = self.path.read_text().strip() or "unknown"
            except FileNotFoundError:  # the holder just ended
                holder = "unknown"
            raise RunError(
                f"run dir {self.path.parent} is in use by another `nft-lit fit` (pid {holder}); "
                "give this run its own hydra.run.dir, or wait for that one to end"
            ) from None
        except OSError as error:
            if error.errno != errno.ENOSYS:
                raise
            raise RunError(
                f"run dir {self.path.parent} is on a filesystem without flock, which the run lock needs; "
                "put hydra.run.dir on a local disk or NFS"
            ) from error
        return self

    @staticmethod
    def check_free(run_dir: str | os.PathLike[str] | None) -> None:
        """Refuse (``RunError``, naming the pid) when a live run holds ``run_dir``'s lock; None: a new folder."""
        if run_dir is None or not (Path(run_dir) / ".lock").exists():
            return
        with RunLock(run_dir):
            pass

    def __exit__(self, *exc: object) -> None:
        # Unlinked while still held: a contender that opened the old file sees it unlinked and does not take it.
        self.path.unlink(missing_ok=True)
        self._lock.release()


def own_folder(run_dir: str | os.PathLike[str], command: str) -> Path | None:
    """Where ``validate`` / ``export`` write when ``run_dir`` holds a fit run (its checkpoints or CSV):
    ``<run_dir>/<command>/<timestamp>/``, so they never rewrite the run's config, CSV or TensorBoard files; None
    for any other folder (theirs alone)."""
    import time

    folder = Path(run_dir)
    if not ((folder / "checkpoints").is_dir() or (folder / "csv").is_dir()):
        return None
    return folder / command / time.strftime("%Y-%m-%d_%H-%M-%S")


def _write_pid(fd: int) -> None:
    """``on_acquired`` hook: the holder's pid replaces whatever a killed run left in the file."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: the state at the end of every iteration, overwritten in place (no ``-v1`` copies).

    Lightning's own ``save_last`` follows the numbered checkpoints' schedule, so with ``every_n_epochs=2`` it
    lags behind the final iteration; this one does not. Saves are atomic, so a kill during a save leaves the
    previous ``last.ckpt`` whole: Lightning writes a file to a temporary name and renames it; a sharded folder
    (which Lightning rewrites in place: old ``.metadata`` beside half-new shards) is written whole to
    ``last.partial.ckpt`` and then swapped in by renames (``_swap_in``).
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

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        if not saves_folders(trainer.strategy):
            super()._save_checkpoint(trainer, filepath)
            return
        final = Path(filepath)
        staging = final.with_name(f"{final.stem}.partial{final.suffix}")
        if trainer.is_global_zero:
            _remove(staging)  # a save cut short by a kill
        trainer.strategy.barrier("LastCheckpoint.clear")
        trainer.save_checkpoint(staging, self.save_weights_only)  # every rank's shards are written on return
        if trainer.is_global_zero:
            _swap_in(staging, final)
        trainer.strategy.barrier("LastCheckpoint.swap")
        # what ModelCheckpoint._save_checkpoint records after a save
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def saves_folders(strategy: Any) -> bool:
    """Whether ``strategy`` saves a checkpoint as a sharded folder (ModelParallelStrategy / FSDP1 "sharded")."""
    return bool(getattr(strategy, "_save_distributed_checkpoint", False)) or (
        getattr(strategy, "_state_dict_type", None) == "sharded"
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` by the complete ``staging`` with renames; at every instant one complete ``*.ckpt`` holds
    the newest state: ``staging`` until it is renamed, ``final`` after. The old ``final`` leaves under a name
    ``ckpt_path=last`` never considers before it is deleted, so a kill half way through the delete leaves no
    half-deleted folder named like a checkpoint."""
    trash = final.with_name(f".{final.name}.old")
    _remove(trash)
    if final.exists() or final.is_symlink():
        final.rename(trash)
    staging.rename(final)
    _remove(trash)


def _shards_complete(folder: Path) -> bool:
    """DCP's ``.metadata`` is readable and every shard file it indexes is there, long enough for its entries.

    ``torch.distributed.checkpoint.save`` writes ``.metadata`` last: every rank writes its shards, the
    coordinator gathers their write results (a collective) and only then writes ``.metadata.tmp``, fsyncs it
    and renames it to ``.metadata`` (``FileSystemWriter.finish``). The shard check also catches a folder whose
    deletion was cut short."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(folder).read_metadata()
        ends: dict[str, int] = {}
        for info in metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        return all((folder / name).is_file() and (folder / name).stat().st_size >= end for name, end in ends.items())
    except Exception:
        return False


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a complete checkpoint (file or sharded folder); None if it is cut short or not
    a checkpoint. A sharded folder is complete when DCP's shards and ``.metadata`` are (``_shards_complete``) and
    Lightning's ``meta.pt``, which rank 0 writes after them, is a whole zip; no tensor is read."""
    import torch

    meta = path
    if path.is_dir():
        if not _shards_complete(path):
            return None
        meta = path / SHARDED_META
    if not zipfile.is_zipfile(meta):  # torch.save's zip format: a truncated file has no central directory
        return None
    try:
        return int(torch.load(meta, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception:
        return None


def read_checkpoint(path: Path, weights: bool = False) -> dict[str, Any]:
    """The checkpoint dict as Lightning saved it, of a file or of a sharded folder.

    A file is memory-mapped (a tensor is read when used). A sharded folder gives its non-tensor entries
    (``meta.pt``: ``global_step``, ``nft_lit_config``, loops, callbacks...) and, with ``weights``, its
    ``state_dict`` consolidated into full tensors in this process, under the LightningModule's own keys; the
    optimizer shards are not read.
    """
    import torch

    path = Path(path)
    if not path.is_dir():
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    checkpoint = torch.load(path / SHARDED_META, map_location="cpu", weights_only=False)
    if weights:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():  # "...assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is unavailable or uninitialized")
            checkpoint.update(_load_state_dict_from_keys({"state_dict"}, checkpoint_id=str(path)))
    return checkpoint


def resolve_checkpoint(ckpt_path: str, run_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint (file or sharded folder) ``ckpt_path`` names: ``last`` is the newest complete checkpoint of
    ``run_dir`` (``last.ckpt`` on a tie)."""
    if ckpt_path == "last":
        folder = Path(run_dir) / "checkpoints"
        found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
        complete = [(step, p.name == "last.ckpt", p) for p in found if (step := checkpoint_step(p)) is not None]
        if not complete:
            what = f"only incomplete ones: {[p.name for p in found]}" if found else "none"
            raise RunError(f"ckpt_path=last: no complete checkpoint in {folder} ({what})")
        return max(complete)[2]
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise RunError(f"ckpt_path={ckpt_path} does not exist")
    if checkpoint_step(path) is None:
        what = "a sharded folder missing shards, .metadata or meta.pt" if path.is_dir() else "truncated"
        raise RunError(f"ckpt_path={ckpt_path} is not a complete checkpoint ({what}, or not written by Lightning)")
    return path


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


@dataclass
class ConfigChanges:
    """``key: saved -> new`` lines of two resolved run configs, by what a resume can do with them."""

    allowed: list[str]  # RESUME_MAY_CHANGE: noted, then the new value is used
    from_state: list[str]  # RESUME_FROM_STATE: the checkpoint's state wins whatever the config says
    experiment: list[str]  # anything else: another experiment


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".") for p in patterns)


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> ConfigChanges:
    """Every value that differs between the checkpoint's resolved config and the new one, classified."""
    before, after = _flatten(saved), _flatten(new)
    changes = ConfigChanges([], [], [])
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key) or key in ("ckpt_path", "resume_force"):  # the resume's own options
            continue
        line = f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        # an option newer than the checkpoint (absent from its config) is noted, not refused: the checkpoint could
        # not have set it, so older runs stay resumable
        if _matches(key, RESUME_MAY_CHANGE) or key not in before:
            changes.allowed.append(line)
        elif _matches(key, RESUME_FROM_STATE):
            changes.from_state.append(line)
        else:
            changes.experiment.append(line)
    return changes


@dataclass(frozen=True)
class Resume:
    """Where a resumed run picks up. ``log_step`` is the step axis every logged row uses (Lightning's count of
    training batches, which an iteration without an optimizer step also advances, unlike ``global_step``): rows of
    the completed iterations lie below it, and the resumed run logs from it on."""

    path: str
    global_step: int
    log_step: int
    iterations_done: int
    changes: ConfigChanges


def resume_point(ckpt_path: str | None, run_dir: str, run_config: dict[str, Any], force: bool) -> Resume | None:
    """Where ``ckpt_path`` resumes (None: a new run), and how the config changed, for ``ckpt_path``:
    None (a new run), ``last``, ``auto`` (``last`` when ``run_dir`` has a complete checkpoint, else a new run:
    one command line for a scheduler's first start and every requeue) or a checkpoint file or folder.

    A resume is refused, listing the keys, when the config changed beyond ``RESUME_MAY_CHANGE`` (another
    experiment) or in a value the checkpoint's state overrides (``RESUME_FROM_STATE``); ``force`` takes the
    first kind, and the caller says that the second cannot take effect.
    """
    if ckpt_path is None:
        return None
    try:
        path = resolve_checkpoint("last" if ckpt_path == "auto" else str(ckpt_path), run_dir)
    except RunError:
        if ckpt_path != "auto":
            raise
        return None
    saved = read_checkpoint(path)
    changes = config_changes(saved.get("nft_lit_config") or {}, run_config)
    refused = changes.experiment + changes.from_state
    if refused and not force:
        raise RunError(
            f"ckpt_path={ckpt_path} ({path}) was trained with another configuration; resuming would mix two"
            " experiments or ignore a value the checkpoint's state overrides. Differences:\n  "
            + "\n  ".join(refused)
            + "\nPass the same overrides as the original run (its .hydra/overrides.yaml), or resume_force=true"
            " to continue anyway."
        )
    loop = saved.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    global_step = int(saved["global_step"])
    log_step = int(loop.get("_batches_that_stepped", global_step))
    return Resume(str(path), global_step, log_step, int(saved.get("epoch", -1)) + 1, changes)


def kept_row(row: dict[str, str], resume: Resume | None) -> bool:
    """Whether a ``metrics.csv`` row logged before ``resume``'s checkpoint belongs to a completed iteration (kept)
    or to the one that was cut short (logged again by the resumed run): by its ``epoch`` when it has one, else
    (the LR monitor's rows) by the shared step axis. No resume: nothing is kept."""
    if resume is None:
        return False
    if row.get("epoch"):
        return int(float(row["epoch"])) < resume.iterations_done
    return bool(row.get("step")) and int(float(row["step"])) < resume.log_step


class _ContinuingWriter(ExperimentWriter):
    """Keeps the rows of an existing ``metrics.csv`` that ``resume``'s completed iterations logged (Lightning's
    writer deletes the file), so a resumed run's rows follow them, none lost and none twice."""

    def __init__(self, log_dir: str, resume: Resume | None) -> None:
        self.resume = resume
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [r for r in reader if kept_row(r, self.resume)]
            keys = list(reader.fieldnames or [])
        self.metrics_keys = sorted(keys)
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume: the completed iterations' rows stay (``kept_row``)."""

    def __init__(self, save_dir: str, resume: Resume | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, **kwargs)
        self.resume = resume

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self.resume)
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
