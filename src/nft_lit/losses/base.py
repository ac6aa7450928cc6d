"""The loss contract every policy loss shares: what goes in, what comes out, how the step reduces it.

- :class:`LossBatch` (with :func:`group_stats` / :func:`group_sizes`): the old log-probs, mask, rewards and whole-
  group statistics of a micro-batch, plus the counts of the whole optimizer step it belongs to;
- :class:`LossOutput` and :data:`Reduction`: the loss and its metrics, each metric declaring how the step combines
  it; :class:`StepMetrics` applies those reductions over the micro-batches of a step;
- exact aggregation (:func:`aggregate_rows`, :func:`aggregate`): every mode is a sum of per-answer terms over a
  normaliser of the whole step (docs/ALGORITHMS.md, "Aggregation");
- :class:`PolicyLoss`: the base class (input checks, the step aggregation) and the metric helpers the shipped
  losses share.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal, get_args

import torch
from torch import Tensor, nn

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum-constant"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


def group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and Bessel-corrected std of each answer's whole group, broadcast back to the answers.

    rewards [B] float, group_ids [B] int -> (group_mean [B], group_std [B]). For binary rewards the mean is
    r̂_q, the correctness rate of the question. A group of one answer has no unbiased std; it gets 0 (its
    advantage is 0 anyway).
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"group_stats: rewards and group_ids must both be 1-D of the same length, got "
            f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    rewards = rewards.to(torch.float64)  # float64: the std of near-identical rewards must not round to noise
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    sums = torch.zeros_like(counts).index_add_(0, inverse, rewards)
    mean = sums / counts
    centred_sq = (rewards - mean[inverse]) ** 2
    sq_sums = torch.zeros_like(counts).index_add_(0, inverse, centred_sq)
    var = torch.where(counts > 1, sq_sums / (counts - 1).clamp(min=1), torch.zeros_like(sq_sums))
    return mean[inverse].float(), var.sqrt()[inverse].float()


def group_sizes(group_ids: Tensor) -> Tensor:
    """Number of answers in each answer's group, [B] -> [B] (float, as stored in LossBatch.group_size)."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return counts[inverse].float()


