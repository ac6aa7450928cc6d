"""Kept groups -> optimizer steps without a Trainer: the pure planner, batching, old log-probs."""

import pytest
import torch
from _rollout_fakes import FakeSampling, addition_problems, make_sampler

from nft_lit.iteration import PromptStream, RolloutSettings, collect_groups
from nft_lit.losses import group_stats
from nft_lit.rollout import LogprobGapError
from nft_lit.steps import (
    LogprobGap,
    StepLayout,
    build_steps,
    fill_old_logprobs,
    group_lengths,
    padding_fraction,
    plan_steps,
)


def _groups(n=4):
    problems = addition_problems(40)
    settings = RolloutSettings(prompts_per_step=n, num_answers=4, dynamic_sampling=False, seed=1)
    sampler = make_sampler()
    groups, _ = collect_groups(problems, PromptStream(40, 1), sampler, FakeSampling(), settings, 0)
    return groups, sampler.tokenizer.pad_token_id


def _steps(groups, pad, layout, world=1, rank=0, temperature=1.0):
    plan = plan_steps(len(groups), 4, layout, world, group_lengths(groups))
    return build_steps(groups, plan, rank, 4, pad, temperature)


def test_steps_carry_whole_group_stats_and_step_normalisers():
    groups, pad = _groups()
    steps = _steps(groups, pad, StepLayout(num_mini_batches=2, micro_batch_size=3))
    assert len(steps) == 2
    rewards = torch.tensor([r for g in groups for r in g.rewards])
    mean, std = group_stats(rewards, torch.arange(4).repeat_interleave(4))
    seen = 0
    responses = []
    for step in steps:
        tokens = sum(float(mb.loss_batch.response_mask.sum()) for mb in step.micro_batches)
        seqs = sum(mb.loss_batch.rewards.numel() for mb in step.micro_batches)
        for mb in step.micro_batches:
            lb = mb.loss_batch
            assert lb.num_tokens == tokens and lb.num_sequences == seqs
            assert mb.input_ids.shape[0] <= 3
            flat = lb.group_ids * 4
            # group mean/std are those of the WHOLE group even when a micro-batch holds part of it
            assert torch.allclose(lb.group_mean, mean[flat]) and torch.allclose(lb.group_std, std[flat])
            # response tokens sit right after the left-padded prompt, the mask covering exactly them
            resp = mb.input_ids[:, mb.prompt_len :]
            for row, mask in zip(resp, lb.response_mask, strict=True):
                n = int(mask.sum())
                assert mask[:n].all() and not mask[n:].any()
                responses.append(row[:n].tolist())
        seen += seqs
    assert seen == 16
    assert sorted(responses) == sorted(r for g in groups for r in g.response_ids)


def test_whole_groups_never_split_across_micro_batches():
    groups, pad = _groups()
    for step in _steps(groups, pad, StepLayout(num_mini_batches=2, micro_batch_size=5, whole_groups=True)):
        for mb in step.micro_batches:
            ids = mb.loss_batch.group_ids
            assert all(int((ids == g).sum()) == 4 for g in ids.unique())


def test_plan_pads_ranks_to_equal_micro_batch_counts():
    groups, pad = _groups()
    layout = StepLayout(num_mini_batches=1, micro_batch_size=4, whole_groups=True)
    plan = plan_steps(4, 4, layout, world=3)
    counts = [len(per_rank) for per_rank in plan[0]]
    assert counts == [2, 2, 2]  # rank 0 holds 2 groups, ranks 1-2 one each + an empty padding micro-batch
    assert sum(1 for mbs in plan[0] for mb in mbs if not mb) == 2
    step = _steps(groups, pad, layout, world=3, rank=1)[0]
    assert [mb.is_padding for mb in step.micro_batches] == [False, True]
    assert float(step.micro_batches[1].loss_batch.response_mask.sum()) == 0.0


def test_plan_is_a_partition_of_every_answer():
    layout = StepLayout(num_mini_batches=3, micro_batch_size=5)
    plan = plan_steps(5, 4, layout, world=2)
    members = [m for step in plan for per_rank in step for mb in per_rank for m in mb]
    assert sorted(members) == [(g, j) for g in range(5) for j in range(4)]
    assert all(len(mb) <= 5 for step in plan for per_rank in step for mb in per_rank)


def test_old_logprobs_use_the_steps_temperature_and_measure_the_gap():
    groups, pad = _groups()
    steps = _steps(groups, pad, StepLayout(num_mini_batches=2, micro_batch_size=8), temperature=0.7)
    seen = []

    def logprob_fn(ids, mask, prompt_len, temperature):
        seen.append(temperature)
        return torch.full((ids.shape[0], ids.shape[1] - prompt_len), -1.5)

    gap = fill_old_logprobs(steps, logprob_fn, "cpu").finish()
    assert seen and set(seen) == {0.7}
    assert gap == pytest.approx(0.5)  # the fake engine reports -1.0 for every token
    for step in steps:
        for mb in step.micro_batches:
            lb = mb.loss_batch
            assert torch.equal(lb.old_logprobs, -1.5 * lb.response_mask)
    with pytest.raises(LogprobGapError, match="exceeds max_gap"):
        fill_old_logprobs(steps, logprob_fn, "cpu", LogprobGap(max_gap=0.1)).finish()
    with pytest.raises(LogprobGapError, match="engine runs in bfloat16 but the policy is float32"):
        fill_old_logprobs(steps, logprob_fn, "cpu", LogprobGap(0.1, (torch.bfloat16, torch.float32))).finish()


