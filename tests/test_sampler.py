"""The sampler stage: problems in, scored answers out, one prompt encoding for training and evaluation."""

from _rollout_fakes import FakeSampling, addition_problems, make_sampler

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
