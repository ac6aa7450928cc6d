"""``nft-lit cli``: a LightningCLI over ``PolicyModule`` and ``RolloutDataModule``, whose typed constructors are
the schema (configs/lightning_cli/). It builds the same objects as ``nft-lit fit``; what the Hydra front end
adds through the composition root (the engine's folder, the loss-vs-data check, the run config stored in
checkpoints) is added here by the same functions, so ``validate`` and ``export`` read its checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

from nft_lit.engine_folder import engine_model_path, engine_needs_folder, write_engine_folder


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


def build(argv: list[str], run: bool = True) -> Any:
    """The LightningCLI over PolicyModule / RolloutDataModule (their typed constructors are the schema); with
    ``run=False`` it only parses and builds (``argv`` then has no sub-command)."""
    import warnings

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

    from nft_lit.console import silence_noise

    silence_noise()
    # `nft-lit cli` hands LightningCLI its own argv minus the sub-command on purpose: nothing to act on.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    return RolloutCLI(
        PolicyModule,
        RolloutDataModule,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={**ROLLOUT_TRAINER_SETTINGS, "log_every_n_steps": 1},
    )


def command(argv: list[str]) -> int:
    """``nft-lit cli SUBCOMMAND ...``."""
    build(argv)
    return 0
