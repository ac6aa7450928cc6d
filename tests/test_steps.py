"""Kept groups -> optimizer steps without a Trainer: the pure planner, batching, old log-probs."""

import pytest
import torch
from _rollout_fakes import FakeSampling, addition_problems, make_sampler

from nft_lit.iteration import PromptStream, RolloutSettings, collect_groups
from nft_lit.losses import group_stats
from nft_lit.rollout import LogprobGapError
from nft_lit.steps import StepLayout, build_steps, fill_old_logprobs, plan_steps


def _groups(n=4):
    problems = addition_problems(40)
    settings = RolloutSettings(prompts_per_step=n, num_answers=4, dynamic_sampling=False, seed=1)
    sampler = make_sampler()
    groups, _ = collect_groups(problems, PromptStream(40, 1), sampler, FakeSampling(), settings, 0)
    return groups, sampler.tokenizer.pad_token_id


def _steps(groups, pad, layout, world=1, rank=0, temperature=1.0):
    return build_steps(groups, plan_steps(len(groups), 4, layout, world), rank, 4, pad, temperature)


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

    gap = fill_old_logprobs(steps, logprob_fn, "cpu")
    assert seen and set(seen) == {0.7}
    assert gap == pytest.approx(0.5)  # the fake engine reports -1.0 for every token
    for step in steps:
        for mb in step.micro_batches:
            lb = mb.loss_batch
            assert torch.equal(lb.old_logprobs, -1.5 * lb.response_mask)
    with pytest.raises(LogprobGapError, match="exceeds max_gap"):
        fill_old_logprobs(steps, logprob_fn, "cpu", max_gap=0.1)
    with pytest.raises(LogprobGapError, match="engine runs in bfloat16 but the policy is float32"):
        fill_old_logprobs(steps, logprob_fn, "cpu", max_gap=0.1, dtypes=(torch.bfloat16, torch.float32))


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
    assert fill_old_logprobs(steps, lambda ids, mask, n, t: torch.zeros(ids.shape[0], ids.shape[1] - n), "cpu") is None
