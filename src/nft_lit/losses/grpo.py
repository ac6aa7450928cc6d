"""The GRPO family: GRPO with clip-higher (paper Eq. 3-4), Dr. GRPO (no std, length-independent aggregation)
and DAPO (clip-higher, token-mean; its dynamic sampling and overlong shaping are data-side).
docs/ALGORITHMS.md, "GRPO", "Dr. GRPO", "DAPO".
"""

from __future__ import annotations

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
                **ratio_metrics(ratio, mask),
                "clip/high_frac": masked_fraction((ratio > 1.0 + self.clip_high) & positive_adv[:, None], mask),
                "clip/low_frac": masked_fraction((ratio < 1.0 - self.clip_low) & negative_adv[:, None], mask),
                "advantage/mean": adv.mean(),
            }
            if self.dual_clip is not None:
                metrics["clip/dual_frac"] = masked_fraction((ratio > self.dual_clip) & negative_adv[:, None], mask)
        return LossOutput(loss, metrics, metric_reductions(metrics))


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
