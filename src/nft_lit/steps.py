"""From kept groups to optimizer steps: plan, batch, old log-probs (docs/ALGORITHMS.md, "Data step").

    groups -> group statistics (whole groups) -> plan_steps (pure) -> build_steps -> fill_old_logprobs
    -> StepBatch (one optimizer step: its micro-batches, normalised by the counts of the whole step)

One ``StepBatch`` is one optimizer step on this rank. Every loss is normalised by the counts of the whole step
(``LossBatch.num_*``) across micro-batches and ranks, so summing micro-batch gradients is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from nft_lit.distributed import all_gather_objects
from nft_lit.iteration import Group
from nft_lit.losses import LossBatch, group_stats
from nft_lit.rollout import check_logprob_gap, logprob_gap, pad_left, pad_right

# (group index, answer index) of one answer of the iteration's kept groups.
Member = tuple[int, int]
# plan[step][rank] = that rank's micro-batches (lists of members) for that optimizer step.
Plan = list[list[list[list[Member]]]]
# logprob_fn(input_ids, attention_mask, prompt_len, temperature) -> response-token log-probs [B, T].
LogprobFn = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]


@dataclass
class MicroBatch:
    """Sequences of one forward/backward pass: left-padded prompt then right-padded response.

    The response occupies columns ``prompt_len:``; ``loss_batch`` carries the response-token tensors and
    the normalisers of the whole optimizer step. ``is_padding`` marks a zero-weight micro-batch that only
    exists so that every rank runs the same number of forwards (FSDP collectives).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    loss_batch: LossBatch
    engine_logprobs: torch.Tensor
    is_padding: bool = False

    def to(self, device: torch.device | str) -> MicroBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            engine_logprobs=self.engine_logprobs.to(device),
            loss_batch=self.loss_batch.to(device),
        )


@dataclass
class StepBatch:
    """One optimizer step (a mini-batch) on this rank.

    ``temperature`` is the sampling temperature of its answers: log-probs are ``log_softmax(logits / T)``
    for the old-log-prob pass and for training alike, so the rollout's sampling parameters are the one
    source of it. ``rollout_stats`` (first step of an iteration only) are the iteration's ``rollout/*``
    statistics, handed to the module for logging.
    """

    micro_batches: list[MicroBatch]
    temperature: float = 1.0
    rollout_stats: dict[str, float] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> StepBatch:
        return replace(self, micro_batches=[mb.to(device) for mb in self.micro_batches])


@dataclass(frozen=True)
class StepLayout:
    """How an iteration's answers are split into optimizer steps and micro-batches.

    Args:
        num_mini_batches: optimizer steps per iteration.
        micro_batch_size: sequences per forward/backward pass.
        whole_groups: keep each group's K answers in one micro-batch (group-level losses such as InfoNCA).
    """

    num_mini_batches: int = 1
    micro_batch_size: int = 8
    whole_groups: bool = False

    def __post_init__(self) -> None:
        if self.num_mini_batches < 1:
            raise ValueError(f"datamodule.num_mini_batches must be >= 1, got {self.num_mini_batches}")
        if self.micro_batch_size < 1:
            raise ValueError(f"datamodule.micro_batch_size must be >= 1, got {self.micro_batch_size}")

    def check(self, prompts_per_step: int, num_answers: int) -> None:
        if self.num_mini_batches > prompts_per_step * num_answers:
            raise ValueError(
                f"datamodule.num_mini_batches must be in [1, prompts_per_step*K={prompts_per_step * num_answers}],"
                f" got {self.num_mini_batches}"
            )
        if self.whole_groups and self.num_mini_batches > prompts_per_step:
            raise ValueError(
                f"datamodule.num_mini_batches={self.num_mini_batches} exceeds prompts_per_step={prompts_per_step}:"
                " this loss needs whole groups in each optimizer step"
            )


def plan_steps(num_groups: int, num_answers: int, layout: StepLayout, world: int) -> Plan:
    """Split the answers of ``num_groups`` groups into optimizer steps, ranks and micro-batches.

    Indivisible units are whole groups (``layout.whole_groups``) or single answers; steps get contiguous,
    near-equal runs of units; ranks take every ``world``-th unit of a step. Every rank gets the same number
    of micro-batches per step (missing ones are empty and become zero-weight padding), so the plan is the
    same on every rank and FSDP's collectives stay in step.
    """
    if layout.whole_groups:
        units = [[(g, j) for j in range(num_answers)] for g in range(num_groups)]
    else:
        units = [[(g, j)] for g in range(num_groups) for j in range(num_answers)]
    steps = min(layout.num_mini_batches, len(units))
    bounds = [round(s * len(units) / steps) for s in range(steps + 1)]
    plan: Plan = []
    for s in range(steps):
        step_units = units[bounds[s] : bounds[s + 1]]
        per_rank = []
        for r in range(world):
            mbs: list[list[Member]] = []
            for unit in step_units[r::world]:
                if mbs and len(mbs[-1]) + len(unit) <= layout.micro_batch_size:
                    mbs[-1].extend(unit)
                else:
                    mbs.append(list(unit))
            per_rank.append(mbs)
        most = max(len(m) for m in per_rank)
        plan.append([m + [[] for _ in range(most - len(m))] for m in per_rank])
    return plan


