"""HFGenerateEngine and the log-prob gap check, on tiny random Llama/Qwen2 models (CPU, float32)."""

from __future__ import annotations

import logging

import pytest
import torch
from _rollout_fakes import padded_logprobs, recompute_logprobs

from nft_lit.models import build_char_tokenizer, tiny_causal_lm
from nft_lit.rollout import (
    HFGenerateEngine,
    LogprobGapError,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    check_logprob_gap,
    check_tensor_parallel_size,
    default_max_gap,
    logprob_gap,
)

ALPHABET = "0123456789+="
EOS = 1


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(ALPHABET)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tokenizer):
    return tiny_causal_lm(request.param, vocab_size=len(tokenizer), hidden_size=64, num_heads=2, seed=0)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(text).input_ids for text in ("12+34=", "1+2=", "999+1=")]


def test_engine_satisfies_protocol():
    assert isinstance(HFGenerateEngine(), RolloutEngine)


def test_outputs_well_formed(model, prompts):
    engine = HFGenerateEngine(batch_size=5)  # 12 answers over 3 generate calls, uneven last one
    engine.sync_weights(model)
    batch = engine.generate(prompts, 4, SamplingParams(max_new_tokens=8, seed=0))
    assert batch.num_samples == 4 and batch.prompt_ids == prompts
    assert len(batch.response_ids) == len(batch.logprobs) == len(batch.truncated) == 12
    for ids, lps, trunc in zip(batch.response_ids, batch.logprobs, batch.truncated, strict=True):
        assert len(ids) == len(lps) and 1 <= len(ids) <= 8
        assert EOS not in ids[:-1]  # nothing after EOS
        assert trunc == (ids[-1] != EOS)
        if trunc:
            assert len(ids) == 8
        assert all(lp <= 0 for lp in lps)
    # a random tiny model both stops and runs out of tokens across 12 samples of 8 tokens
    assert any(batch.truncated) and not all(batch.truncated)


def test_answer_order_is_prompt_major(model, tokenizer):
    # greedy decoding: the K answers of one prompt are identical, so order shows in the contents
    engine = HFGenerateEngine()
    engine.sync_weights(model)
    prompts = [tokenizer(t).input_ids for t in ("1+1=", "77+88=")]
    batch = engine.generate(prompts, 3, SamplingParams(temperature=0.0, max_new_tokens=6))
    for i, prompt in enumerate(prompts):
        single = engine.generate([prompt], 1, SamplingParams(temperature=0.0, max_new_tokens=6))
        assert batch.response_ids[i * 3 : i * 3 + 3] == single.response_ids * 3


def test_deterministic_under_seed_and_keeps_global_rng(model, prompts):
    engine = HFGenerateEngine()
    engine.sync_weights(model)
    sampling = SamplingParams(max_new_tokens=10, seed=7)
    torch.manual_seed(123)
    first = engine.generate(prompts, 4, sampling)
    after_first = torch.rand(1)
    torch.manual_seed(123)
    second = engine.generate(prompts, 4, sampling)
    assert first == second
    assert torch.equal(torch.rand(1), after_first)  # global RNG untouched by seeded sampling
    other = engine.generate(prompts, 4, SamplingParams(max_new_tokens=10, seed=8))
    assert other.response_ids != first.response_ids


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=1.0, max_new_tokens=10, seed=1),
        SamplingParams(temperature=0.6, max_new_tokens=10, seed=2),
        SamplingParams(temperature=1.3, top_p=0.8, top_k=5, max_new_tokens=10, seed=3),
    ],
    ids=["T1", "T0.6", "T1.3-topp-topk"],
)
def test_logprobs_match_trainer_recompute(model, prompts, sampling):
    engine = HFGenerateEngine(batch_size=8)
    engine.sync_weights(model)
    batch = engine.generate(prompts, 4, sampling)
    expected = recompute_logprobs(model, prompts, batch, sampling.temperature)
    for lp, ref in zip(batch.logprobs, expected, strict=True):
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-4, rtol=0)
    if sampling.temperature != 1.0:  # the temperature matters: T=1 numbers would not pass
        wrong = recompute_logprobs(model, prompts, batch, 1.0)
        assert (
            max((torch.tensor(lp) - w).abs().max().item() for lp, w in zip(batch.logprobs, wrong, strict=True)) > 1e-2
        )


def test_restores_train_mode_and_sees_live_weights(tokenizer, prompts):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64, num_heads=2, seed=1)
    model.train()
    engine = HFGenerateEngine()
    engine.sync_weights(model)
    sampling = SamplingParams(max_new_tokens=6, seed=0)
    before = engine.generate(prompts, 2, sampling)
    assert model.training
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # no second sync: the engine holds the live model
    after = engine.generate(prompts, 2, sampling)
    expected = recompute_logprobs(model, prompts, after, 1.0)
    for lp, ref in zip(after.logprobs, expected, strict=True):
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-4, rtol=0)
    assert after.logprobs != before.logprobs


