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

from nft_lit.evaluation import Evaluation, ProbeEntropy
from nft_lit.metrics import PROBE_ENTROPY, PROBE_ENTROPY_SEQUENCE_MEAN, PROBE_SECONDS, SECONDS_EVAL, val_metric

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

    With a ``probe`` (``eval.probe_size`` > 0) it also measures the policy's entropy on that fixed teacher-forced
    probe at the same times, after the benchmarks (``val/probe/entropy``, ``evaluation.ProbeEntropy``);
    ``seconds/eval`` covers both. Every rank runs the probe's forwards (an FSDP2 model needs them all); rank 0
    logs.
    """

    def __init__(
        self,
        evaluation: Evaluation,
        every_n_iterations: int = 1,
        at_start: bool = True,
        probe: ProbeEntropy | None = None,
    ) -> None:
        if every_n_iterations < 1:
            raise ValueError(f"eval.every_n_iterations must be >= 1, got {every_n_iterations}")
        self.evaluation = evaluation
        self.every_n_iterations = every_n_iterations
        self.at_start = at_start
        self.probe = probe
        self.history: list[dict[str, float]] = []
        self._iterations_done = 0

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        results = self.evaluation.run(pl_module.model)
        if self.probe is not None:  # logged under its own names (metrics.PROBE_*), not val/<key>
            probe = self.probe.measure(pl_module.model)
            results[PROBE_ENTROPY] = probe.token_mean
            results[PROBE_ENTROPY_SEQUENCE_MEAN] = probe.sequence_mean
            results[PROBE_SECONDS] = probe.seconds
        results[SECONDS_EVAL] = time.perf_counter() - started
        # iteration: how many iterations had trained when it ran (0 = the base policy, before training)
        self.history.append({"step": float(trainer.global_step), "iteration": float(self._iterations_done), **results})
        # Straight to the loggers at the current global step rather than through self.log(on_epoch=True):
        # Lightning would average the at-start evaluation with the end of iteration 0 into one point, and
        # the untrained policy's accuracy would never appear on its own. The results are already reduced
        # over ranks, so rank 0 writes them.
        logged_as_is = (SECONDS_EVAL, PROBE_ENTROPY, PROBE_ENTROPY_SEQUENCE_MEAN, PROBE_SECONDS)
        metrics = {k if k in logged_as_is else val_metric(k): v for k, v in results.items()}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})  # for callbacks/tests
        if trainer.is_global_zero:
            shown = ", ".join(
                f"{k} {v:.4f}" for k, v in results.items() if "avg@" in k or "pass@" in k or k == PROBE_ENTROPY
            )
            log.info("held-out evaluation at step %d: %s", trainer.global_step, shown)
            # "epoch" as Lightning's own logging adds it, and the step axis of the iteration's own end-of-epoch rows
            # (Lightning's batch count less one; not global_step, which an iteration without an optimizer step does
            # not advance): a resume keeps or drops these rows with their iteration (runs.kept_row, purge_step).
            step = max(trainer.fit_loop.epoch_loop._batches_that_stepped - 1, 0)
            for logger in trainer.loggers:
                logger.log_metrics(metrics | {"epoch": float(trainer.current_epoch)}, step=step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._iterations_done = trainer.current_epoch
        if self.at_start and trainer.current_epoch == 0:
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._iterations_done = trainer.current_epoch + 1
        if (trainer.current_epoch + 1) % self.every_n_iterations == 0:
            self._run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def held_out_summary(callbacks: list[Any]) -> list[tuple[str, float, str]]:
    """(metric, its newest value, when it was measured) for each avg@k/pass@k the run's ``HeldOutEvaluation``
    logged: a run whose last iteration was not evaluated shows its newest point with that point's iteration."""
    found = next((c for c in callbacks if isinstance(c, HeldOutEvaluation)), None)
    newest: dict[str, tuple[float, str]] = {}
    for entry in found.history if found is not None else []:
        done = entry.get("iteration")  # absent in histories restored from checkpoints of older versions
        when = (
            f"step {int(entry['step'])}"
            if done is None
            else "before training"
            if done == 0
            else f"iteration {int(done)}"
        )
        for key, value in entry.items():
            if "avg@" in key or "pass@" in key:
                newest[val_metric(key)] = (value, when)
    return [(name, value, when) for name, (value, when) in sorted(newest.items())]
