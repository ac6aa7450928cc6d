"""The sampler stage: problems in, scored answers out, one prompt encoding for training and evaluation."""

import threading

import pytest
from _rollout_fakes import FakeEngine, FakeSampling, addition_problems, make_sampler

from nft_lit.prompts import PromptTemplate


def test_sample_returns_answers_in_prompt_major_order_with_verifier_scores():
    sampler = make_sampler()
    sampler.sync(object())
    problems = addition_problems(3)
    out = sampler.sample(problems, 2, FakeSampling(seed=1))
    assert out.num_samples == 2 and len(out.prompt_ids) == 3
    assert len(out.response_ids) == len(out.correct) == len(out.truncated) == len(out.engine_logprobs) == 6
    texts = [sampler.tokenizer.decode(r, skip_special_tokens=True) for r in out.response_ids]
    assert out.correct == sampler.verifier.score(texts, ["?"] * 6, out.truncated).rewards
    assert out.num_tokens == sum(len(r) for r in out.response_ids)
    # the same problem gets the same answers again (the fake engine is seeded by prompt and index)
    again = sampler.sample(problems[1:2], 2, FakeSampling(seed=1))
    assert again.response_ids == out.response_ids[2:4]


def test_prompts_go_through_the_template_and_are_encoded_once():
    template = PromptTemplate(template="{question}=", prefix="", suffix="", add_special_tokens=False)
    sampler = make_sampler(prompt_template=template)
    calls = []
    encode = sampler.tokenizer.encode
    sampler.tokenizer.encode = lambda text, **kw: calls.append(text) or encode(text, **kw)
    try:
        assert sampler.encode("1+2=") == sampler.encode("1+2=")
    finally:
        sampler.tokenizer.encode = encode
    assert calls == ["1+2=="]


def test_an_engine_factory_is_built_once_at_first_use():
    built = []

    def factory():
        engine = make_sampler().engine
        built.append(engine)
        return engine

    sampler = make_sampler(engine=factory)
    assert built == []
    assert sampler.engine is sampler.engine and len(built) == 1


def test_chunked_sampling_keeps_the_order_and_gives_each_chunk_its_own_seed():
    whole = make_sampler()
    chunked = make_sampler(chunk_prompts=2)
    problems = addition_problems(5)
    one = whole.sample(problems, 3, FakeSampling(seed=7))
    parts = chunked.sample(problems, 3, FakeSampling(seed=7))
    # the fake engine's answers depend on the prompt and the index only: chunking keeps them and their order
    assert parts.response_ids == one.response_ids and parts.correct == one.correct
    assert whole.engine.seeds == [7]  # one chunk keeps the round's seed
    seeds = chunked.engine.seeds
    assert len(seeds) == 3 and len(set(seeds)) == 3 and 7 not in seeds  # 2 + 2 + 1 prompts, distinct streams


class PerPromptSeededEngine(FakeEngine):
    """An engine that seeds each prompt from (seed, its index in the request), as VLLMEngine does."""

    seeds_per_prompt = True

    def generate(self, prompt_ids, num_samples, sampling):
        self.calls.append((sampling.seed, sampling.first_prompt, len(prompt_ids)))
        return super().generate(prompt_ids, num_samples, sampling)


def test_an_engine_seeding_per_prompt_gets_each_chunk_s_offset_not_a_new_seed(caplog):
    """`sampler.chunk_prompts` is a speed knob: with a per-prompt-seeded engine every prompt keeps its seed and
    index whatever the chunking (the old per-chunk seeds changed vLLM's samples)."""
    engine = PerPromptSeededEngine(make_sampler().engine.vocab, make_sampler().engine.eos)
    engine.calls = []
    make_sampler(engine=engine, chunk_prompts=2).sample(addition_problems(5), 3, FakeSampling(seed=7))
    assert engine.calls == [(7, 0, 2), (7, 2, 2), (7, 4, 1)]
    assert "chunk_prompts" not in caplog.text
    make_sampler(chunk_prompts=2).sample(addition_problems(5), 3, FakeSampling(seed=7))  # seeds per call
    assert "chunked rollouts draw other samples" in caplog.text


def test_each_chunk_is_verified_while_the_next_one_generates():
    """Chunk c + 1 generates while chunk c is verified: the engine's next call sees chunk c's verification
    under way (a sampler that verifies after generating everything would keep it waiting until the timeout)."""
    verifying = [threading.Event() for _ in range(3)]
    overlapped = []
    sampler = make_sampler(chunk_prompts=1)
    generate, score = sampler.engine.generate, sampler.verifier.score

    def generate_after_previous_chunk_is_being_verified(prompt_ids, num_samples, sampling):
        chunk = len(sampler.engine.seeds)
        if chunk > 0:
            overlapped.append(verifying[chunk - 1].wait(timeout=10))
        return generate(prompt_ids, num_samples, sampling)

    def flagging_score(responses, golds, truncated):
        verifying[sum(e.is_set() for e in verifying)].set()
        return score(responses, golds, truncated)

    sampler.engine.generate = generate_after_previous_chunk_is_being_verified
    sampler.verifier.score = flagging_score
    out = sampler.sample(addition_problems(3), 2, FakeSampling(seed=1))
    assert overlapped == [True, True]
    assert len(out.correct) == 6 and out.verify_seconds >= 0 and out.verify_wait_seconds >= 0


def test_chunk_prompts_must_be_positive():
    with pytest.raises(ValueError, match=r"sampler\.chunk_prompts"):
        make_sampler(chunk_prompts=0)