@dataclass
class LossBatch:
    """Everything a loss needs besides the current log-probs.

    The ``num_*`` normalisers are counts over the whole optimizer step (every micro-batch on every rank); the
    training loop fills them in. Left as ``None`` they default to this batch's own counts, which is right when
    the batch *is* the whole step.
    """

    old_logprobs: Tensor  # [B, T] log π_old of the sampled tokens (temperature-scaled)
    response_mask: Tensor  # [B, T] 1 for response tokens, 0 for padding
    rewards: Tensor  # [B]
    group_ids: Tensor  # [B] answers of the same prompt share an id
    group_mean: Tensor  # [B] r̂_q (mean reward of the answer's whole group)
    group_std: Tensor  # [B] Bessel-corrected std of the whole group
    group_size: Tensor | None = None  # [B] K of the answer's group (InfoNCA checks groups are whole)
    ref_logprobs: Tensor | None = None  # [B, T] frozen reference policy, only for a KL penalty
    num_tokens: float | None = None  # response tokens in the optimizer step
    num_sequences: float | None = None  # answers in the optimizer step
    num_groups: float | None = None  # prompts (groups) in the optimizer step

    @classmethod
    def from_rewards(
        cls,
        old_logprobs: Tensor,
        response_mask: Tensor,
        rewards: Tensor,
        group_ids: Tensor,
        **kwargs: object,
    ) -> LossBatch:
        """Build a batch whose group statistics are computed from these rewards (the batch holds whole groups)."""
        mean, std = group_stats(rewards, group_ids)
        return cls(
            old_logprobs=old_logprobs,
            response_mask=response_mask,
            rewards=rewards,
            group_ids=group_ids,
            group_mean=mean,
            group_std=std,
            group_size=group_sizes(group_ids),
            **kwargs,  # type: ignore[arg-type]
        )

    def token_count(self) -> float:
        return float(self.response_mask.sum()) if self.num_tokens is None else float(self.num_tokens)

    def sequence_count(self) -> float:
        return float(self.rewards.numel()) if self.num_sequences is None else float(self.num_sequences)

    def group_count(self) -> float:
        return float(torch.unique(self.group_ids).numel()) if self.num_groups is None else float(self.num_groups)

    def to(self, device: torch.device | str) -> LossBatch:
        """A copy with every tensor field on ``device`` (the counts stay as they are)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **{name: t.to(device) for name, t in tensors.items()})


Reduction = Literal["sum", "token_mean", "min", "max"]
"""How a loss metric combines over the micro-batches and ranks of an optimizer step: ``sum`` (shares of the
step-normalised loss add up), ``token_mean`` (a per-micro-batch mean weighted by its response tokens: exact for
token means), ``min`` / ``max`` (extremes)."""


@dataclass
class LossOutput:
    loss: Tensor  # scalar
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached scalars, this micro-batch's values
    reductions: dict[str, Reduction] = field(default_factory=dict)  # one per metric: how the step combines it

    def __post_init__(self) -> None:
        undeclared = sorted(set(self.metrics) - set(self.reductions))
        if undeclared:
            raise ValueError(f"LossOutput: metrics {undeclared} declare no reduction (one of {get_args(Reduction)})")


class StepMetrics:
    """The loss metrics of one optimizer step on this rank, combined over its micro-batches by each metric's
    declared ``Reduction``. ``sums`` holds ``sum`` metrics and token-weighted ``token_mean`` metrics (divide by
    the step's tokens after the cross-rank sum); ``highs`` holds maxima, a minimum kept as −max(−x), so that
    one max-reduce over ranks serves both."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.highs: dict[str, Tensor] = {}
        self.reductions: dict[str, Reduction] = {}

    def add(self, out: LossOutput, tokens: Tensor) -> None:
        """Fold in one micro-batch's metrics; ``tokens`` is its number of response tokens."""
        for key, value in out.metrics.items():
            how = self.reductions[key] = out.reductions[key]
            if how in ("min", "max"):
                value = -value if how == "min" else value
                self.highs[key] = torch.maximum(self.highs[key], value) if key in self.highs else value
            else:
                term = value if how == "sum" else value * tokens
                self.sums[key] = self.sums.get(key, torch.zeros_like(term)) + term


def aggregate_rows(token_loss: Tensor, batch: LossBatch, agg: str, constant: float) -> Tensor:
    """Each answer's share of the step loss, [B, T] -> [B]; their sum is the loss (docs/ALGORITHMS.md, "Aggregation").

    Every mode is a sum of per-answer terms over a normaliser fixed for the whole optimizer step, which is
    what makes gradient accumulation and data parallelism exact. Returning the per-answer terms lets callers
    split the loss (positive/negative parts) without a second pass over the [B, T] tensor.
    """
    mask = batch.response_mask.to(token_loss.dtype)
    row_sums = torch.einsum("bt,bt->b", token_loss, mask)  # masked row sums without a [B, T] temporary
    if agg == "token-mean":
        return row_sums / max(batch.token_count(), 1.0)
    if agg == "seq-mean-token-mean":
        return row_sums / mask.sum(dim=-1).clamp(min=1.0) / max(batch.sequence_count(), 1.0)
    if agg == "seq-mean-token-sum-norm":
        return row_sums / (max(batch.sequence_count(), 1.0) * constant)
    if agg == "sum-constant":
        return row_sums / constant
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def aggregate(token_loss: Tensor, batch: LossBatch, agg: str, constant: float) -> Tensor:
    """Reduce a [B, T] token loss to the step-normalised scalar (see :func:`aggregate_rows`)."""
    return aggregate_rows(token_loss, batch, agg, constant).sum()


_RATIO_REDUCTIONS: dict[str, Reduction] = {"ratio/mean": "token_mean", "ratio/min": "min", "ratio/max": "max"}


def ratio_metrics(ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """``ratio/mean``, ``ratio/min``, ``ratio/max`` of ratio[mask] without materialising the boolean gather."""
    ratio = ratio.detach()
    count = mask.sum()
    if count == 0:
        zero = ratio.new_zeros(())
        return {"ratio/mean": zero, "ratio/min": zero, "ratio/max": zero}
    return {
        "ratio/mean": torch.where(mask, ratio, 0.0).sum() / count,
        "ratio/min": torch.where(mask, ratio, torch.inf).min(),
        "ratio/max": torch.where(mask, ratio, -torch.inf).max(),
    }


# How each metric of the shipped losses combines over a step (a loss of your own passes its own reductions).
_METRIC_REDUCTIONS: dict[str, Reduction] = {
    "loss/positive": "sum",
    "loss/negative": "sum",
    "loss/infonca": "sum",
    "loss/sft_nll": "sum",
    **_RATIO_REDUCTIONS,
    "ratio/seq_log_ratio_mean": "token_mean",
    "clip/neg_eps_frac": "token_mean",
    "clip/log_ratio_cap_frac": "token_mean",
    "clip/pos_floor_frac": "token_mean",
    "clip/high_frac": "token_mean",
    "clip/low_frac": "token_mean",
    "clip/dual_frac": "token_mean",
    "advantage/mean": "token_mean",
}


def metric_reductions(metrics: dict[str, Tensor]) -> dict[str, Reduction]:
    return {key: _METRIC_REDUCTIONS[key] for key in metrics}


def masked_fraction(flags: Tensor, mask: Tensor) -> Tensor:
    """Fraction of the masked positions where ``flags`` holds (count_nonzero: no int64 copy of the mask)."""
    return torch.count_nonzero(flags & mask) / torch.count_nonzero(mask).clamp(min=1)


class PolicyLoss(nn.Module):
    """Base class: input checks shared by every loss. Subclasses implement ``forward``.

    A new loss is this class plus a YAML in configs/algorithm (no registry): it declares what it needs of the
    data (``requires_binary_rewards``, ``requires_whole_groups``, checked at start by
    ``iteration.check_loss_fits``) and returns a ``LossOutput`` naming each metric's reduction.
    """

    requires_binary_rewards: bool = False
    requires_whole_groups: bool = False
    agg: str
    kl_coef: float = 0.0

    def _set_agg(self, agg: str, agg_constant: float) -> None:
        """Check and set the step aggregation shared by every loss."""
        if agg not in AGGREGATIONS:
            raise ValueError(f"{type(self).__name__}: agg must be one of {AGGREGATIONS}, got {agg!r}")
        if not agg_constant > 0:
            raise ValueError(f"{type(self).__name__}: agg_constant must be > 0, got {agg_constant}")
        self.agg = agg
        self.agg_constant = agg_constant

    def validate_batch(self, batch: LossBatch) -> None:
        """Raise ValueError naming the field when the batch cannot be trained on by this loss."""
        name = type(self).__name__
        b, t = batch.old_logprobs.shape
        if batch.response_mask.shape != (b, t):
            raise ValueError(f"{name}: response_mask {tuple(batch.response_mask.shape)} != old_logprobs {(b, t)}")
        for field_name in ("rewards", "group_ids", "group_mean", "group_std"):
            value = getattr(batch, field_name)
            if value.shape != (b,):
                raise ValueError(f"{name}: LossBatch.{field_name} must have shape ({b},), got {tuple(value.shape)}")
        if not torch.isfinite(batch.rewards).all():
            raise ValueError(f"{name}: LossBatch.rewards contains NaN/inf")
        if self.requires_binary_rewards:
            if not ((batch.rewards == 0) | (batch.rewards == 1)).all():
                bad = batch.rewards[(batch.rewards != 0) & (batch.rewards != 1)][:3].tolist()
                raise ValueError(
                    f"{name} needs binary rewards in {{0, 1}} (paper Eq. 10), got e.g. {bad}; "
                    "disable reward shaping (algorithm.overlong_buffer=null) for this algorithm"
                )
            r_hat = batch.group_mean
            if not ((r_hat > 0) & (r_hat < 1)).all():
                bad = r_hat[(r_hat <= 0) | (r_hat >= 1)][:3].tolist()
                raise ValueError(
                    f"{name} needs every group's correctness rate r̂_q strictly inside (0, 1) (the implicit "
                    f"negative policy divides by 1 − r̂_q), got e.g. {bad}; keep dynamic sampling on "
                    "(algorithm.dynamic_sampling=true) so all-correct and all-wrong groups are filtered"
                )
        if self.requires_whole_groups:
            if batch.group_size is None:
                raise ValueError(f"{name} needs LossBatch.group_size to check that every group is whole")
            present = group_sizes(batch.group_ids)
            if not torch.equal(present, batch.group_size.to(present.dtype)):
                raise ValueError(
                    f"{name} needs whole groups in every micro-batch: found groups with "
                    f"{present.unique().tolist()} answers, expected {batch.group_size.unique().tolist()}; "
                    "make micro_batch_size a multiple of K (algorithm.num_answers)"
                )
        if self.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError(f"{name}: kl_coef={self.kl_coef} > 0 needs LossBatch.ref_logprobs")
