"""The engine/trainer log-prob gap: how far a rollout engine's log-probs are from the ones the training model
recomputes (docs/SCALING.md, "The log-prob gap guard"), and the limit that stops a run on a broken sync."""

from __future__ import annotations

import torch

from nft_lit.rollout.engine import DTYPE_NAMES, dtype_name


class LogprobGapError(RuntimeError):
    """The rollout engine's log-probs disagree with the training model's: a broken weight sync, or an engine
    running in another dtype than the policy."""


def logprob_gap(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |engine − trainer| log-prob over response tokens (`mask` True/1), shapes [B, T]."""
    if engine_logprobs.shape != trainer_logprobs.shape or engine_logprobs.shape != mask.shape:
        raise ValueError(
            f"logprob_gap: shapes differ: engine {tuple(engine_logprobs.shape)}, trainer "
            f"{tuple(trainer_logprobs.shape)}, mask {tuple(mask.shape)}"
        )
    keep = mask.bool()
    if not keep.any():
        raise ValueError("logprob_gap: mask selects no tokens")
    engine = engine_logprobs.detach().double()[keep]
    if torch.isnan(engine).any():
        raise ValueError(
            "logprob_gap: engine log-probs contain NaN on response tokens (VLLMEngine returns NaN under "
            "top-p/top-k truncation, where it cannot report the untruncated log-prob)"
        )
    return (engine - trainer_logprobs.detach().double()[keep]).abs().mean().item()


AUTO_MAX_GAP = "auto"
"""``max_gap`` value that picks the limit from the dtypes in play (``default_max_gap``)."""

# Mean |engine - trainer| log-prob gap per token that a healthy engine stays under, by the coarser dtype of the
# two. Measured (docs/SCALING.md, "The log-prob gap guard"): float32 1e-8 to 6e-6 (tiny models, SmolLM2-135M on
# vLLM CPU, FSDP2 over 2 ranks); bfloat16 4e-3 (vLLM CPU vs torch CPU, tiny model). A sync that missed an update
# or a tensor-parallel engine fed different requests per rank reached 6e-4 and then 0.15.
_MAX_GAP_BY_DTYPE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def default_max_gap(dtypes: tuple[torch.dtype | str | None, torch.dtype | str | None] | None) -> float:
    """The ``auto`` limit: 1e-3 when engine and policy both run float32 (>= 150x the largest gap measured
    there), 5e-2 when either runs in 16 bits (~12x the bfloat16 gap measured on CPU)."""
    known = [_torch_dtype(d) for d in (dtypes or ()) if d is not None]
    return max((_MAX_GAP_BY_DTYPE.get(d, 5e-2) for d in known), default=_MAX_GAP_BY_DTYPE[torch.float32])


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPE_NAMES.get(str(dtype), torch.float32)


def check_max_gap(max_gap: float | str | None, option: str) -> None:
    """A valid ``max_gap``: None (only log the gap), ``"auto"`` or a number >= 0; else ValueError naming ``option``."""
    if max_gap is None or max_gap == AUTO_MAX_GAP:
        return
    if isinstance(max_gap, bool) or not isinstance(max_gap, int | float) or not max_gap >= 0:
        raise ValueError(f"{option}={max_gap!r}: expected null (only log the gap), auto, or a number >= 0")


def check_logprob_gap(
    gap: float,
    max_gap: float | str | None,
    *,
    dtypes: tuple[torch.dtype | str | None, torch.dtype | str | None] | None = None,
) -> None:
    """Fail fast on a broken sync: raise `LogprobGapError` when `gap` exceeds `max_gap` (None = off; "auto" =
    `default_max_gap` of `dtypes`).

    `dtypes` is (engine dtype, policy dtype); when they differ the error names them as the likely cause.
    """
    if max_gap is None:
        return
    if max_gap == AUTO_MAX_GAP:
        max_gap = default_max_gap(dtypes)
    if not gap <= max_gap:  # also catches NaN
        head = f"mean |engine - trainer| log-prob gap {gap:.3g} exceeds max_gap={max_gap:.3g}: "
        if dtypes is not None and None not in dtypes and dtype_name(dtypes[0]) != dtype_name(dtypes[1]):
            engine, policy = dtype_name(dtypes[0]), dtype_name(dtypes[1])
            raise LogprobGapError(
                f"{head}the rollout engine runs in {engine} but the policy is {policy}, which on its own moves "
                f"log-probs apart (typically 1e-4 to 1e-2); set rollout.dtype=policy (or {policy}) to sample in "
                "the policy's dtype, or raise max_gap (datamodule.max_logprob_gap) to accept the difference"
            )
        raise LogprobGapError(
            f"{head}the rollout engine is not sampling from the trained weights (missed or partial weight sync?"
            " an engine in another precision than rollout.dtype says?); datamodule.max_logprob_gap=null only logs"
            " the gap"
        )
