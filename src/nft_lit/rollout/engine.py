"""The rollout engine contract: sampling parameters, the answers an engine returns, the ``RolloutEngine``
protocol, and the helpers every engine and the step builder share (padding, EOS handling, dtypes).

Log-prob convention (docs/ARCHITECTURE.md, "Contracts"): ``log_softmax(logits / temperature)`` of the sampled
token, before top-p/top-k truncation; temperature 0 means greedy decoding and the log-probs are then taken at
temperature 1. The training model recomputes exactly this for the old log-probs (paper Eq. 4 ratio
R_t = π_θ/π_old), and ``rollout.gap.logprob_gap`` measures how far an engine's numbers are from those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by all engines. `top_k=0` and `top_p=1.0` disable truncation.

    `first_prompt`: the index of a call's first prompt within the request the sampler split into calls. An
    engine that seeds each prompt (`seeds_per_prompt = True`) seeds prompt i of the call from (seed,
    first_prompt + i), so a request split into chunks draws what one call would.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    seed: int | None = None
    first_prompt: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0):
            raise ValueError(f"SamplingParams.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """Temperature the log-probs are taken at (greedy decoding reports the model's own distribution)."""
        return 1.0 if self.greedy else float(self.temperature)

    @property
    def truncates(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0


@dataclass
class RolloutBatch:
    """Answers for P prompts × K samples; answer j of prompt i is at index i*K + j.

    `response_ids` include the EOS token when one was generated; `truncated[n]` is True when answer n has
    no EOS within `max_new_tokens`. `logprobs[n]` has one entry per token of `response_ids[n]`.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]
    num_samples: int

    def __post_init__(self) -> None:
        expected = len(self.prompt_ids) * self.num_samples
        for name in ("response_ids", "logprobs", "truncated"):
            if len(getattr(self, name)) != expected:
                raise ValueError(
                    f"RolloutBatch.{name} has {len(getattr(self, name))} entries, expected "
                    f"{len(self.prompt_ids)} prompts × {self.num_samples} samples = {expected}"
                )
        for n, (ids, lps) in enumerate(zip(self.response_ids, self.logprobs, strict=True)):
            if len(ids) != len(lps):
                raise ValueError(f"RolloutBatch answer {n}: {len(ids)} response ids but {len(lps)} logprobs")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the sampler needs of an engine. An engine may also declare `seeds_per_prompt = True`: its samples of
    a prompt depend only on the seed and the prompt's index in the request (`SamplingParams.first_prompt`), not
    on which other prompts share the call."""

    def sync_weights(self, model: nn.Module) -> dict[str, float]:
        """Make the engine sample from `model`'s current weights; returns metrics named `sync/<what>`."""
        ...

    def generate(self, prompt_ids: Sequence[Sequence[int]], num_samples: int, sampling: SamplingParams) -> RolloutBatch:
        """Sample `num_samples` answers per prompt."""
        ...


def pad_left(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one width (generation continues from the right edge): ids and 0/1 mask."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def pad_right(rows: Sequence[Sequence[float]], pad: float, dtype: torch.dtype) -> torch.Tensor:
    """Rows right-padded to one width (at least 1): response tokens, masks and log-probs of a batch."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def check_prompts(prompt_ids: Sequence[Sequence[int]], num_samples: int) -> list[list[int]]:
    """The prompts of a ``generate`` call as lists, refusing no prompts, an empty one or ``num_samples`` < 1."""
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"generate: num_samples must be a positive int, got {num_samples!r}")
    prompts = [list(p) for p in prompt_ids]
    if not prompts:
        raise ValueError("generate: prompt_ids is empty")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} has no tokens")
    return prompts


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; truncated when there is none."""
    for t, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: t + 1], False
    return tokens, True


def eos_id_set(eos_token_id: int | Sequence[int] | None, what: str) -> set[int]:
    """``eos_token_id`` (one id or several) as a set; ValueError naming ``what`` when missing or invalid."""
    if eos_token_id is None:
        raise ValueError(f"{what}: no eos_token_id (pass one, or set it in the model config)")
    ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"{what}: eos_token_id must be a non-negative int or list of them, got {eos_token_id!r}")
    return ids


# dtype names an engine takes (vLLM's, besides "auto"), and the torch dtype each stands for
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or "bfloat16" -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters (the first one's, as transformers' `model.dtype`);
    None when it has none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None
