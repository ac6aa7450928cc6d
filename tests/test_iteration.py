"""The data stages of a rollout iteration without a Trainer: prompt stream, scoring, dynamic sampling."""

import pytest
from _rollout_fakes import FakeSampling, addition_problems, make_sampler

from nft_lit.iteration import PromptStream, RewardShaping, RolloutSettings, check_loss_fits, collect_groups
from nft_lit.losses import GRPOLoss, InfoNCALoss, NFTLoss

PROBLEMS = addition_problems(40)


def _collect(iteration=0, stream=None, sampler=None, **settings):
    kwargs = dict(prompts_per_step=4, num_answers=4, seed=1)
    kwargs.update(settings)
    stream = stream or PromptStream(len(PROBLEMS), seed=1)
    sampler = sampler or make_sampler()
    return *collect_groups(PROBLEMS, stream, sampler, FakeSampling(), RolloutSettings(**kwargs), iteration), stream


def test_dynamic_sampling_keeps_only_mixed_groups_and_counts_rounds():
    kept, stats, stream = _collect(gen_prompts_per_round=4, max_gen_rounds=5)
    assert len(kept) == 4
    assert all(g.mixed for g in kept)
    assert stats["rollout/kept_groups"] == 4.0
    assert 1 <= stats["rollout/gen_rounds"] <= 5
    # Each round consumes gen_prompts_per_round prompts (a resumed run continues from this cursor).
    assert stream.cursor == 4 * stats["rollout/gen_rounds"]


def test_no_dynamic_sampling_keeps_every_group():
    kept, stats, stream = _collect(dynamic_sampling=False)
    assert len(kept) == 4 and stats["rollout/gen_rounds"] == 1.0 and stream.cursor == 4


def test_strict_raises_when_rounds_run_out():
    with pytest.raises(RuntimeError, match=r"datamodule\.strict=true"):
        _collect(gen_prompts_per_round=4, max_gen_rounds=1, prompts_per_step=8, strict=True)


def test_groups_keep_each_prompts_answers_and_verifier_rewards():
    sampler = make_sampler()
    kept, stats, _ = _collect(sampler=sampler, dynamic_sampling=False)
    for g in kept:
        assert len(g.response_ids) == len(g.correct) == len(g.rewards) == 4
        assert g.prompt_ids == sampler.encode(PROBLEMS[g.prompt_index].question)
        assert g.rewards == g.correct  # no shaping
    assert stats["rollout/pass_rate"] == sum(c for g in kept for c in g.correct) / 16


def test_prompt_order_is_a_seeded_permutation_per_pass():
    first = PromptStream(40, seed=1).take(40)
    stream = PromptStream(40, seed=1)
    stream.take(40)
    second = stream.take(40)
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40))
    assert first != second
    assert first != PromptStream(40, seed=2).take(40)
    assert stream.cursor == 80


def test_generation_seed_depends_on_iteration_round_and_rank():
    sampler = make_sampler()
    stream = PromptStream(len(PROBLEMS), seed=1)
    _collect(0, stream, sampler, gen_prompts_per_round=4, max_gen_rounds=3)
    _collect(1, stream, sampler, gen_prompts_per_round=4, max_gen_rounds=3)
    seeds = sampler.engine.seeds
    assert len(seeds) == len(set(seeds)) >= 2


def test_overlong_shaping_penalises_the_last_buffer_tokens():
    shaping = RewardShaping(buffer=2, factor=1.0)
    assert shaping([1.0, 1.0, 0.0], [3, 5, 6], max_new_tokens=6) == pytest.approx([1.0, 0.5, -1.0])
    assert RewardShaping()([1.0, 0.0], [6, 6], max_new_tokens=6) == [1.0, 0.0]


def test_too_long_prompt_names_the_problem_and_option():
    with pytest.raises(ValueError, match=r"datamodule\.max_prompt_tokens=2"):
        _collect(max_prompt_tokens=2)


def test_settings_check_each_rule_once_naming_the_option():
    with pytest.raises(ValueError, match=r"algorithm\.num_answers"):
        RolloutSettings(prompts_per_step=4, num_answers=1)
    with pytest.raises(ValueError, match=r"algorithm\.overlong_buffer"):
        RolloutSettings(prompts_per_step=4, num_answers=4, shaping=RewardShaping(buffer=0))
    settings = RolloutSettings(prompts_per_step=4, num_answers=4, shaping=RewardShaping(buffer=8))
    with pytest.raises(ValueError, match=r"sampling\.max_new_tokens=6"):
        settings.check(FakeSampling(), world=1)
    with pytest.raises(ValueError, match=r"sampling\.temperature"):
        RolloutSettings(prompts_per_step=4, num_answers=4).check(FakeSampling(temperature=0.0), world=1)
    with pytest.raises(ValueError, match=r"gen_prompts_per_round=12 must be a multiple of the number of ranks \(5\)"):
        RolloutSettings(prompts_per_step=4, num_answers=4).check(FakeSampling(), world=5)


def test_a_loss_declares_what_it_needs_of_the_data():
    plain = RolloutSettings(prompts_per_step=4, num_answers=4)
    shaped = RolloutSettings(prompts_per_step=4, num_answers=4, shaping=RewardShaping(buffer=2))
    check_loss_fits(GRPOLoss(), shaped, whole_groups=False)
    with pytest.raises(ValueError, match=r"algorithm\.overlong_buffer=2"):
        check_loss_fits(NFTLoss(), shaped, whole_groups=False)
    with pytest.raises(ValueError, match=r"datamodule\.whole_groups=true"):
        check_loss_fits(InfoNCALoss(), plain, whole_groups=False)
    with pytest.raises(ValueError, match=r"algorithm\.dynamic_sampling=true"):
        check_loss_fits(NFTLoss(), RolloutSettings(4, 4, dynamic_sampling=False), whole_groups=False)