def _micro_batch(
    groups: list[Group],
    members: list[Member],
    stats: tuple[torch.Tensor, torch.Tensor],
    counts: dict[str, float],
    num_answers: int,
    pad_id: int,
) -> MicroBatch:
    group_mean, group_std = stats
    is_padding = not members
    if is_padding:
        # A one-token dummy keeps the forward (and FSDP's collectives) identical on every rank.
        members = [(0, 0)]
    responses = [groups[g].response_ids[j] for g, j in members]
    p_ids, p_mask = pad_left([groups[g].prompt_ids for g, _ in members], pad_id)
    r_ids = pad_right(responses, pad_id, torch.long)
    r_mask = pad_right([[1] * len(r) for r in responses], 0, torch.long)
    if is_padding:
        r_mask.zero_()
    flat = [g * num_answers + j for g, j in members]
    loss_batch = LossBatch(
        old_logprobs=torch.zeros(r_ids.shape, dtype=torch.float32),
        response_mask=r_mask.to(torch.float32),
        rewards=torch.tensor([groups[g].rewards[j] for g, j in members], dtype=torch.float32),
        group_ids=torch.tensor([g for g, _ in members], dtype=torch.long),
        group_mean=group_mean[flat],
        group_std=group_std[flat],
        group_size=torch.full((len(members),), float(num_answers)),
        ref_logprobs=None,
        num_tokens=counts["num_tokens"],
        num_sequences=counts["num_sequences"],
        num_groups=counts["num_groups"],
    )
    return MicroBatch(
        input_ids=torch.cat([p_ids, r_ids], dim=1),
        attention_mask=torch.cat([p_mask, r_mask], dim=1),
        prompt_len=p_ids.shape[1],
        loss_batch=loss_batch,
        engine_logprobs=pad_right([groups[g].engine_logprobs[j] for g, j in members], 0.0, torch.float32),
        is_padding=is_padding,
    )


def build_steps(
    groups: list[Group], plan: Plan, rank: int, num_answers: int, pad_id: int, temperature: float
) -> list[StepBatch]:
    """This rank's optimizer steps of ``plan`` (old log-probs not filled yet: ``fill_old_logprobs``)."""
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    ids = torch.arange(len(groups)).repeat_interleave(num_answers)
    # Statistics over the WHOLE group (all K answers), before any mini-batching.
    stats = group_stats(rewards, ids)
    steps = []
    for per_rank in plan:
        members = [m for mbs in per_rank for mb in mbs for m in mb]
        counts = {
            "num_tokens": float(sum(len(groups[g].response_ids[j]) for g, j in members)),
            "num_sequences": float(len(members)),
            "num_groups": float(len({g for g, _ in members})),
        }
        mbs = [_micro_batch(groups, mb, stats, counts, num_answers, pad_id) for mb in per_rank[rank]]
        steps.append(StepBatch(mbs, temperature=temperature))
    return steps


@torch.no_grad()
def fill_old_logprobs(
    steps: list[StepBatch],
    logprob_fn: LogprobFn,
    device: torch.device | str,
    max_gap: float | None = None,
    dtypes: tuple[torch.dtype | None, torch.dtype | None] | None = None,
) -> float | None:
    """Recompute logπ_old with the training model; returns the engine/trainer log-prob gap (all ranks), None
    when there was no response token to measure it on.

    ``logprob_fn`` is the policy's log-prob function (``PolicyModule.response_logprobs``); the caller puts
    the model in eval mode. A gap above ``max_gap`` raises ``LogprobGapError`` (a broken weight sync, or
    ``dtypes`` = (engine dtype, policy dtype) that differ, which the error then names).
    """
    gap_sum, tokens = 0.0, 0.0
    for step in steps:
        for mb in step.micro_batches:
            ids, mask_2d = mb.input_ids.to(device), mb.attention_mask.to(device)
            lp = logprob_fn(ids, mask_2d, mb.prompt_len, step.temperature).float().cpu()
            mask = mb.loss_batch.response_mask
            mb.loss_batch.old_logprobs = lp * mask
            n = float(mask.sum())
            if n > 0:
                gap_sum += logprob_gap(mb.engine_logprobs, lp, mask) * n
                tokens += n
    totals = all_gather_objects((gap_sum, tokens))
    all_tokens = sum(t for _, t in totals)
    if all_tokens == 0:
        return None
    gap = sum(s for s, _ in totals) / all_tokens
    check_logprob_gap(gap, max_gap, dtypes=dtypes)
    return gap
