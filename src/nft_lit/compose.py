"""The composition root: a run's objects from a composed config (configs/train.yaml and its groups).

Every front end builds through here, so an option means the same everywhere: ``nft-lit fit`` (``build_fit``,
``build_trainer``), ``nft-lit validate`` (``build_validation``), ``nft-lit export`` (``load_policy``), the in-band
screen (``python -m nft_lit.band``, ``build_sampler``) and the LightningCLI (``nft_lit.lightning_cli``, whose
classes take the same typed arguments). Constructors take plain typed values; this module is the one place that
turns config nodes into them (Hydra ``_target_``, no registry).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nft_lit
from nft_lit.engine_folder import engine_model_path, engine_needs_folder, write_engine_folder

log = logging.getLogger(__name__)

CONFIG_DIR = Path(nft_lit.__file__).resolve().parents[2] / "configs"
"""The repo's configs/ folder (the package is installed editable from src/)."""


def train_config_keys() -> set[str]:
    """Top-level keys and config groups of configs/train.yaml (what a ``+key=value`` override may add)."""
    from omegaconf import OmegaConf

    train = OmegaConf.load(CONFIG_DIR / "train.yaml")
    return set(train.keys()) | {str(next(iter(d))) for d in train.defaults if hasattr(d, "keys")}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the option."""


def import_target(target: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def instantiate_node(node: Any, **kwargs: Any) -> Any:
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


def check_config(cfg: Any) -> None:
    """Fail at start, naming the option, on what the composed config lacks or points to that does not exist.

    Rules on values (K >= 2, ε > 0, the overlong buffer, a loss's needs of the data) live with the objects
    that take them (``RolloutSettings``, ``StepLayout``, the losses, ``check_loss_fits``) and are checked when
    ``build_fit`` creates those objects, so the Hydra and LightningCLI front ends share them.
    """
    from omegaconf import OmegaConf

    from nft_lit.launch import LaunchError, check_launch
    from nft_lit.rollout import check_tensor_parallel_size

    if not issubclass(import_target(cfg.algorithm.loss._target_), import_target("nft_lit.losses.PolicyLoss")):
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
    check_run_options(cfg)
    try:
        check_tensor_parallel_size(cfg.rollout.get("tensor_parallel_size", 1))
        check_launch(cfg.trainer)
    except (LaunchError, ValueError) as e:
        raise ConfigError(str(e)) from e


def check_rollouts_fit(cfg: Any, datamodule: Any) -> None:
    """What would otherwise stop a run at its first rollout: prompt counts that the launch's ranks cannot share
    evenly, and a training prompt longer than ``datamodule.max_prompt_tokens`` (every prompt is encoded once,
    through the sampler's cache, which the rollouts then reuse)."""
    from nft_lit.launch import check_launch

    try:
        datamodule.stage.check_world(check_launch(cfg.trainer))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    limit = datamodule.settings.max_prompt_tokens
    if limit is None:
        return
    problems = datamodule.stage.problems
    for problem in problems:
        if (length := len(datamodule.sampler.encode(problem.question))) > limit:
            raise ConfigError(
                f"problem {problem.id!r}: its prompt has {length} tokens, more than datamodule.max_prompt_tokens="
                f"{limit} (checked at start over the {len(problems)} training problems)"
            )


def _require_int(value: Any, option: str, minimum: int | None, nullable: bool = False) -> None:
    if nullable and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        expected = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or null" if nullable else "")
        raise ConfigError(f"{option}={value!r}: expected {expected}")


def check_run_options(cfg: Any) -> None:
    """The run's own top-level options and the evaluation cadence, each named when it cannot work."""
    _require_int(cfg.get("seed"), "seed", None)
    _require_int(cfg.get("iterations"), "iterations", 1)
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not str(ckpt).strip():
        raise ConfigError("ckpt_path is empty: pass ckpt_path=last, ckpt_path=auto or a checkpoint file (or omit it)")
    _require_int(cfg.eval.get("every_n_iterations"), "eval.every_n_iterations", 1)
    _require_int(cfg.eval.get("num_samples"), "eval.num_samples", 1, nullable=True)


# ---------------------------------------------------------------------------------------------- rollouts
def initial_policy(cfg: Any) -> Callable[[], tuple[Any, Any]]:
    """A callable building the run's initial model and tokenizer (what ``configure_model`` builds)."""

    def build() -> tuple[Any, Any]:
        from nft_lit.models import load_model

        tokenizer = instantiate_node(cfg.tokenizer)
        return load_model(instantiate_node(cfg.model), tokenizer), tokenizer

    return build


def build_engine(rollout: Any, model: Any, run_dir: str) -> tuple[Any, Path | None]:
    """The ``rollout`` node's engine (a factory for the lazily built ones) with the folder it starts from
    filled in (``engine_folder``: ``model`` is the policy's ``ModelSpec`` node), and the folder that must be
    written before it starts (``write_engine_folder``; None when the policy has its own)."""
    spec = instantiate_node(model) if engine_needs_folder(rollout) else None
    kwargs, to_save = engine_model_path(rollout, spec, run_dir)
    return instantiate_node(rollout, **kwargs), to_save


def build_sampler(cfg: Any, engine: Any, **parts: Any) -> Any:
    """The ``sampler`` node (its options: ``chunk_prompts``) over ``engine``; ``parts`` replace the node's
    tokenizer, verifier or prompt template (validate: the checkpoint's tokenizer)."""
    return instantiate_node(cfg.sampler, engine=engine, **parts)


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
    sources: list[tuple[str, Any, Any]] = []  # (name, problem-set node, protocol defaults)
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
        benchmarks.append(Benchmark(name, instantiate_node(problems), sampling, k, pass_k))
    return benchmarks


# ---------------------------------------------------------------------------------------------- fit
def build_fit(cfg: Any) -> tuple[Any, Any, Any | None]:
    """(module, datamodule, held-out evaluation or None) of a composed config; fails at start on bad values.

    The sampler is built once and shared by the datamodule's rollouts and the held-out evaluation. An engine
    that starts from a model folder gets the policy's (``engine_folder``: saved under the run dir for a
    random-init policy).
    """
    from nft_lit.evaluation import Evaluation
    from nft_lit.iteration import check_loss_fits

    check_config(cfg)
    module = instantiate_node(cfg.module)
    engine, engine_folder = build_engine(cfg.rollout, cfg.model, cfg.run_dir)
    sampler = build_sampler(cfg, engine)
    datamodule = instantiate_node(cfg.datamodule, sampler=sampler)
    try:
        check_loss_fits(module.loss_fn, datamodule.settings, datamodule.layout.whole_groups)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    check_rollouts_fit(cfg, datamodule)
    benchmarks = build_benchmarks(cfg, fallback_to_data=False)
    evaluation = Evaluation(benchmarks, sampler, cfg.eval.batch_prompts) if benchmarks else None
    write_engine_folder(engine_folder, initial_policy(cfg))  # last: a refused configuration writes nothing
    return module, datamodule, evaluation


def build_callbacks(cfg: Any, evaluation: Any | None) -> list[Any]:
    """Progress bar, numbered and ``last.ckpt`` checkpoints, the LR monitor and the held-out evaluation.

    ``eval.probe_size`` > 0 adds the probe entropy to the held-out evaluation (``evaluation.ProbeEntropy``): the
    first ``eval.probe_size`` problems (all, when fewer) of the first evaluated benchmark (``eval.heldout`` when
    set), their gold answers teacher-forced, encoded by the run's sampler, at the training temperature
    (``sampling``'s log-prob temperature), ``eval.probe_batch_size`` sequences per forward.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from nft_lit.callbacks import HeldOutEvaluation, PhaseProgressBar
    from nft_lit.evaluation import ProbeEntropy
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
    probe_size = cfg.eval.get("probe_size", 0)
    _require_int(probe_size, "eval.probe_size", 0)
    probe = None
    if probe_size > 0:
        if evaluation is None:
            raise ConfigError(
                f"eval.probe_size={probe_size} needs a held-out set (eval.heldout or eval.benchmarks): the probe "
                "is its first problems"
            )
        batch_size = cfg.eval.get("probe_batch_size", 64)
        _require_int(batch_size, "eval.probe_batch_size", 1)
        problems = evaluation.benchmarks[0].problems[:probe_size]
        temperature = instantiate_node(cfg.sampling).logprob_temperature
        try:
            probe = ProbeEntropy.from_sampler(evaluation.sampler, problems, temperature, batch_size)
        except ValueError as e:
            raise ConfigError(f"eval.probe_size: {e}") from e
        log.info(
            "probe entropy: %d problems of %s, gold answers teacher-forced (%d answer tokens), T = %g",
            len(probe),
            evaluation.benchmarks[0].name,
            sum(len(a) for a in probe.answer_ids),
            temperature,
        )
    if evaluation is not None:
        callbacks.append(HeldOutEvaluation(evaluation, cfg.eval.every_n_iterations, cfg.eval.at_start, probe))
    return callbacks


def build_loggers(cfg: Any, resume: Any | None = None) -> list[Any]:
    """The ``logger`` group's loggers (configs/logger). Resuming (``runs.Resume``), the CSV keeps the completed
    iterations' rows and TensorBoard starts with a ``purge_step`` at the resumed step, which makes it drop the
    events the cut iteration had logged: every row once, on one step axis."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from nft_lit.runs import ContinuingCSVLogger

    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        kind, extra = import_target(node._target_), {}
        if issubclass(kind, ContinuingCSVLogger):
            extra = {"resume": resume}
        elif issubclass(kind, TensorBoardLogger) and resume is not None:
            extra = {"purge_step": resume.log_step}
        loggers.append(instantiate_node(node, **extra))
        log.debug("logger %s: %s", name, node._target_)
    return loggers


def build_trainer(
    cfg: Any,
    evaluation: Any | None = None,
    resume: Any | None = None,
    datamodule: Any | None = None,
    **overrides: Any,
) -> Any:
    """The ``trainer`` node with the run's callbacks and loggers; the progress bar shows ``datamodule``'s
    rollout phases (sync, generate, ...) through the iteration stage's phase hook."""
    from hydra.utils import instantiate

    from nft_lit.callbacks import PhaseProgressBar

    callbacks = build_callbacks(cfg, evaluation)
    loggers = build_loggers(cfg, resume)
    if datamodule is not None:
        datamodule.on_phase = next(c for c in callbacks if isinstance(c, PhaseProgressBar)).set_phase
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, **overrides)


# ---------------------------------------------------------------------------------------------- validate/export
def load_policy(ckpt_path: str) -> tuple[Any, Any]:
    """(PolicyModule with the checkpoint's weights, the run config stored in the checkpoint).

    A sharded checkpoint folder is consolidated into full weights in this process (``runs.read_checkpoint``)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from nft_lit.runs import read_checkpoint, resolve_checkpoint

    if not ckpt_path.strip():
        raise ConfigError("ckpt_path is empty: pass the checkpoint file (or sharded folder) to load")
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


@dataclass
class Validation:
    """What ``nft-lit validate`` evaluates: the policy, the config it was trained with, the prompt used and the
    evaluation over the ``eval`` benchmarks (answers recorded)."""

    model: Any
    run_cfg: Any
    prompt_cfg: Any
    evaluation: Any
    checkpoint: dict[str, Any] | None = None  # global_step and epoch of the evaluated checkpoint

    def facts(self, cfg: Any) -> dict[str, Any]:
        """What ``validate.json`` records beside the results: the checkpoint (path, step, iteration), the
        algorithm it was trained with, the model, the prompt, and each benchmark's problem set, split and protocol."""
        from dataclasses import asdict

        from omegaconf import OmegaConf

        def plain(node: Any) -> Any:
            return OmegaConf.to_container(node, resolve=True) if node is not None else None

        return {
            "ckpt_path": None if cfg.get("ckpt_path") is None else str(cfg.ckpt_path),
            "checkpoint": self.checkpoint,
            "algorithm": OmegaConf.select(self.run_cfg, "algorithm.name"),
            "model": plain(self.run_cfg.model),
            "prompt": plain(self.prompt_cfg),
            "benchmarks": [
                {
                    "name": b.name,
                    "problem_set": getattr(b.problems, "name", None),
                    "split": _split_of(b.problems),
                    "problems": len(b.problems),
                    "num_samples": b.num_samples,
                    **asdict(b.sampling),
                }
                for b in self.evaluation.benchmarks
            ],
        }


def _split_of(problems: Any) -> str | None:
    """The split a problem set was drawn from: the last part of a ``ProblemSet`` name (``gsm8k/test``)."""
    name = getattr(problems, "name", None)
    return name.rsplit("/", 1)[-1] if isinstance(name, str) and "/" in name else None


def build_validation(cfg: Any, prompt_from_command_line: bool) -> Validation:
    """The checkpoint's policy (``ckpt_path``) or the configured base ``model``, its tokenizer, the prompt typed
    on the command line (else the one it was trained with), and a sampler and benchmarks as ``fit`` builds
    them. An engine with its own copy of the weights starts from the evaluated model's folder; a policy
    without one (random init) is saved under the run dir first."""
    from nft_lit.evaluation import Evaluation

    checkpoint = None
    if cfg.get("ckpt_path") is not None:
        from nft_lit.runs import read_checkpoint, resolve_checkpoint

        module, run_cfg = load_policy(str(cfg.ckpt_path))
        model = module.model.eval()
        saved = read_checkpoint(resolve_checkpoint(str(cfg.ckpt_path), "."))
        checkpoint = {"global_step": int(saved["global_step"]), "iterations_done": int(saved.get("epoch", -1)) + 1}
    elif cfg.get("model") is not None:  # no checkpoint: the base policy's "before" numbers
        from nft_lit.models import load_model

        model, run_cfg = load_model(instantiate_node(cfg.model)).eval(), cfg
    else:
        raise ConfigError("validate needs ckpt_path=<checkpoint file>, or model=<config> to evaluate a base model")
    prompt_cfg = cfg.prompt if prompt_from_command_line else run_cfg.get("prompt")
    tokenizer = instantiate_node(run_cfg.tokenizer)
    engine, engine_folder = build_engine(cfg.rollout, run_cfg.model, cfg.run_dir)
    write_engine_folder(engine_folder, lambda: (model, tokenizer))
    prompt = instantiate_node(prompt_cfg) if prompt_cfg is not None else None
    sampler = build_sampler(cfg, engine, tokenizer=tokenizer, prompt_template=prompt)
    benchmarks = build_benchmarks(cfg, fallback_to_data=True)
    evaluation = Evaluation(benchmarks, sampler, cfg.eval.batch_prompts, show_progress=True, record_answers=True)
    return Validation(model, run_cfg, prompt_cfg, evaluation, checkpoint)
