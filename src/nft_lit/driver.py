"""One rollout iteration as a framework-free stage (docs/ARCHITECTURE.md, "One rollout iteration"):

    Sampler.sync -> collect_groups (generate, verify, shape, filter) -> plan_iteration -> iteration_old_logprobs
    -> IterationResult (this rank's optimizer steps, the iteration's statistics, the pending log-prob gap)

``RolloutIteration`` owns what an iteration needs besides the policy: the problems, the sampler, the sampling
parameters, the data-side rules (``RolloutSettings``, ``StepLayout``, the gap limit) and the resumable prompt
stream. The policy comes in as arguments of ``run`` (model, log-prob function, device), so the Lightning
adapter (``datamodule.RolloutDataModule``), a benchmark or a notebook call the same code. Every rank calls
``run`` (collectives inside) and gets the same groups, plan and statistics.

Phases are announced through ``on_phase`` ("sync", "generate", "plan", "old-logprobs"), e.g. to a progress bar
(``callbacks.PhaseProgressBar.set_phase``); by default nobody listens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nft_lit import metrics as m
from nft_lit.iteration import PromptStream, RolloutSettings, collect_groups
from nft_lit.rollout import SamplingParams, check_max_gap, model_dtype
from nft_lit.sampler import HasQuestionAndAnswer, Sampler
from nft_lit.steps import LogprobFn, LogprobGap, StepBatch, StepLayout, iteration_old_logprobs, plan_iteration

log = logging.getLogger(__name__)

# on_phase(phase): told when an iteration enters a phase ("sync", "generate", "plan", "old-logprobs").
PhaseHook = Callable[[str], None]


def no_phase(phase: str) -> None:
    """The default ``on_phase``: phases are not shown anywhere."""


@dataclass
class IterationResult:
    """What one rollout iteration hands to training.

    Attributes:
        steps: this rank's optimizer steps, at least one (an empty step when no group was kept: the module
            skips it, and an empty epoch would end ``fit``).
        stats: the iteration's data-side metrics under their logged names (``metrics.py``: ``rollout/*``,
            ``seconds/*``), the same on every rank.
        pending_gap: the engine/trainer log-prob gap when the first step takes logπ_old from its training
            forward (``steps[0].old_logprobs_from_forward``): that forward adds its tokens, then the gap is
            finished (a collective, on every rank) before the first optimizer step
            (``PolicyModule.begin_iteration``). None when it was finished here, in which case ``stats`` holds
            ``rollout/logprob_gap`` (unless no token was measured).
    """

    steps: list[StepBatch]
    stats: dict[str, float]
    pending_gap: LogprobGap | None = None


class RolloutIteration:
    """The iteration driver: generates, verifies, filters and batches one rollout iteration per ``run``.

    Args:
        problems: training problems (anything with ``question`` and ``answer``).
        sampler: engine + tokenizer + prompt template + verifier (shared with evaluation).
        sampling: sampling parameters of training rollouts (its ``seed`` is replaced per round); its
            temperature is also the log-prob temperature of training.
        settings: how an iteration collects its groups (``iteration.RolloutSettings``; its ``seed`` also seeds
            the prompt order).
        layout: how the kept answers become optimizer steps and micro-batches (``steps.StepLayout``).
        max_logprob_gap: fail when the mean |engine - trainer| log-prob gap exceeds this; "auto": a limit set
            by the engine's and policy's dtypes (``rollout.default_max_gap``); None only logs it.
        old_logprobs_from_forward: take the first optimizer step's logπ_old from its training forward
            (detached) instead of an extra pass: exact, since no update has happened since the rollout. Used
            only when the model has no dropout (a training forward then equals an eval one).
        on_phase: told of each phase as the iteration enters it (``PhaseHook``); None: ``no_phase``.

    Resume state: the prompt stream's cursor (``state_dict``); a resumed run re-uses and skips no prompt.
    """

    def __init__(
        self,
        problems: Sequence[HasQuestionAndAnswer],
        sampler: Sampler,
        sampling: SamplingParams,
        settings: RolloutSettings,
        layout: StepLayout,
        max_logprob_gap: float | str | None = "auto",
        old_logprobs_from_forward: bool = True,
        on_phase: PhaseHook | None = None,
    ) -> None:
        settings.check(sampling, world=1)
        layout.check(settings.prompts_per_step, settings.num_answers)
        check_max_gap(max_logprob_gap, "datamodule.max_logprob_gap")
        self.problems = list(problems)
        self.sampler = sampler
        self.sampling = sampling
        self.settings = settings
        self.layout = layout
        self.max_logprob_gap = max_logprob_gap
        self.old_logprobs_from_forward = old_logprobs_from_forward
        self.on_phase: PhaseHook = on_phase or no_phase
        self.stream = PromptStream(len(self.problems), settings.seed)

    def check_world(self, world: int) -> None:
        """The rules that depend on the number of ranks (``RolloutSettings.check``), once it is known."""
        self.settings.check(self.sampling, world=world)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.stream.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.cursor = int(state["cursor"])

    def run(
        self, model: torch.nn.Module, logprob_fn: LogprobFn, device: torch.device | str, iteration: int
    ) -> IterationResult:
        """Iteration ``iteration`` (it seeds the generation rounds) for the policy ``model``, whose log-prob
        function ``logprob_fn`` (``PolicyModule.response_logprobs``) computes logπ_old on ``device``."""
        started = time.perf_counter()
        self.on_phase("sync")
        sync_stats = self.sampler.sync(model)
        sync_seconds = time.perf_counter() - started
        self.on_phase("generate")
        groups, stats = collect_groups(
            self.problems, self.stream, self.sampler, self.sampling, self.settings, iteration
        )
        # The engine's own counters (sync/tensors, ...); its time is the phase's, measured here.
        stats.update({m.engine_metric(k): float(v) for k, v in sync_stats.items() if k != "sync/seconds"})
        stats[m.SECONDS_SYNC] = sync_seconds
        self.on_phase("plan")
        planned = time.perf_counter()
        if not groups:  # e.g. every group all-wrong: plan_iteration's empty step; rollout/kept_groups logs 0
            log.warning(
                "iteration %d: no group kept after %d rounds; skipping the update", iteration, stats[m.GEN_ROUNDS]
            )
        steps, padding = plan_iteration(
            groups, self.settings.num_answers, self.layout, self._pad_id(), self.sampling.temperature
        )
        if padding is not None:
            stats[m.PADDING_FRACTION] = padding
        stats[m.SECONDS_PLAN] = time.perf_counter() - planned
        self.on_phase("old-logprobs")
        pending = self._old_logprobs(steps, model, logprob_fn, device, stats)
        stats[m.SECONDS_ROLLOUT] = time.perf_counter() - started
        stats[m.OPTIMIZER_STEPS] = float(len(steps))
        return IterationResult(steps, stats, pending)

    def _pad_id(self) -> int:
        tokenizer = self.sampler.tokenizer
        return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    def _old_logprobs(
        self,
        steps: list[StepBatch],
        model: torch.nn.Module,
        logprob_fn: LogprobFn,
        device: torch.device | str,
        stats: dict[str, float],
    ) -> LogprobGap | None:
        """logπ_old of ``steps``; the gap pending on the first step's training forward, or None once finished
        here (its value in ``stats``)."""
        started = time.perf_counter()
        # An engine with its own weights copy (vLLM) may run in another dtype than the policy: the gap names it.
        gap = LogprobGap(self.max_logprob_gap, (getattr(self.sampler.engine, "dtype", None), model_dtype(model)))
        pending = iteration_old_logprobs(steps, model, logprob_fn, device, gap, self.old_logprobs_from_forward)
        if not pending:
            value = gap.finish()
            if value is not None:  # not measured when nothing was kept: no value rather than a misleading 0
                stats[m.LOGPROB_GAP] = value
        stats[m.SECONDS_OLD_LOGPROBS] = time.perf_counter() - started
        return gap if pending else None
