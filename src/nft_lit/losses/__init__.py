"""Policy losses: NFT (paper Eq. 10), RFT, GRPO (Eq. 3-4), Dr. GRPO, DAPO and InfoNCA (App. B).

One ``nn.Module`` per algorithm, each built by Hydra from ``configs/algorithm/<name>.yaml``. Every loss takes
the per-token log-probs of the response tokens under the current policy and a :class:`LossBatch`, and returns
a scalar already normalised by the counts of the *whole optimizer step* (all gradient-accumulation
micro-batches and all data-parallel ranks), so that summing the gradients of the micro-batches gives exactly
the gradient of the full mini-batch. Semantics and defaults: docs/ALGORITHMS.md (the authors' released
code and verl's DAPO recipe).

Shapes: ``B`` answers in the micro-batch, ``T`` response tokens (right-padded, ``response_mask`` marks real ones).

- ``base``: the contract: ``LossBatch`` (``group_stats``, ``group_sizes``), ``LossOutput`` and its ``Reduction``
  per metric, ``StepMetrics``, exact aggregation (``aggregate_rows``, ``aggregate``), the ``PolicyLoss`` base class;
- ``nft``: ``NFTLoss`` (Eq. 10, Algorithm 1) and ``RFTLoss`` (NFT without the negative term), ω(q)
  (``omega_weight``);
- ``grpo``: ``GRPOLoss`` (Eq. 3-4, clip-higher) and its variants ``DrGRPOLoss`` and ``DAPOLoss``;
- ``infonca``: ``InfoNCALoss`` (App. B).

The names below are re-exported so that ``_target_: nft_lit.losses.NFTLoss`` (configs/algorithm, and run
configs stored in checkpoints written before the split) and ``from nft_lit.losses import ...`` keep working.
"""

from nft_lit.losses.base import (
    AGGREGATIONS,
    Aggregation,
    LossBatch,
    LossOutput,
    PolicyLoss,
    Reduction,
    StepMetrics,
    aggregate,
    aggregate_rows,
    group_sizes,
    group_stats,
    masked_fraction,
    metric_reductions,
    ratio_metrics,
)
from nft_lit.losses.grpo import DAPOLoss, DrGRPOLoss, GRPOLoss
from nft_lit.losses.infonca import InfoNCALoss
from nft_lit.losses.nft import OMEGAS, NFTLoss, Omega, RFTLoss, omega_weight

__all__ = [
    "AGGREGATIONS",
    "OMEGAS",
    "Aggregation",
    "DAPOLoss",
    "DrGRPOLoss",
    "GRPOLoss",
    "InfoNCALoss",
    "LossBatch",
    "LossOutput",
    "NFTLoss",
    "Omega",
    "PolicyLoss",
    "RFTLoss",
    "Reduction",
    "StepMetrics",
    "aggregate",
    "aggregate_rows",
    "group_sizes",
    "group_stats",
    "masked_fraction",
    "metric_reductions",
    "omega_weight",
    "ratio_metrics",
]
