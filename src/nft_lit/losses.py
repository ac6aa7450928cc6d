"""Policy losses: NFT (paper Eq. 10), RFT, GRPO (Eq. 3-4), Dr. GRPO, DAPO and InfoNCA (App. B).

One ``nn.Module`` per algorithm, each built by Hydra from ``configs/algorithm/<name>.yaml``. Every loss takes
the per-token log-probs of the response tokens under the current policy and a :class:`LossBatch`, and returns
a scalar already normalised by the counts of the *whole optimizer step* (all gradient-accumulation
micro-batches and all data-parallel ranks), so that summing the gradients of the micro-batches gives exactly
the gradient of the full mini-batch. Semantics and defaults: docs/ALGORITHMS.md (the authors' released
code and verl's DAPO recipe).

Shapes: ``B`` answers in the micro-batch, ``T`` response tokens (right-padded, ``response_mask`` marks real ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal, get_args

import torch
from torch import Tensor, nn

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum-constant"]
Omega = Literal["uniform", "dr_grpo", "grpo"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
OMEGAS: tuple[str, ...] = get_args(Omega)


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


def omega_weight(r_hat: Tensor, omega: str) -> Tensor:
    """Prompt weight ω(q) of Eq. 10 (paper Sec. 5.4): uniform 1, Dr. GRPO 1 − r̂, GRPO sqrt((1 − r̂)/r̂)."""
    if omega == "uniform":
        return torch.ones_like(r_hat)
    if omega == "dr_grpo":
        return 1.0 - r_hat
    if omega == "grpo":
        return torch.sqrt((1.0 - r_hat) / r_hat)
    raise ValueError(f"omega must be one of {OMEGAS}, got {omega!r}")


class _NFTTokenLogRatio(torch.autograd.Function):
    """Per-token log-likelihood ratio of Eq. 10 with its gradient computed in the forward pass.

    Value: log R_t for positive answers, λ·log max_v((1 − r̂R_t)/(1 − r̂), ε) for negative ones (Algorithm 1;
    λ = ``neg_weight``, 1 in the paper), with log R capped at ``log_ratio_cap``. max_v is the straight-through
    max: its value is max(x, ε) but its gradient is that of x, so d/dlogπ of the negative term is
    λ·(1/max(x, ε))·(−r̂/(1 − r̂))·R, never zero unless λ = 0.

    Fused by hand rather than left to autograd: the token loss is elementwise, so its derivative is one
    [B, T] factor; saving only that factor instead of every intermediate halves the loss's time and memory
    on large steps. It also avoids the literal log(x + (max(x, ε) − x).detach()) form, which cancels to
    log(0) in float32 when 1 − r̂R is large and negative (R up to e^10).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        raw_log_ratio: Tensor,  # [B, T] log π_θ − log π_old
        r_hat: Tensor,  # [B, 1]
        positive: Tensor,  # [B, 1] bool
        epsilon: float,
        log_ratio_cap: float,
        positive_ratio_floor: float,
        neg_weight: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        log_ratio = raw_log_ratio.clamp(max=log_ratio_cap)
        ratio = log_ratio.exp()
        slope = -r_hat / (1.0 - r_hat)  # ∂x/∂R of the implicit negative ratio x
        # (1 − r̂R)/(1 − r̂), evaluated so that it is exactly 1 at R = 1 (the loss is exactly 0 on-policy)
        neg_ratio = torch.mul(ratio, -r_hat).add_(1.0).div_(1.0 - r_hat)
        if neg_weight > 0:
            neg_clamped = neg_ratio.clamp(min=epsilon)
            neg_value = neg_clamped.log()
            neg_grad = neg_clamped.reciprocal_().mul_(ratio).mul_(slope)  # reuses the buffer
            if neg_weight != 1.0:  # λ scales value and gradient alike (the term is linear in λ)
                neg_value.mul_(neg_weight)
                neg_grad.mul_(neg_weight)
        else:  # λ = 0 (RFT): exact zeros, no pass over the negative branch
            neg_value, neg_grad = torch.zeros_like(ratio), torch.zeros_like(ratio)
        # written into the negative branch's buffers: the loss is elementwise, so aliasing is safe
        if positive_ratio_floor > 0:
            pos_clamped = ratio.clamp(min=positive_ratio_floor)
            value = torch.where(positive, pos_clamped.log(), neg_value, out=neg_value)
            grad_factor = torch.where(positive, ratio / pos_clamped, neg_grad, out=neg_grad)
        else:
            value = torch.where(positive, log_ratio, neg_value, out=neg_value)
            grad_factor = neg_grad.masked_fill_(positive, 1.0)
        if (raw_log_ratio > log_ratio_cap).any():  # the cap (rarely hit) has zero gradient
            grad_factor.mul_(raw_log_ratio <= log_ratio_cap)
        ctx.save_for_backward(grad_factor)
        ctx.mark_non_differentiable(ratio, neg_ratio)
        return value, ratio, neg_ratio

    @staticmethod
    def backward(ctx, grad_value: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (grad_factor,) = ctx.saved_tensors
        return grad_value * grad_factor, None, None, None, None, None, None


_RATIO_REDUCTIONS: dict[str, Reduction] = {"ratio/mean": "token_mean", "ratio/min": "min", "ratio/max": "max"}


def _ratio_metrics(ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
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


def _reductions(metrics: dict[str, Tensor]) -> dict[str, Reduction]:
    return {key: _METRIC_REDUCTIONS[key] for key in metrics}


def _masked_frac(flags: Tensor, mask: Tensor) -> Tensor:
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


class NFTLoss(PolicyLoss):
    """Negative-aware Fine-Tuning, paper Eq. 10 and Algorithm 1 (docs/ALGORITHMS.md, "NFT").

    ℓ_t = −ω(q)·[ r·log R_t + λ·(1 − r)·log max_v((1 − r̂_q R_t)/(1 − r̂_q), ε) ],  R_t = π_θ/π_old per token.

    Eq. 10 is λ = 1; λ is the released code's ``neg_weight`` (below).

    Positive answers do maximum likelihood on π_θ; negative answers do maximum likelihood on the implicit
    negative policy π⁻_θ = (π_old − r̂ π_θ)/(1 − r̂) (Eq. 7-8), whose ratio is clipped from below at ε with
    a straight-through gradient so the loss stays finite when r̂R > 1.

    Args:
        epsilon: ε, floor of the negative ratio (paper default 1.0; Fig. 10 ablates it).
        omega: ω(q) (Sec. 5.4): "uniform", "dr_grpo" (1 − r̂, default, Dr. GRPO-equivalent on-policy) or
            "grpo" (sqrt((1 − r̂)/r̂), GRPO-equivalent on-policy, Prop. 4.2).
        agg: aggregation over the optimizer step; agg_constant: the constant of the *-constant/-norm modes.
        log_ratio_cap: log R is clamped at this value before exp (released code: 10).
        r_hat_min, r_hat_max: r̂_q is clipped into this range before use (released code: [0.02, 0.98]).
        positive_ratio_floor: optional straight-through floor on positive ratios, bounding the positive
            weight 1/R at 1/floor (released code option; 0 = off).
        neg_weight: λ >= 0, multiplies the negative answers' token term (value and gradient) before
            aggregation. Not in the paper's Eq. 10 (which is λ = 1): it is the released code's ``neg_weight``
            option. 1.0 is NFT; 0.0 drops the negative term, leaving RFT-like positive-only likelihood (still
            weighted by ω(q), unlike :class:`RFTLoss`); the authors' 32B script suggests trying values in
            between (0.5). Negative answers count in the aggregation's normaliser whatever λ is.
    """

    requires_binary_rewards = True

    def __init__(
        self,
        epsilon: float = 1.0,
        omega: Omega = "dr_grpo",
        agg: Aggregation = "token-mean",
        agg_constant: float = 1000.0,
        log_ratio_cap: float = 10.0,
        r_hat_min: float = 0.02,
        r_hat_max: float = 0.98,
        positive_ratio_floor: float = 0.0,
        neg_weight: float = 1.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not epsilon > 0:
            raise ValueError(f"{name}: epsilon must be > 0 (log of the clipped ratio), got {epsilon}")
        if omega not in OMEGAS:
            raise ValueError(f"{name}: omega must be one of {OMEGAS}, got {omega!r}")
        if not 0 < r_hat_min <= r_hat_max < 1:
            raise ValueError(f"{name}: r_hat_min/r_hat_max must satisfy 0 < min <= max < 1, got {r_hat_min, r_hat_max}")
        if positive_ratio_floor < 0:
            raise ValueError(f"{name}: positive_ratio_floor must be >= 0, got {positive_ratio_floor}")
        if not 0 <= neg_weight < math.inf:  # also refuses NaN
            raise ValueError(
                f"{name}: neg_weight must be a finite number >= 0 (1 = NFT, 0 = no negative term), got {neg_weight}"
            )
        self._set_agg(agg, agg_constant)
        self.epsilon = epsilon
        self.omega = omega
        self.log_ratio_cap = log_ratio_cap
        self.r_hat_min = r_hat_min
        self.r_hat_max = r_hat_max
        self.positive_ratio_floor = positive_ratio_floor
        self.neg_weight = float(neg_weight)

    def forward(self, logprobs: Tensor, batch: LossBatch) -> LossOutput:
        self.validate_batch(batch)
        mask = batch.response_mask.bool()
        raw_log_ratio = logprobs - batch.old_logprobs  # [B, T]
        r_hat = batch.group_mean.clamp(self.r_hat_min, self.r_hat_max)[:, None]  # [B, 1]
        positive_rows = batch.rewards == 1  # [B]
        log_likelihood_ratio, ratio, neg_ratio = _NFTTokenLogRatio.apply(
            raw_log_ratio,
            r_hat,
            positive_rows[:, None],
            self.epsilon,
            self.log_ratio_cap,
            self.positive_ratio_floor,
            self.neg_weight,
        )
        rows = -self.prompt_weight(r_hat[:, 0]) * aggregate_rows(
            log_likelihood_ratio, batch, self.agg, self.agg_constant
        )
        loss = rows.sum()
        with torch.no_grad():
            pos_part = rows[positive_rows].sum()
            positive = positive_rows[:, None]
            metrics = {
                "loss/positive": pos_part,
                "loss/negative": loss.detach() - pos_part,
                **_ratio_metrics(ratio, mask),
                "clip/neg_eps_frac": _masked_frac(neg_ratio < self.epsilon, mask & ~positive),
                "clip/log_ratio_cap_frac": _masked_frac(raw_log_ratio > self.log_ratio_cap, mask),
            }
            if self.positive_ratio_floor > 0:
                metrics["clip/pos_floor_frac"] = _masked_frac(ratio < self.positive_ratio_floor, mask & positive)
        return LossOutput(loss, metrics, _reductions(metrics))

    def prompt_weight(self, r_hat: Tensor) -> Tensor:
        return omega_weight(r_hat, self.omega)


class RFTLoss(NFTLoss):
    """Rejection-sampling Fine-Tuning (paper App. B; docs/ALGORITHMS.md, "RFT"): NFT with the negative term
    zeroed (``neg_weight`` = 0) and ω(q) = 1.

    Negative answers still count in the token normaliser (as in the released code, which runs RFT as its NFT
    implementation with ``neg_weight`` 0) but carry exactly zero gradient.
    """

    def __init__(
        self,
        agg: Aggregation = "token-mean",
        agg_constant: float = 1000.0,
        log_ratio_cap: float = 10.0,
        r_hat_min: float = 0.02,
        r_hat_max: float = 0.98,
        positive_ratio_floor: float = 0.0,
    ) -> None:
        super().__init__(
            epsilon=1.0,
            omega="uniform",
            agg=agg,
            agg_constant=agg_constant,
            log_ratio_cap=log_ratio_cap,
            r_hat_min=r_hat_min,
            r_hat_max=r_hat_max,
            positive_ratio_floor=positive_ratio_floor,
            neg_weight=0.0,
        )


class GRPOLoss(PolicyLoss):
    """GRPO with DAPO's clip-higher (paper Eq. 3-4; docs/ALGORITHMS.md, "GRPO"):
    ℓ_t = −min(R_t A, clip(R_t, 1 − ε_low, 1 + ε_high) A).

    A = (r − mean_q)/(std_q + std_eps) with the Bessel-corrected std of the whole group; ``scale_by_std=False``
    gives Dr. GRPO's A = r − mean_q. Optional: dual clip (constant c > 1 bounding the loss of A < 0 tokens at
    −c·A, as in verl) and a k3 KL penalty to a frozen reference (``kl_coef``; the paper uses none).
    """

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        scale_by_std: bool = True,
        std_eps: float = 1e-6,
        agg: Aggregation = "token-mean",
        agg_constant: float = 1000.0,
        dual_clip: float | None = None,
        kl_coef: float = 0.0,
        log_ratio_cap: float = 20.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not 0 <= clip_low < 1:
            raise ValueError(f"{name}: clip_low must be in [0, 1), got {clip_low}")
        if not clip_high >= 0:
            raise ValueError(f"{name}: clip_high must be >= 0, got {clip_high}")
        if dual_clip is not None and not dual_clip > 1:
            raise ValueError(f"{name}: dual_clip must be > 1 (or null to disable), got {dual_clip}")
        if kl_coef < 0:
            raise ValueError(f"{name}: kl_coef must be >= 0, got {kl_coef}")
        self._set_agg(agg, agg_constant)
        self.clip_low = clip_low
        self.clip_high = clip_high
        self.scale_by_std = scale_by_std
        self.std_eps = std_eps
        self.dual_clip = dual_clip
        self.kl_coef = kl_coef
        self.log_ratio_cap = log_ratio_cap

    def advantages(self, batch: LossBatch) -> Tensor:
        """Group-normalised advantage per answer, [B] (Eq. 4; Dr. GRPO drops the std)."""
        centred = batch.rewards - batch.group_mean
        return centred / (batch.group_std + self.std_eps) if self.scale_by_std else centred

    def forward(self, logprobs: Tensor, batch: LossBatch) -> LossOutput:
        self.validate_batch(batch)
        mask = batch.response_mask.bool()
        adv = self.advantages(batch)  # [B]
        # clamp both ways as verl does: exp must not overflow, and the gradient still flows inside the cap
        log_ratio = (logprobs - batch.old_logprobs).clamp(-self.log_ratio_cap, self.log_ratio_cap)
        ratio = log_ratio.exp()  # [B, T]
        # −min(R·A, clip(R)·A) = −A·clamp(R, lower, upper) with per-answer bounds: A > 0 caps R at 1 + ε_high,
        # A < 0 floors it at 1 − ε_low (and dual clip caps it at c). One clamp instead of two products and a max.
        positive_adv, negative_adv = adv > 0, adv < 0
        no_bound = torch.full_like(adv, torch.inf)
        upper = torch.where(positive_adv, 1.0 + self.clip_high, no_bound)
        if self.dual_clip is not None:
            upper = torch.where(negative_adv, self.dual_clip, upper)
        lower = torch.where(negative_adv, 1.0 - self.clip_low, -no_bound)
        clipped_ratio = ratio.clamp(min=lower[:, None], max=upper[:, None])
        rows = -adv * aggregate_rows(clipped_ratio, batch, self.agg, self.agg_constant)
        if self.kl_coef > 0:
            assert batch.ref_logprobs is not None  # checked in validate_batch
            delta = batch.ref_logprobs - logprobs
            kl = delta.exp() - delta - 1.0  # k3 estimator, >= 0
            rows = rows + self.kl_coef * aggregate_rows(kl, batch, self.agg, self.agg_constant)
        loss = rows.sum()
        with torch.no_grad():
            pos_part = rows[positive_adv].sum()
            metrics = {
                "loss/positive": pos_part,
                "loss/negative": loss.detach() - pos_part,
                **_ratio_metrics(ratio, mask),
                "clip/high_frac": _masked_frac((ratio > 1.0 + self.clip_high) & positive_adv[:, None], mask),
                "clip/low_frac": _masked_frac((ratio < 1.0 - self.clip_low) & negative_adv[:, None], mask),
                "advantage/mean": adv.mean(),
            }
            if self.dual_clip is not None:
                metrics["clip/dual_frac"] = _masked_frac((ratio > self.dual_clip) & negative_adv[:, None], mask)
        return LossOutput(loss, metrics, _reductions(metrics))


class DrGRPOLoss(GRPOLoss):
    """Dr. GRPO: GRPO without the std division and with length-independent aggregation (sum / constant);
    docs/ALGORITHMS.md, "Dr. GRPO"."""

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        agg: Aggregation = "seq-mean-token-sum-norm",
        agg_constant: float = 3584.0,
        dual_clip: float | None = None,
        kl_coef: float = 0.0,
        log_ratio_cap: float = 20.0,
    ) -> None:
        super().__init__(
            clip_low=clip_low,
            clip_high=clip_high,
            scale_by_std=False,
            agg=agg,
            agg_constant=agg_constant,
            dual_clip=dual_clip,
            kl_coef=kl_coef,
            log_ratio_cap=log_ratio_cap,
        )


class DAPOLoss(GRPOLoss):
    """DAPO: GRPO's clipped objective with clip-higher (0.2 / 0.28) and token-mean over the whole step
    (docs/ALGORITHMS.md, "DAPO").

    Dynamic sampling and overlong reward shaping are data-side and live in the algorithm config; rewards may
    therefore be non-binary here.
    """


class InfoNCALoss(PolicyLoss):
    """InfoNCA (paper App. B; docs/ALGORITHMS.md, "InfoNCA"), the K-answer generalisation of DPO, plus an SFT
    stabiliser.

    Per prompt: soft labels y_k = r_k / Σ_i r_i, logits z_k = β Σ_t (log π_θ − log π_old) over answer k's
    tokens, loss −Σ_k y_k log softmax(z)_k, averaged over the step's groups. Groups without a correct answer
    have no label and contribute 0. The SFT term adds ``sft_weight`` × the NLL of the correct answers'
    tokens, reduced with ``agg``. With K = 2 and one correct answer this is exactly the DPO loss with π_old
    as the reference.
    """

    requires_whole_groups = True

    def __init__(
        self,
        beta: float = 0.1,
        sft_weight: float = 0.1,
        agg: Aggregation = "token-mean",
        agg_constant: float = 1000.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not beta > 0:
            raise ValueError(f"{name}: beta must be > 0, got {beta}")
        if sft_weight < 0:
            raise ValueError(f"{name}: sft_weight must be >= 0, got {sft_weight}")
        self._set_agg(agg, agg_constant)
        self.beta = beta
        self.sft_weight = sft_weight

    def forward(self, logprobs: Tensor, batch: LossBatch) -> LossOutput:
        self.validate_batch(batch)
        mask = batch.response_mask.to(logprobs.dtype)
        log_ratio = logprobs - batch.old_logprobs  # [B, T]
        seq_log_ratio = (log_ratio * mask).sum(dim=-1)  # [B]
        logits = self.beta * seq_log_ratio
        _, inverse = torch.unique(batch.group_ids, return_inverse=True)
        num_local_groups = int(inverse.max()) + 1
        # log-softmax within each group: subtract the group max for stability, then the group logsumexp
        group_max = torch.full((num_local_groups,), -math.inf, dtype=logits.dtype, device=logits.device)
        group_max = group_max.scatter_reduce(0, inverse, logits.detach(), reduce="amax")
        shifted = (logits - group_max[inverse]).exp()
        denom = torch.zeros(num_local_groups, dtype=logits.dtype, device=logits.device).index_add(0, inverse, shifted)
        log_softmax = logits - group_max[inverse] - denom.log()[inverse]  # [B]
        rewards = batch.rewards.to(logits.dtype)
        reward_sums = torch.zeros_like(denom).index_add(0, inverse, rewards)
        labels = torch.where(reward_sums[inverse] > 0, rewards / reward_sums[inverse].clamp(min=1e-12), 0.0)
        nca = -(labels * log_softmax).sum() / max(batch.group_count(), 1.0)

        correct = (batch.rewards > 0)[:, None].to(logprobs.dtype)
        sft = aggregate(-logprobs * correct, batch, self.agg, self.agg_constant)
        loss = nca + self.sft_weight * sft
        with torch.no_grad():
            metrics = {
                "loss/positive": self.sft_weight * sft.detach(),
                "loss/negative": nca.detach(),
                "loss/infonca": nca.detach(),
                "loss/sft_nll": sft.detach(),
                "ratio/seq_log_ratio_mean": seq_log_ratio.detach().mean(),
                **_ratio_metrics(log_ratio.exp(), batch.response_mask.bool()),
            }
        return LossOutput(loss, metrics, _reductions(metrics))
