"""``HFGenerateEngine``: rollouts with the live training model through ``model.generate`` (KV cache, left
padding), with log-probs by the convention of ``rollout.engine`` taken from the raw logits of every step."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from nft_lit.rollout.engine import RolloutBatch, SamplingParams, check_prompts, cut_at_eos, eos_id_set, pad_left

# generate() options read only when sampling (transformers' logits warpers, skipped under do_sample=False).
_SAMPLING_ONLY_FLAGS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


# generate(output_logits=True) stores every step's logits in float32
_LOGIT_BYTES = 4


def _vocab_size(model: nn.Module) -> int:
    """Width of the model's logits: its output layer's rows (the global size of a sharded one), else the
    config's vocab size."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(output, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.vocab_size)


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class HFGenerateEngine:
    """Samples with the live training model through `model.generate` (KV cache, left padding).

    `sync_weights` only keeps a reference to the model: generation always sees the current weights, so
    there is nothing to copy. Generation runs in eval mode under `no_grad` and restores train mode.
    Log-probs come from the raw logits `generate` returns for every step (`output_logits=True`), divided
    by the temperature, so they are exactly the distribution the token was drawn from before top-p/top-k.

    With a seed, sampling is deterministic and leaves the global RNG state untouched. Works on an
    FSDP2-sharded model (`fully_shard`): every rank must call `generate` with the same number of prompts,
    and ranks keep stepping until all are done (`synced_gpus`) because each step all-gathers parameters.

    Sequences per `generate` call: `generate(output_logits=True)` keeps the float32 logits of every step,
    batch × new tokens × vocab × 4 bytes, which is what bounds the batch. `batch_size=None` (the default)
    picks it from `logits_budget_mib`: as many sequences as keep those logits (at `max_new_tokens`) within
    the budget, in equal chunks, so a small-vocab/short-answer task samples a whole round in one call and a
    large-vocab/long-answer model in small ones. An int fixes it. The choice depends only on the number of
    sequences, `max_new_tokens` and the vocab, so every FSDP rank makes the same calls.
    """

    def __init__(
        self,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        batch_size: int | None = None,
        logits_budget_mib: float = 1024.0,
    ) -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"HFGenerateEngine: batch_size must be a positive int or None (auto), got {batch_size!r}")
        if not (isinstance(logits_budget_mib, (int, float)) and logits_budget_mib > 0):
            raise ValueError(f"HFGenerateEngine: logits_budget_mib must be > 0, got {logits_budget_mib!r}")
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.batch_size = batch_size
        self.logits_budget_mib = float(logits_budget_mib)
        self._model: nn.Module | None = None

    def sync_weights(self, model: nn.Module) -> dict[str, float]:
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"HFGenerateEngine.sync_weights: {type(model).__name__} has no .generate()")
        self._model = model
        return {"sync/seconds": 0.0}

    def sequences_per_call(self, num_sequences: int, max_new_tokens: int, vocab_size: int) -> int:
        """Sequences per `generate` call for `num_sequences` answers of up to `max_new_tokens` tokens over a
        vocab of `vocab_size`: `batch_size` when set, else the most whose stored logits fit the budget, evened
        out over the calls that takes (at least 1, whatever the budget)."""
        if num_sequences <= 0:
            return 1
        if self.batch_size is not None:
            return self.batch_size
        per_sequence = max_new_tokens * vocab_size * _LOGIT_BYTES
        fit = max(1, int(self.logits_budget_mib * 2**20 // per_sequence))
        calls = math.ceil(num_sequences / fit)
        return math.ceil(num_sequences / calls)

    def _special_ids(self, model: nn.Module) -> tuple[int, set[int]]:
        config = model.config
        eos = self.eos_token_id if self.eos_token_id is not None else config.eos_token_id
        eos_ids = eos_id_set(eos, "HFGenerateEngine")
        pad = self.pad_token_id if self.pad_token_id is not None else config.pad_token_id
        if pad is None:
            pad = min(eos_ids)
        return pad, eos_ids

    def generate(self, prompt_ids: Sequence[Sequence[int]], num_samples: int, sampling: SamplingParams) -> RolloutBatch:
        if self._model is None:
            raise RuntimeError("HFGenerateEngine.generate: call sync_weights(model) first")
        prompts = check_prompts(prompt_ids, num_samples)
        model = self._model
        pad_id, eos_ids = self._special_ids(model)
        expanded = [p for p in prompts for _ in range(num_samples)]
        responses: list[list[int]] = []
        logprobs: list[list[float]] = []
        truncated: list[bool] = []
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                size = self.sequences_per_call(len(expanded), sampling.max_new_tokens, _vocab_size(model))
                for start in range(0, len(expanded), size):
                    chunk = expanded[start : start + size]
                    for ids, lps, trunc in self._generate_chunk(model, chunk, sampling, pad_id, eos_ids):
                        responses.append(ids)
                        logprobs.append(lps)
                        truncated.append(trunc)
        finally:
            model.train(was_training)
        return RolloutBatch(prompts, responses, logprobs, truncated, num_samples)

    def _generate_chunk(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        sampling: SamplingParams,
        pad_id: int,
        eos_ids: set[int],
    ) -> Iterator[tuple[list[int], list[float], bool]]:
        device = next(model.parameters()).device
        input_ids, attention_mask = pad_left(prompts, pad_id)
        width = input_ids.shape[1]
        # Every distribution-changing option is set explicitly: generate() fills unset ones from the model's
        # generation_config (e.g. Qwen2.5-Instruct ships top_k=20, repetition_penalty=1.05).
        sample_kwargs: dict[str, Any] = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0}
        if sampling.greedy:
            # The sampling-only warpers are never applied without do_sample; None unsets them (a value such as
            # top_k=0 or min_p=0.0 makes transformers warn "generation flags are not valid and may be ignored").
            sample_kwargs.update(dict.fromkeys(_SAMPLING_ONLY_FLAGS), do_sample=False)
        else:
            sample_kwargs.update(
                do_sample=True,
                temperature=float(sampling.temperature),
                top_p=float(sampling.top_p),
                top_k=sampling.top_k,
                typical_p=1.0,
                epsilon_cutoff=0.0,
                eta_cutoff=0.0,
                min_p=0.0,
            )
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sorted(eos_ids),
            pad_token_id=pad_id,
            output_logits=True,
            return_dict_in_generate=True,
            synced_gpus=_is_sharded(model) and torch.distributed.is_initialized(),
            **sample_kwargs,
        )
        new_tokens = out.sequences[:, width:]
        # logits[t] are the raw model logits that produced token t (before any logits processor). One step at
        # a time, so the peak memory stays that of the stored logits (the budget) rather than a few copies.
        temperature = sampling.logprob_temperature
        token_lp = torch.stack(
            [
                (logits.float() / temperature).log_softmax(-1).gather(-1, new_tokens[:, t : t + 1])[:, 0]
                for t, logits in enumerate(out.logits[: new_tokens.shape[1]])
            ],
            dim=1,
        ).cpu()
        for row in range(len(prompts)):
            ids, trunc = cut_at_eos(new_tokens[row].tolist(), eos_ids)
            yield ids, token_lp[row, : len(ids)].tolist(), trunc
