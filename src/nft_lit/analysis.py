"""Per-token gradient weights of the losses as functions of the likelihood ratio R (paper Prop. 4.1, Fig. 4, 9).

Prop. 4.1 writes every loss gradient as ∇θL = −Σ_t w_t ∇θR_t. :func:`gradient_weights` measures w by autograd
*through the real loss objects* (one single-token answer per ratio value), so the notebooks plot what training
actually computes; the closed forms below are the paper's, for drawing over them as a check.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from nft_lit.losses import LossBatch, PolicyLoss, omega_weight


def gradient_weights(
    loss: PolicyLoss,
    ratios: Tensor,
    reward: float,
    r_hat: float,
    group_std: float | None = None,
) -> Tensor:
    """w(R) = −∂L/∂R for a token with ratio R of an answer with this reward in a group with mean r̂.

    ratios [N] -> weights [N]. Each ratio is its own one-token answer and the loss is summed (not averaged)
    over them, so each weight is that token's own. ``group_std`` defaults to the population std sqrt(r̂(1 − r̂))
    of binary rewards, the convention of Prop. 4.1.
    """
    ratios = ratios.detach().to(torch.float64).reshape(-1)
    n = ratios.numel()
    old_logprobs = torch.full((n, 1), -1.0, dtype=torch.float64)
    logprobs = (old_logprobs + ratios.log()[:, None]).requires_grad_(True)
    std = math.sqrt(r_hat * (1.0 - r_hat)) if group_std is None else group_std
    batch = LossBatch(
        old_logprobs=old_logprobs,
        response_mask=torch.ones(n, 1, dtype=torch.float64),
        rewards=torch.full((n,), float(reward), dtype=torch.float64),
        group_ids=torch.arange(n),
        group_mean=torch.full((n,), float(r_hat), dtype=torch.float64),
        group_std=torch.full((n,), float(std), dtype=torch.float64),
        group_size=torch.ones(n, dtype=torch.float64),
    )
    # sum-constant with C = 1 turns the step loss into the plain sum of token losses, whatever loss.agg is;
    # set on a shallow copy so the caller's loss keeps its own aggregation.
    probe = copy.copy(loss)
    probe.agg, probe.agg_constant = "sum-constant", 1.0
    (grad,) = torch.autograd.grad(probe(logprobs, batch).loss, logprobs)
    # ∂L/∂R = ∂L/∂log π · ∂log π/∂R = ∂L/∂log π / R
    return -(grad[:, 0] / ratios).float()


def nft_weight_closed_form(ratios: Tensor, reward: int, r_hat: float, epsilon: float, omega: str) -> Tensor:
    """Paper Prop. 4.1(b) with a general ω(q): ω/R for positives, −ω·r̂/(1 − r̂)/max((1 − r̂R)/(1 − r̂), ε)."""
    w = float(omega_weight(torch.tensor(r_hat, dtype=torch.float64), omega))
    if reward == 1:
        return w / ratios
    neg_ratio = (1.0 - r_hat * ratios) / (1.0 - r_hat)
    return -w * r_hat / (1.0 - r_hat) / neg_ratio.clamp(min=epsilon)


def grpo_weight_closed_form(
    ratios: Tensor, reward: int, r_hat: float, clip_low: float, clip_high: float, scale_by_std: bool = True
) -> Tensor:
    """Paper Prop. 4.1(a): A⁺·1[R < 1 + ε_high] for positives, A⁻·1[R > 1 − ε_low] for negatives.

    A± uses the population std (as in the proposition); ``scale_by_std=False`` gives Dr. GRPO's A = r − r̂.
    """
    scale = math.sqrt(r_hat * (1.0 - r_hat)) if scale_by_std else 1.0
    if reward == 1:
        return (1.0 - r_hat) / scale * (ratios < 1.0 + clip_high).to(ratios.dtype)
    return -r_hat / scale * (ratios > 1.0 - clip_low).to(ratios.dtype)


def question_weight_totals(r_hat: Tensor, omega: str, group_size: int) -> tuple[Tensor, Tensor]:
    """On-policy total positive and negative gradient weight that one question receives (paper Fig. 9).

    With r̂K correct and (1 − r̂)K wrong answers at R = 1, NFT gives each correct token ω and each wrong token
    ω·r̂/(1 − r̂), so the totals are ω·r̂K and ω·r̂K: the question's positive and negative pushes balance.
    """
    w = omega_weight(r_hat, omega)
    positive = w * r_hat * group_size
    negative = w * r_hat / (1.0 - r_hat) * (1.0 - r_hat) * group_size
    return positive, negative
