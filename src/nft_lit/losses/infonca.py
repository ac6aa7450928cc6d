"""InfoNCA (paper App. B): the K-answer generalisation of DPO with reward soft labels, plus an SFT stabiliser
(docs/ALGORITHMS.md, "InfoNCA")."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nft_lit.losses.base import (
    Aggregation,
    LossBatch,
    LossOutput,
    PolicyLoss,
    aggregate,
    metric_reductions,
    ratio_metrics,
)


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
                **ratio_metrics(log_ratio.exp(), batch.response_mask.bool()),
            }
        return LossOutput(loss, metrics, metric_reductions(metrics))
