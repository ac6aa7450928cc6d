"""Rollout engines: K sampled answers per prompt, with the log-probs of the sampled tokens.

- ``engine``: the contract (``SamplingParams``, ``RolloutBatch``, the ``RolloutEngine`` protocol) and the
  padding/EOS/dtype helpers engines and the step builder share;
- ``hf_engine``: ``HFGenerateEngine`` samples with the live training model (``model.generate``);
- ``vllm_engine``: ``VLLMEngine`` runs a colocated ``vllm.LLM`` and copies the trained weights into it on every
  ``sync_weights`` (vLLM itself is imported only when an engine starts);
- ``gap``: the engine/trainer log-prob gap and its limit (``check_logprob_gap``).

The names below are re-exported so that ``_target_: nft_lit.rollout.VLLMEngine`` (configs/rollout, and run
configs stored in checkpoints written before the split) keeps resolving.
"""

from nft_lit.rollout.engine import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    model_dtype,
    pad_left,
    pad_right,
)
from nft_lit.rollout.gap import (
    AUTO_MAX_GAP,
    LogprobGapError,
    check_logprob_gap,
    check_max_gap,
    default_max_gap,
    logprob_gap,
)
from nft_lit.rollout.hf_engine import HFGenerateEngine
from nft_lit.rollout.vllm_engine import (
    POLICY_DTYPE,
    VLLMEngine,
    VLLMError,
    check_tensor_parallel_size,
    cpu_kv_cache_bytes,
    folder_dtype,
)

__all__ = [
    "AUTO_MAX_GAP",
    "POLICY_DTYPE",
    "HFGenerateEngine",
    "LogprobGapError",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingParams",
    "VLLMEngine",
    "VLLMError",
    "check_logprob_gap",
    "check_max_gap",
    "check_tensor_parallel_size",
    "cpu_kv_cache_bytes",
    "default_max_gap",
    "folder_dtype",
    "logprob_gap",
    "model_dtype",
    "pad_left",
    "pad_right",
]
