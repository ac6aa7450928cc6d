"""RolloutDataModule: the Lightning adapter of the rollout iteration (one training epoch = one iteration).

It hands the framework-free stages their inputs and returns loaders; the stages themselves live in
``iteration.py`` (prompts, generate, score, filter) and ``steps.py`` (plan, batch, old log-probs). The policy
reaches them as an argument: ``train_dataloader`` asks the trainer for it once per iteration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

# Runtime imports (not TYPE_CHECKING): LightningCLI/jsonargparse read the constructor's type hints.
from nft_lit.data import Problem, ProblemSet
from nft_lit.distributed import all_gather_objects, rank_and_world
from nft_lit.evaluation import Benchmark, Evaluation
from nft_lit.iteration import PromptStream, RewardShaping, RolloutSettings, collect_groups
from nft_lit.rollout import SamplingParams, check_max_gap
from nft_lit.sampler import Sampler
from nft_lit.steps import (
    LogprobGap,
    StepBatch,
    StepLayout,
    build_steps,
    fill_old_logprobs,
    forward_is_deterministic,
    group_lengths,
    padding_fraction,
    plan_steps,
)

log = logging.getLogger(__name__)


# Trainer settings this loop depends on: a new train loader, i.e. a new rollout iteration, every epoch;
# rank-local rollouts (a distributed sampler would split them again); no sanity validation before the first
# rollout. configs/trainer/*.yaml and the LightningCLI entry set them; setup() checks the first.
ROLLOUT_TRAINER_SETTINGS: dict[str, Any] = {
    "reload_dataloaders_every_n_epochs": 1,
    "use_distributed_sampler": False,
    "num_sanity_val_steps": 0,
}


class RolloutDataModule(pl.LightningDataModule):
    """Generates, verifies, filters and batches one rollout iteration per epoch.

    Args:
        problems: training problems (``Problem`` records).
        sampler: engine + tokenizer + prompt template + verifier (shared with evaluation).
        sampling: sampling parameters of training rollouts (its ``seed`` is replaced per round); its
            temperature is also the log-prob temperature of training.
        prompts_per_step, num_answers, dynamic_sampling, gen_prompts_per_round, max_gen_rounds, strict,
            max_prompt_tokens, seed: see ``iteration.RolloutSettings``.
        overlong_buffer / overlong_penalty_factor: DAPO overlong reward shaping (off when buffer is None).
        num_mini_batches, micro_batch_size, whole_groups, max_tokens_per_micro_batch: see ``steps.StepLayout``.
        max_logprob_gap: fail when the mean |engine - trainer| log-prob gap exceeds this; "auto": a limit set
            by the engine's and policy's dtypes (``rollout.default_max_gap``); None only logs it.
        old_logprobs_from_forward: take the first optimizer step's logπ_old from its training forward
            (detached) instead of an extra pass: exact, since no update has happened since the rollout. Used
            only when the model has no dropout (a training forward then equals an eval one).
        val_benchmarks / val_batch_prompts: what Lightning's validation loop (``trainer.validate``, ``nft-lit
            cli validate``) evaluates, as ``val/<name>/avg@k``; None: no validation data.
    """

    def __init__(
        self,
        problems: ProblemSet | Sequence[Problem],
        sampler: Sampler,
        sampling: SamplingParams,
        prompts_per_step: int,
        num_answers: int,
        num_mini_batches: int = 1,
        micro_batch_size: int = 8,
        dynamic_sampling: bool = True,
        gen_prompts_per_round: int | None = None,
        max_gen_rounds: int = 10,
        strict: bool = False,
        overlong_buffer: int | None = None,
        overlong_penalty_factor: float = 1.0,
        max_prompt_tokens: int | None = None,
        whole_groups: bool = False,
        max_tokens_per_micro_batch: int | None = None,
        max_logprob_gap: float | str | None = "auto",
        old_logprobs_from_forward: bool = True,
        seed: int = 0,
        val_benchmarks: Sequence[Benchmark] | None = None,
        val_batch_prompts: int = 64,
    ) -> None:
        super().__init__()
        self.problems = list(problems)
        self.sampler = sampler
        self.sampling = sampling
        self.settings = RolloutSettings(
            prompts_per_step=prompts_per_step,
            num_answers=num_answers,
            dynamic_sampling=dynamic_sampling,
            gen_prompts_per_round=gen_prompts_per_round,
            max_gen_rounds=max_gen_rounds,
            strict=strict,
            shaping=RewardShaping(overlong_buffer, overlong_penalty_factor),
            max_prompt_tokens=max_prompt_tokens,
            seed=seed,
        )
        self.settings.check(sampling, world=1)
        self.layout = StepLayout(num_mini_batches, micro_batch_size, whole_groups, max_tokens_per_micro_batch)
        self.layout.check(prompts_per_step, num_answers)
        check_max_gap(max_logprob_gap, "datamodule.max_logprob_gap")
        self.max_logprob_gap = max_logprob_gap
        self.old_logprobs_from_forward = old_logprobs_from_forward
        self.stream = PromptStream(len(self.problems), seed)
        self.evaluation = Evaluation(list(val_benchmarks), sampler, val_batch_prompts) if val_benchmarks else None
        self.iteration = 0
        self._finished_iteration: int | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.trainer is not None and self.trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                f"trainer.reload_dataloaders_every_n_epochs={self.trainer.reload_dataloaders_every_n_epochs}:"
                " it must be 1, since every epoch is a new rollout iteration (generated in train_dataloader)"
            )
        self.settings.check(self.sampling, world=rank_and_world()[1])

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.stream.cursor, "iteration": self.iteration}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stream.cursor = int(state_dict["cursor"])
        self.iteration = int(state_dict["iteration"])
        # Checkpoints are written at the end of an iteration; on resume Lightning first sets up that
        # finished epoch again before moving on. It must not consume prompts (see train_dataloader).
        self._finished_iteration = self.iteration

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, StepBatch) else batch

    def _phase(self, name: str) -> None:
        # Shown by PhaseProgressBar (callbacks.py) when the trainer has one.
        bar = getattr(self.trainer, "progress_bar_callback", None)
        if hasattr(bar, "set_phase"):
            bar.set_phase(name)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is None:
            raise RuntimeError("RolloutDataModule.train_dataloader needs a trainer (it samples from the live model)")
        epoch = self.trainer.current_epoch
        if epoch == self._finished_iteration:
            # The iteration the resumed checkpoint closed: Lightning skips to the next epoch without
            # iterating this loader, so hand it an empty (no-op) step instead of generating.
            self._finished_iteration = None
            return _loader([StepBatch([])])
        self.iteration = epoch
        policy = self.trainer.lightning_module
        steps = self.rollout(policy.model, policy.response_logprobs, policy.device, self._phase)
        self._phase("train")
        return _loader(steps)

    def rollout(
        self,
        model: torch.nn.Module,
        logprob_fn: Callable[..., torch.Tensor],
        device: torch.device | str,
        on_phase: Callable[[str], None] = lambda phase: None,
    ) -> list[StepBatch]:
        """One iteration of the stages for ``model``: its optimizer steps, the first carrying the iteration's
        data-side metrics (``rollout/*`` and the ``seconds/*`` of each phase)."""
        started = time.perf_counter()
        on_phase("sync")
        sync_stats = self.sampler.sync(model)
        sync_seconds = time.perf_counter() - started
        on_phase("generate")
        groups, stats = collect_groups(
            self.problems, self.stream, self.sampler, self.sampling, self.settings, self.iteration
        )
        # The engine's own counters (sync/tensors, ...); its time is the phase's, measured here.
        stats.update({f"rollout/{k}": float(v) for k, v in sync_stats.items() if k != "sync/seconds"})
        stats["seconds/sync"] = sync_seconds
        on_phase("plan")
        planned = time.perf_counter()
        if groups:
            rank, world = rank_and_world()
            plan = plan_steps(len(groups), self.settings.num_answers, self.layout, world, group_lengths(groups))
            pad = self.sampler.tokenizer.pad_token_id
            pad = self.sampler.tokenizer.eos_token_id if pad is None else pad
            steps = build_steps(groups, plan, rank, self.settings.num_answers, pad, self.sampling.temperature)
            padding = all_gather_objects(padding_fraction(steps))
            measured = [p for p in padding if p is not None]
            if measured:
                stats["rollout/padding_fraction"] = sum(measured) / len(measured)
        else:
            # Nothing to learn from (e.g. every group all-wrong): one empty step keeps the run alive
            # (an empty epoch would end `fit`); the module skips it and rollout/kept_groups logs 0.
            log.warning(
                "iteration %d: no group kept after %d rounds; skipping the update",
                self.iteration,
                stats["rollout/gen_rounds"],
            )
            steps = [StepBatch([], temperature=self.sampling.temperature)]
        stats["seconds/plan"] = time.perf_counter() - planned
        on_phase("old-logprobs")
        old_started = time.perf_counter()
        # An engine with its own weights copy (vLLM) may run in another dtype than the policy: the gap names it.
        gap = LogprobGap(self.max_logprob_gap, (getattr(self.sampler.engine, "dtype", None), _dtype(model)))
        # Identical on every rank (same plan, same model): the gap's collective stays in step.
        first_from_forward = self.old_logprobs_from_forward and bool(steps[0].micro_batches)
        first_from_forward = first_from_forward and forward_is_deterministic(model)
        steps[0].old_logprobs_from_forward = first_from_forward
        was_training = model.training
        model.eval()
        try:
            fill_old_logprobs(steps, logprob_fn, device, gap)
        finally:
            model.train(was_training)
        if first_from_forward:
            steps[0].pending_gap = gap  # the module adds the first step's tokens, then finishes it
        else:
            value = gap.finish()
            if value is not None:  # not measured when nothing was kept: no value rather than a misleading 0
                stats["rollout/logprob_gap"] = value
        stats["seconds/old_logprobs"] = time.perf_counter() - old_started
        stats["seconds/rollout"] = time.perf_counter() - started
        stats["rollout/optimizer_steps"] = float(len(steps))
        steps[0].rollout_stats = stats
        return steps

    def val_dataloader(self) -> DataLoader | list:
        """One item, the ``Evaluation`` of ``val_benchmarks`` (run by ``PolicyModule.validation_step``)."""
        return _loader([self.evaluation]) if self.evaluation is not None else []


def _dtype(model: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _loader(items: list[Any]) -> DataLoader:
    return DataLoader(_ListDataset(items), batch_size=None, shuffle=False, collate_fn=_identity)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _identity(x: Any) -> Any:
    return x