def test_layout_rules_name_the_option():
    with pytest.raises(ValueError, match=r"datamodule\.num_mini_batches"):
        StepLayout(num_mini_batches=0)
    with pytest.raises(ValueError, match=r"datamodule\.micro_batch_size"):
        StepLayout(micro_batch_size=0)
    with pytest.raises(ValueError, match="whole groups"):
        StepLayout(num_mini_batches=5, whole_groups=True).check(prompts_per_step=4, num_answers=4)


def test_no_gap_is_reported_when_no_token_was_measured():
    """An iteration of padding only (nothing kept on this rank) has no gap: None, never a misleading 0.0."""
    groups, pad = _groups()
    steps = _steps(
        groups[:1], pad, StepLayout(num_mini_batches=1, micro_batch_size=4, whole_groups=True), world=2, rank=1
    )
    assert all(mb.is_padding for mb in steps[0].micro_batches)
    zeros = lambda ids, mask, n, t: torch.zeros(ids.shape[0], ids.shape[1] - n)  # noqa: E731
    assert fill_old_logprobs(steps, zeros, "cpu").finish() is None


def _long_tail_lengths(num_groups=8, num_answers=4, seed=0):
    import random

    rng = random.Random(seed)
    return [
        (rng.randint(3, 9), [rng.choice([1, 2, 3, 60, 200]) for _ in range(num_answers)]) for _ in range(num_groups)
    ]


def _padded(plan, lengths):
    """(computed, real) token positions of a plan's micro-batches, as build_steps pads them."""
    computed = real = 0
    for step in plan:
        for per_rank in step:
            for mb in per_rank:
                if mb:
                    p = max(lengths[g][0] for g, _ in mb)
                    r = max(lengths[g][1][j] for g, j in mb)
                    computed += len(mb) * (p + r)
                    real += sum(lengths[g][0] + lengths[g][1][j] for g, j in mb)
    return computed, real


@pytest.mark.parametrize("whole_groups", [False, True])
@pytest.mark.parametrize("world", [1, 2])
def test_token_budget_partitions_every_answer_within_the_budget(whole_groups, world):
    lengths = _long_tail_lengths()
    layout = StepLayout(num_mini_batches=2, whole_groups=whole_groups, max_tokens_per_micro_batch=900)
    plan = plan_steps(8, 4, layout, world, lengths)
    members = [m for step in plan for per_rank in step for mb in per_rank for m in mb]
    assert sorted(members) == [(g, j) for g in range(8) for j in range(4)]
    for step in plan:
        assert len({len(per_rank) for per_rank in step}) == 1  # same micro-batch count on every rank
        for per_rank in step:
            for mb in per_rank:
                if not mb:
                    continue
                cost = len(mb) * (max(lengths[g][0] for g, _ in mb) + max(lengths[g][1][j] for g, j in mb))
                unit = 4 if whole_groups else 1
                assert cost <= 900 or len(mb) == unit  # only a single oversized unit may exceed it
                if whole_groups:
                    assert all(sum(1 for h, _ in mb if h == g) == 4 for g, _ in mb)


def test_token_budget_cuts_padding_on_a_long_tail():
    lengths = _long_tail_lengths(num_groups=32, num_answers=8)
    by_count = plan_steps(32, 8, StepLayout(num_mini_batches=2, micro_batch_size=16), 1, lengths)
    by_tokens = plan_steps(32, 8, StepLayout(num_mini_batches=2, max_tokens_per_micro_batch=16 * 128), 1, lengths)
    waste = [1 - real / computed for computed, real in (_padded(by_count, lengths), _padded(by_tokens, lengths))]
    assert waste[0] > 0.4 and waste[1] < 0.1


def test_padding_fraction_counts_the_padded_positions_of_real_micro_batches():
    groups, pad = _groups()
    steps = _steps(groups, pad, StepLayout(num_mini_batches=1, micro_batch_size=16))
    mb = steps[0].micro_batches[0]
    assert padding_fraction(steps) == pytest.approx(1 - float(mb.attention_mask.sum()) / mb.attention_mask.numel())
    assert padding_fraction([]) is None


def test_token_budget_needs_lengths_and_a_positive_value():
    with pytest.raises(ValueError, match="needs every group's lengths"):
        plan_steps(2, 4, StepLayout(max_tokens_per_micro_batch=64), 1)
    with pytest.raises(ValueError, match=r"datamodule\.max_tokens_per_micro_batch"):
        StepLayout(max_tokens_per_micro_batch=0)
