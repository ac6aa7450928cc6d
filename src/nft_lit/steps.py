"""From kept groups to optimizer steps: plan, batch, old log-probs (docs/ALGORITHMS.md, "Data step").

    groups -> group statistics (whole groups) -> plan_steps (pure) -> build_steps -> fill_old_logprobs
    -> StepBatch (one optimizer step: its micro-batches, normalised by the counts of the whole step)

One ``StepBatch`` is one optimizer step on this rank. Every loss is normalised by the counts of the whole step
(``LossBatch.num_*``) across micro-batches and ranks, so summing micro-batch gradients is exact, whatever the
micro-batches hold: a fixed number of answers, or (``StepLayout.max_tokens_per_micro_batch``) answers of
similar length packed up to a token budget, as verl's dynamic batch size.

The first optimizer step of an iteration is exactly on-policy (no update has happened since the rollout), so
its old log-probs are the training forward's own, detached (``StepBatch.old_logprobs_from_forward``): the
old-log-prob pass only runs for the later steps.

``plan_iteration`` and ``iteration_old_logprobs`` are an iteration's plan and old-log-prob phases, as the
iteration stage (``driver.RolloutIteration``) runs them; benchmarks call them on synthetic groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from nft_lit.distributed import all_gather_objects, rank_and_world
from nft_lit.iteration import Group
from nft_lit.losses import LossBatch, group_stats
from nft_lit.rollout import check_logprob_gap, logprob_gap, pad_left, pad_right

# (group index, answer index) of one answer of the iteration's kept groups.
Member = tuple[int, int]
# plan[step][rank] = that rank's micro-batches (lists of members) for that optimizer step.
Plan = list[list[list[list[Member]]]]
# logprob_fn(input_ids, attention_mask, prompt_len, temperature) -> response-token log-probs [B, T].
LogprobFn = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]
# Per group: (prompt tokens, [response tokens of each answer]); what a token budget packs by.
GroupLengths = tuple[int, Sequence[int]]


class LogprobGap:
    """Mean |engine − trainer| log-prob over the response tokens of an iteration, accumulated on this rank
    (by the old-log-prob pass and by the on-policy first step's forward) and finished over all ranks.

    ``finish`` is a collective (every rank calls it once per iteration) and raises ``LogprobGapError`` above
    ``max_gap``; ``dtypes`` = (engine dtype, policy dtype) lets the error name a dtype difference.
    """

    def __init__(
        self, max_gap: float | None = None, dtypes: tuple[torch.dtype | None, torch.dtype | None] | None = None
    ) -> None:
        self.max_gap = max_gap
        self.dtypes = dtypes
        self.weighted_sum = 0.0
        self.tokens = 0.0

    def add(self, engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
        n = float(mask.sum())
        if n > 0:
            self.weighted_sum += (
                logprob_gap(engine_logprobs.cpu(), trainer_logprobs.detach().float().cpu(), mask.cpu()) * n
            )
            self.tokens += n

    def finish(self) -> float | None:
        """The gap over every rank's tokens (checked against ``max_gap``); None when no token was measured."""
        totals = all_gather_objects((self.weighted_sum, self.tokens))
        all_tokens = sum(t for _, t in totals)
        if all_tokens == 0:
            return None
        gap = sum(s for s, _ in totals) / all_tokens
        check_logprob_gap(gap, self.max_gap, dtypes=self.dtypes)
        return gap


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
    source of it. The iteration's statistics and its pending log-prob gap do not ride in the steps: the
    iteration stage returns them beside the steps (``driver.IterationResult``).
    """

    micro_batches: list[MicroBatch]
    temperature: float = 1.0
    # The first step of an iteration: logπ_old = the training forward's log-probs, detached (exact: no update
    # has happened since the rollout); the forward adds its engine gap (``take_old_logprobs``).
    old_logprobs_from_forward: bool = False

    def to(self, device: torch.device | str) -> StepBatch:
        return replace(self, micro_batches=[mb.to(device) for mb in self.micro_batches])

    def take_old_logprobs(self, mb: MicroBatch, logprobs: torch.Tensor, gap: LogprobGap | None = None) -> None:
        """logπ_old of ``mb`` = its training forward's ``logprobs`` (detached); their engine gap is added to
        ``gap`` (the iteration's pending one) when given."""
        mask = mb.loss_batch.response_mask
        mb.loss_batch.old_logprobs = logprobs.detach() * mask
        if gap is not None:
            gap.add(mb.engine_logprobs, logprobs, mask)


@dataclass(frozen=True)
class StepLayout:
    """How an iteration's answers are split into optimizer steps and micro-batches.

    Args:
        num_mini_batches: optimizer steps per iteration.
        micro_batch_size: sequences per forward/backward pass (without a token budget).
        whole_groups: keep each group's K answers in one micro-batch (group-level losses such as InfoNCA).
        max_tokens_per_micro_batch: token budget of a forward/backward pass, padding counted (rows x
            (longest prompt + longest response)); replaces ``micro_batch_size``. Each rank's answers of a step
            are sorted by length and packed up to it, so long and short answers are not padded to each other.
            An answer (or whole group) longer than the budget gets a micro-batch of its own. None: off.
    """

    num_mini_batches: int = 1
    micro_batch_size: int = 8
    whole_groups: bool = False
    max_tokens_per_micro_batch: int | None = None

    def __post_init__(self) -> None:
        if self.num_mini_batches < 1:
            raise ValueError(f"datamodule.num_mini_batches must be >= 1, got {self.num_mini_batches}")
        if self.micro_batch_size < 1:
            raise ValueError(f"datamodule.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        budget = self.max_tokens_per_micro_batch
        if budget is not None and not (isinstance(budget, int) and budget >= 1):
            raise ValueError(f"datamodule.max_tokens_per_micro_batch must be a positive int or null, got {budget!r}")

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


def plan_steps(
    num_groups: int,
    num_answers: int,
    layout: StepLayout,
    world: int,
    lengths: Sequence[GroupLengths] | None = None,
) -> Plan:
    """Split the answers of ``num_groups`` groups into optimizer steps, ranks and micro-batches.

    Indivisible units are whole groups (``layout.whole_groups``) or single answers; steps get contiguous,
    near-equal runs of units. Without a token budget, ranks take every ``world``-th unit of a step and fill
    micro-batches of ``micro_batch_size`` answers in order. With one (``lengths`` required), a step's units
    are sorted longest first before they are dealt to the ranks (similar work per rank) and each rank packs
    its run into micro-batches of similar lengths up to the budget (``_pack_by_tokens``). Every rank gets the
    same number of micro-batches per step (missing ones are empty and become zero-weight padding), so the
    plan is the same on every rank and FSDP's collectives stay in step.
    """
    budget = layout.max_tokens_per_micro_batch
    if budget is not None and (lengths is None or len(lengths) != num_groups):
        raise ValueError("plan_steps: a token budget (max_tokens_per_micro_batch) needs every group's lengths")
    if layout.whole_groups:
        units = [[(g, j) for j in range(num_answers)] for g in range(num_groups)]
    else:
        units = [[(g, j)] for g in range(num_groups) for j in range(num_answers)]
    steps = min(layout.num_mini_batches, len(units))
    bounds = [round(s * len(units) / steps) for s in range(steps + 1)]
    plan: Plan = []
    for s in range(steps):
        step_units = units[bounds[s] : bounds[s + 1]]
        if budget is not None:
            assert lengths is not None
            # Longest first (stable): the largest micro-batch runs first, so a memory peak shows at once.
            step_units = sorted(step_units, key=lambda u: -sum(_unit_widths(u, lengths)))
        per_rank = []
        for r in range(world):
            mine = step_units[r::world]
            if budget is None:
                per_rank.append(_pack_by_count(mine, layout.micro_batch_size))
            else:
                assert lengths is not None
                per_rank.append(_pack_by_tokens(mine, lengths, budget))
        most = max(len(m) for m in per_rank)
        plan.append([m + [[] for _ in range(most - len(m))] for m in per_rank])
    return plan


def _unit_widths(unit: list[Member], lengths: Sequence[GroupLengths]) -> tuple[int, int]:
    """(longest prompt, longest response) of a unit: the columns it needs in a padded micro-batch."""
    return (
        max(lengths[g][0] for g, _ in unit),
        max(max(lengths[g][1][j], 1) for g, j in unit),  # an empty response still takes one padded column
    )


def _pack_by_count(units: list[list[Member]], size: int) -> list[list[Member]]:
    mbs: list[list[Member]] = []
    for unit in units:
        if mbs and len(mbs[-1]) + len(unit) <= size:
            mbs[-1].extend(unit)
        else:
            mbs.append(list(unit))
    return mbs


def _pack_by_tokens(units: list[list[Member]], lengths: Sequence[GroupLengths], budget: int) -> list[list[Member]]:
    """Split length-sorted units into contiguous micro-batches of at most ``budget`` padded tokens (rows x
    (longest prompt + longest response)), minimising the padded tokens computed plus ``budget / 8`` per
    micro-batch (dynamic programming over the split points).

    The per-micro-batch charge stands for a forward's fixed cost: a split is made only where it saves that
    much padding. Greedy filling instead pads the few long answers of a long tail to each other (16% padding
    where this gives 4%, tests/test_steps.py's long-tail case)."""
    overhead = budget / 8
    widths = [_unit_widths(u, lengths) for u in units]
    # cost[j]: the cheapest packing of units[:j]; start[j]: where its last micro-batch starts.
    cost = [0.0] + [math.inf] * len(units)
    start = [0] * (len(units) + 1)
    for j in range(1, len(units) + 1):
        prompt_width = response_width = rows = 0
        for i in range(j - 1, -1, -1):  # micro-batch units[i:j], growing to the left (longer answers)
            prompt_width, response_width = max(prompt_width, widths[i][0]), max(response_width, widths[i][1])
            rows += len(units[i])
            padded = rows * (prompt_width + response_width)
            if padded > budget and i < j - 1:
                break  # wider and taller from here on; a single oversized unit is allowed alone
            if cost[i] + padded + overhead < cost[j]:
                cost[j], start[j] = cost[i] + padded + overhead, i
    mbs: list[list[Member]] = []
    j = len(units)
    while j > 0:
        mbs.append([m for unit in units[start[j] : j] for m in unit])
        j = start[j]
    return mbs[::-1]


def group_lengths(groups: Sequence[Group]) -> list[GroupLengths]:
    """What ``plan_steps`` packs by: each group's prompt length and response lengths."""
    return [(len(g.prompt_ids), [len(r) for r in g.response_ids]) for g in groups]


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


def plan_iteration(
    groups: list[Group], num_answers: int, layout: StepLayout, pad_id: int, temperature: float
) -> tuple[list[StepBatch], float | None]:
    """The plan phase of an iteration: this rank's optimizer steps of the kept ``groups`` (``plan_steps`` over
    every rank, then ``build_steps``) and their padding fraction averaged over the ranks that computed one
    (None when none did). No group: one empty step, which the module skips (an empty epoch would end ``fit``).
    Every rank calls it (a collective)."""
    if not groups:
        return [StepBatch([], temperature=temperature)], None
    rank, world = rank_and_world()
    plan = plan_steps(len(groups), num_answers, layout, world, group_lengths(groups))
    steps = build_steps(groups, plan, rank, num_answers, pad_id, temperature)
    measured = [p for p in all_gather_objects(padding_fraction(steps)) if p is not None]
    return steps, (sum(measured) / len(measured) if measured else None)


def padding_fraction(steps: Sequence[StepBatch]) -> float | None:
    """Padded share of the token positions the forwards compute (prompt and response padding, this rank's
    real micro-batches); None when there are none."""
    computed = real = 0
    for step in steps:
        for mb in step.micro_batches:
            if not mb.is_padding:
                computed += mb.attention_mask.numel()
                real += int(mb.attention_mask.sum())
    return None if computed == 0 else 1.0 - real / computed


def forward_is_deterministic(model: nn.Module) -> bool:
    """Whether a training-mode forward gives the eval-mode log-probs, i.e. no dropout anywhere: then the
    first step's old log-probs may come from its training forward (``StepBatch.old_logprobs_from_forward``)."""
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        value = getattr(config, key, 0.0)
        if isinstance(value, (int, float)) and value > 0:
            return False
    return not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


@torch.no_grad()
def fill_old_logprobs(
    steps: list[StepBatch],
    logprob_fn: LogprobFn,
    device: torch.device | str,
    gap: LogprobGap | None = None,
) -> LogprobGap:
    """Recompute logπ_old with the training model for every step not marked ``old_logprobs_from_forward``;
    returns ``gap`` (a new ``LogprobGap`` if None) with their engine/trainer differences added.

    ``logprob_fn`` is the policy's log-prob function (``PolicyModule.response_logprobs``); the caller puts
    the model in eval mode and calls ``gap.finish()`` (all ranks) once every step's tokens are in.
    """
    gap = LogprobGap() if gap is None else gap
    for step in steps:
        if step.old_logprobs_from_forward:
            continue
        for mb in step.micro_batches:
            ids, mask_2d = mb.input_ids.to(device), mb.attention_mask.to(device)
            lp = logprob_fn(ids, mask_2d, mb.prompt_len, step.temperature).float().cpu()
            mask = mb.loss_batch.response_mask
            mb.loss_batch.old_logprobs = lp * mask
            gap.add(mb.engine_logprobs, lp, mask)
    return gap


def iteration_old_logprobs(
    steps: list[StepBatch],
    model: nn.Module,
    logprob_fn: LogprobFn,
    device: torch.device | str,
    gap: LogprobGap,
    first_from_forward: bool = True,
) -> bool:
    """The old-log-prob phase of an iteration: logπ_old of every step, their engine gap added to ``gap``.

    The first step takes its own from its training forward when ``first_from_forward`` allows it, it has
    answers and the model has no dropout (``forward_is_deterministic``): it is marked
    ``old_logprobs_from_forward`` and skipped here. The others are recomputed in eval mode (the model's mode is
    restored). Returns whether the first step was marked: then ``gap`` still lacks that step's tokens, which its
    training forward adds (``StepBatch.take_old_logprobs``) before the gap is finished; otherwise the caller
    finishes it now. The same on every rank (same plan, same model), so ``gap.finish`` stays in step.
    """
    first = first_from_forward and bool(steps[0].micro_batches) and forward_is_deterministic(model)
    steps[0].old_logprobs_from_forward = first
    was_training = model.training
    model.eval()
    try:
        fill_old_logprobs(steps, logprob_fn, device, gap)
    finally:
        model.train(was_training)
    return first
