"""RolloutDataModule: the Lightning adapter of the rollout iteration (one training epoch = one iteration).

The iteration itself is the framework-free stage ``driver.RolloutIteration`` (sync, generate, score, filter,
plan, batch, old log-probs), built here from the DataModule's typed arguments (the Hydra ``datamodule`` node
and LightningCLI's ``data``). This adapter only hands it the policy, read from the trainer once per iteration
in ``train_dataloader``, passes the iteration's statistics and pending log-prob gap to the policy
(``PolicyModule.begin_iteration``) and the optimizer steps to Lightning, one per loader item.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

# Runtime imports (not TYPE_CHECKING): LightningCLI/jsonargparse read the constructor's type hints.
from nft_lit.data import Problem, ProblemSet
from nft_lit.distributed import rank_and_world
from nft_lit.driver import RolloutIteration, no_phase
from nft_lit.evaluation import Benchmark, Evaluation
from nft_lit.iteration import PromptStream, RewardShaping, RolloutSettings
from nft_lit.rollout import SamplingParams
from nft_lit.sampler import Sampler
from nft_lit.steps import StepBatch, StepLayout

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
        max_logprob_gap, old_logprobs_from_forward: see ``driver.RolloutIteration``.
        val_benchmarks / val_batch_prompts: what Lightning's validation loop (``trainer.validate``, ``nft-lit
            cli validate``) evaluates, as ``val/<name>/avg@k``; None: no validation data.
        on_phase: told of each phase of an iteration ("sync", "generate", "plan", "old-logprobs", then "train"),
            e.g. ``PhaseProgressBar.set_phase``; settable later (``datamodule.on_phase = ...``); None: not shown.
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
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        settings = RolloutSettings(
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
        layout = StepLayout(num_mini_batches, micro_batch_size, whole_groups, max_tokens_per_micro_batch)
        self.stage = RolloutIteration(
            problems, sampler, sampling, settings, layout, max_logprob_gap, old_logprobs_from_forward, on_phase
        )
        self.evaluation = Evaluation(list(val_benchmarks), sampler, val_batch_prompts) if val_benchmarks else None
        self.iteration = 0
        self._finished_iteration: int | None = None

    # The stage's inputs, read by the front ends (``check_loss_fits``) and tests.
    @property
    def sampler(self) -> Sampler:
        return self.stage.sampler

    @property
    def sampling(self) -> SamplingParams:
        return self.stage.sampling

    @property
    def settings(self) -> RolloutSettings:
        return self.stage.settings

    @property
    def layout(self) -> StepLayout:
        return self.stage.layout

    @property
    def stream(self) -> PromptStream:
        return self.stage.stream

    @property
    def on_phase(self) -> Callable[[str], None]:
        """The phase hook (``driver.PhaseHook``) of the iteration stage."""
        return self.stage.on_phase

    @on_phase.setter
    def on_phase(self, hook: Callable[[str], None] | None) -> None:
        self.stage.on_phase = hook or no_phase

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.trainer is not None and self.trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                f"trainer.reload_dataloaders_every_n_epochs={self.trainer.reload_dataloaders_every_n_epochs}:"
                " it must be 1, since every epoch is a new rollout iteration (generated in train_dataloader)"
            )
        self.stage.check_world(rank_and_world()[1])

    def state_dict(self) -> dict[str, Any]:
        return {**self.stage.state_dict(), "iteration": self.iteration}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage.load_state_dict(state_dict)
        self.iteration = int(state_dict["iteration"])
        # Checkpoints are written at the end of an iteration; on resume Lightning first sets up that
        # finished epoch again before moving on. It must not consume prompts (see train_dataloader).
        self._finished_iteration = self.iteration

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, StepBatch) else batch

    def train_dataloader(self) -> DataLoader:
        """This epoch's rollout iteration (``RolloutIteration.run``) for the policy being trained, the one
        place the package reads it from the trainer; its statistics and pending log-prob gap go to the policy
        (``PolicyModule.begin_iteration``), its optimizer steps into the loader."""
        if self.trainer is None:
            raise RuntimeError("RolloutDataModule.train_dataloader needs a trainer (it samples from the live model)")
        epoch = self.trainer.current_epoch
        if epoch == self._finished_iteration:
            # The iteration the resumed checkpoint closed: Lightning skips to the next epoch without
            # iterating this loader, so hand it an empty (no-op) step instead of generating.
            self._finished_iteration = None
            return step_loader([StepBatch([])])
        self.iteration = epoch
        policy = self.trainer.lightning_module
        result = self.stage.run(policy.model, policy.response_logprobs, policy.device, self.iteration)
        policy.begin_iteration(result.stats, result.pending_gap)
        self.stage.on_phase("train")
        return step_loader(result.steps)

    def val_dataloader(self) -> DataLoader | list:
        """One item, the ``Evaluation`` of ``val_benchmarks`` (run by ``PolicyModule.validation_step``)."""
        return step_loader([self.evaluation]) if self.evaluation is not None else []


def step_loader(items: Sequence[Any]) -> DataLoader:
    """A loader of ``items`` one per batch, in order and unchanged (no collation, no sampler): the optimizer
    steps (``StepBatch``) of an iteration, or one ``Evaluation``."""
    return DataLoader(_ListDataset(list(items)), batch_size=None, shuffle=False, collate_fn=_identity)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _identity(x: Any) -> Any:
    return x