def test_generate_before_sync_is_an_error(prompts):
    with pytest.raises(RuntimeError, match="sync_weights"):
        HFGenerateEngine().generate(prompts, 2, SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_rollout_batch_checks_lengths():
    with pytest.raises(ValueError, match="logprobs"):
        RolloutBatch([[1]], [[2, 1], [3]], [[0.0, 0.0], []], [False, True], num_samples=2)
    with pytest.raises(ValueError, match="response_ids"):
        RolloutBatch([[1]], [[2, 1]], [[0.0, 0.0]], [False], num_samples=2)


def test_skipped_sync_is_detected_by_gap(prompts, tokenizer):
    """Engine log-probs from stale weights vs the trainer's from updated ones: the gap flags it."""
    trained = tiny_causal_lm("qwen2", vocab_size=len(tokenizer), hidden_size=64, num_heads=2, seed=0)
    stale = tiny_causal_lm("qwen2", vocab_size=len(tokenizer), hidden_size=64, num_heads=2, seed=0)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))  # one "optimizer phase" the engine never saw
    engine = HFGenerateEngine()
    sampling = SamplingParams(max_new_tokens=8, seed=0)

    def gap_against_trained() -> float:
        return logprob_gap(*padded_logprobs(engine.generate(prompts, 4, sampling), trained, prompts, 1.0))

    engine.sync_weights(stale)  # the deliberately skipped sync
    stale_gap = gap_against_trained()
    engine.sync_weights(trained)
    synced_gap = gap_against_trained()
    assert synced_gap <= 1e-5
    assert stale_gap > 1e-2
    check_logprob_gap(synced_gap, max_gap=1e-3)
    with pytest.raises(LogprobGapError, match=r"max_gap.*weight sync"):
        check_logprob_gap(stale_gap, max_gap=1e-3)


def test_gap_error_names_an_engine_dtype_other_than_the_policys():
    with pytest.raises(LogprobGapError, match=r"engine runs in bfloat16 but the policy is float32.*rollout\.dtype"):
        check_logprob_gap(0.007, max_gap=1e-3, dtypes=(torch.bfloat16, torch.float32))
    with pytest.raises(LogprobGapError, match="weight sync"):  # same dtype: the sync is to blame
        check_logprob_gap(0.007, max_gap=1e-3, dtypes=("float32", torch.float32))
    check_logprob_gap(1e-4, max_gap=1e-3, dtypes=(torch.bfloat16, torch.float32))  # within max_gap: fine


def test_generate_sets_no_flag_transformers_would_ignore(model, prompts):
    """transformers warns "generation flags are not valid and may be ignored" (once per process) when a
    sampling-only flag such as top_k or min_p is set for greedy decoding; the engine leaves them unset."""
    from transformers.generation import configuration_utils

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(configuration_utils.__name__)
    logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # an earlier test may have printed it already
    try:
        engine = HFGenerateEngine()
        engine.sync_weights(model)
        for sampling in (
            SamplingParams(temperature=0.0, max_new_tokens=4),
            SamplingParams(max_new_tokens=4, seed=0),
            SamplingParams(temperature=0.7, top_p=0.9, top_k=3, max_new_tokens=4, seed=0),
        ):
            engine.generate(prompts, 2 if sampling.temperature else 1, sampling)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records if "generation flags" in r.getMessage()] == []


def test_logprob_gap_values_and_errors():
    eng = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -9.0, -9.0]])
    tr = torch.tensor([[-1.5, -2.0, 5.0], [-0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert logprob_gap(eng, tr, mask) == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    with pytest.raises(ValueError, match="shapes"):
        logprob_gap(eng, tr[:, :2], mask)
    with pytest.raises(ValueError, match="no tokens"):
        logprob_gap(eng, tr, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="NaN"):
        logprob_gap(torch.full_like(eng, float("nan")), tr, mask)
    check_logprob_gap(10.0, max_gap=None)
    with pytest.raises(LogprobGapError):
        check_logprob_gap(float("nan"), max_gap=1.0)


def test_the_auto_gap_limit_follows_the_coarser_dtype():
    """`datamodule.max_logprob_gap: auto` (the default): 1e-3 in float32, 5e-2 once either side runs in 16 bits."""
    assert default_max_gap((torch.float32, torch.float32)) == 1e-3
    assert default_max_gap((None, torch.float32)) == 1e-3  # HF engine: the policy's dtype alone
    assert default_max_gap((torch.bfloat16, torch.float32)) == 5e-2
    assert default_max_gap(("float16", torch.float16)) == 5e-2
    check_logprob_gap(6e-6, "auto", dtypes=(torch.float32, torch.float32))  # SmolLM2's largest healthy gap
    check_logprob_gap(4.4e-3, "auto", dtypes=(torch.bfloat16, torch.bfloat16))  # bf16 on CPU
    with pytest.raises(LogprobGapError, match=r"exceeds max_gap=0\.001.*rollout\.dtype.*max_logprob_gap=null"):
        check_logprob_gap(0.149, "auto", dtypes=(torch.float32, torch.float32))  # the TP bug's third iteration


def test_a_tensor_parallel_engine_is_refused_naming_the_option():
    check_tensor_parallel_size(1)
    with pytest.raises(ValueError, match=r"rollout\.tensor_parallel_size=2: tensor-parallel vLLM is refused"):
        check_tensor_parallel_size(2)
