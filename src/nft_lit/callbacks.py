"""Lightning callbacks of a run: the phase-aware progress bar and the in-training held-out evaluation.

Thin adapters: the evaluation itself is ``evaluation.Evaluation`` (framework-free), handed the policy here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from nft_lit.evaluation import Evaluation
from nft_lit.metrics import SECONDS_EVAL, val_metric

log = logging.getLogger(__name__)


class PhaseProgressBar(TQDMProgressBar):
    """TQDM bar whose description shows the iteration's phase (sync / generate / plan / old-logprobs / train).

    The data-side phases reach it through the iteration stage's phase hook: the front end that builds both
    hands over ``set_phase`` (``RolloutDataModule(on_phase=bar.set_phase)`` or ``datamodule.on_phase =
    bar.set_phase``); "train" it sets itself at each epoch start.
    """

    def set_phase(self, phase: str) -> None:
        bar = self._train_progress_bar
        if bar is not None and not bar.disable:
            bar.set_description(f"Iteration {self.trainer.current_epoch + 1}/{self.trainer.max_epochs} [{phase}]")
            bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.set_phase("train")


class HeldOutEvaluation(pl.Callback):
    """In-training evaluation every ``every_n_iterations`` iterations (and before the first when
    ``at_start``): logs ``val/<bench>/avg@k`` (and pass@k) against the global step.

    The ``evaluation``'s sampler is the one the training rollouts use, so it evaluates exactly the policy
    being trained (``pl_module.model``, handed to ``Evaluation.run``).
    """

    def __init__(self, evaluation: Evaluation, every_n_iterations: int = 1, at_start: bool = True) -> None:
        if every_n_iterations < 1:
            raise ValueError(f"eval.every_n_iterations must be >= 1, got {every_n_iterations}")
        self.evaluation = evaluation
        self.every_n_iterations = every_n_iterations
        self.at_start = at_start
        self.history: list[dict[str, float]] = []

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        results = self.evaluation.run(pl_module.model)
        results[SECONDS_EVAL] = time.perf_counter() - started
        self.history.append({"step": float(trainer.global_step), **results})
        # Straight to the loggers at the current global step rather than through self.log(on_epoch=True):
        # Lightning would average the at-start evaluation with the end of iteration 0 into one point, and
        # the untrained policy's accuracy would never appear on its own. The results are already reduced
        # over ranks, so rank 0 writes them.
        metrics = {k if k == SECONDS_EVAL else val_metric(k): v for k, v in results.items()}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})  # for callbacks/tests
        if trainer.is_global_zero:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if "avg@" in k or "pass@" in k)
            log.info("held-out evaluation at step %d: %s", trainer.global_step, shown)
            # "epoch" as Lightning's own logging adds it, so CSV rows line up with the per-iteration metrics
            for logger in trainer.loggers:
                logger.log_metrics(metrics | {"epoch": float(trainer.current_epoch)}, step=trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_start and trainer.current_epoch == 0:
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_iterations == 0:
            self._run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
