"""NFT (paper Eq. 10, Algorithm 1) and RFT (App. B): likelihood on the positive answers and, for NFT, on the
implicit negative policy of the negative ones (docs/ALGORITHMS.md, "NFT", "RFT").

The prompt weight ω(q) of Eq. 10 (Sec. 5.4) lives here too: :func:`omega_weight`, also used by
``analysis.gradient_weights`` (paper Fig. 4).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from nft_lit.losses.base import (
    Aggregation,
    LossBatch,
    LossOutput,
    PolicyLoss,
    aggregate_rows,
    masked_fraction,
    metric_reductions,
    ratio_metrics,
)

Omega = Literal["uniform", "dr_grpo", "grpo"]
OMEGAS: tuple[str, ...] = get_args(Omega)


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
                **ratio_metrics(ratio, mask),
                "clip/neg_eps_frac": masked_fraction(neg_ratio < self.epsilon, mask & ~positive),
                "clip/log_ratio_cap_frac": masked_fraction(raw_log_ratio > self.log_ratio_cap, mask),
            }
            if self.positive_ratio_floor > 0:
                metrics["clip/pos_floor_frac"] = masked_fraction(ratio < self.positive_ratio_floor, mask & positive)
        return LossOutput(loss, metrics, metric_reductions(metrics))

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
