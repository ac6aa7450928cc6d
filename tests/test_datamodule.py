import pytest
import torch
from _rollout_fakes import make_datamodule

from nft_lit.losses import group_stats


def test_dynamic_sampling_keeps_only_mixed_groups_and_counts_rounds():
    dm = make_datamodule(gen_prompts_per_round=4, max_gen_rounds=5)
    dm.setup()
    kept, stats = dm.collect()
    assert len(kept) == 4
    assert all(0.0 < g.pass_rate < 1.0 for g in kept)
    assert stats["kept_groups"] == 4.0
    assert 1 <= stats["gen_rounds"] <= 5
    # Each round consumes gen_prompts_per_round prompts (a resumed run continues from this cursor).
    assert dm.cursor == 4 * stats["gen_rounds"]


def test_no_dynamic_sampling_keeps_every_group():
    dm = make_datamodule(dynamic_sampling=False)
    dm.setup()
    kept, stats = dm.collect()
    assert len(kept) == 4 and stats["gen_rounds"] == 1.0 and dm.cursor == 4


def test_strict_raises_when_rounds_run_out():
    dm = make_datamodule(gen_prompts_per_round=4, max_gen_rounds=1, prompts_per_step=8, strict=True)
    dm.setup()
    with pytest.raises(RuntimeError, match=r"data\.strict=true"):
        dm.collect()


def test_prompt_order_is_a_seeded_permutation_per_pass():
    dm = make_datamodule()
    first = [dm._problem_at(i) for i in range(40)]
    second = [dm._problem_at(40 + i) for i in range(40)]
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40))
    assert first != second
    assert first == [make_datamodule()._problem_at(i) for i in range(40)]
    assert first != [make_datamodule(seed=2)._problem_at(i) for i in range(40)]


def test_steps_carry_whole_group_stats_and_step_normalisers():
    dm = make_datamodule(dynamic_sampling=False, num_mini_batches=2, micro_batch_size=3)
    dm.setup()
    groups, _ = dm.collect()
    steps = dm.build_steps(groups)
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
    dm = make_datamodule(dynamic_sampling=False, whole_groups=True, micro_batch_size=5, num_mini_batches=2)
    dm.setup()
    groups, _ = dm.collect()
    for step in dm.build_steps(groups):
        for mb in step.micro_batches:
            ids = mb.loss_batch.group_ids
            assert all(int((ids == g).sum()) == 4 for g in ids.unique())


def test_plan_pads_ranks_to_equal_micro_batch_counts(monkeypatch):
    import nft_lit.datamodule as dmod

    dm = make_datamodule(dynamic_sampling=False, num_mini_batches=1, micro_batch_size=4, whole_groups=True)
    dm.setup()
    groups, _ = dm.collect()
    monkeypatch.setattr(dmod, "_world", lambda: (0, 3))
    plan = dm.plan(groups[:4])
    counts = [len(per_rank) for per_rank in plan[0]]
    assert counts == [2, 2, 2]  # rank 0 holds 2 groups, ranks 1-2 one each + an empty padding micro-batch
    assert sum(1 for mbs in plan[0] for mb in mbs if not mb) == 2
    monkeypatch.setattr(dmod, "_world", lambda: (1, 3))
    step = dm.build_steps(groups[:4])[0]
    assert [mb.is_padding for mb in step.micro_batches] == [False, True]
    assert float(step.micro_batches[1].loss_batch.response_mask.sum()) == 0.0


def test_generation_seed_depends_on_iteration_round_and_rank():
    dm = make_datamodule(gen_prompts_per_round=4, max_gen_rounds=3)
    dm.setup()
    dm.iteration = 0
    dm.collect()
    dm.iteration = 1
    dm.collect()
    seeds = dm.engine.seeds
    assert len(seeds) == len(set(seeds))


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="num_answers"):
        make_datamodule(num_answers=1)
    with pytest.raises(ValueError, match=r"data\.num_mini_batches"):
        make_datamodule(num_mini_batches=0)
    with pytest.raises(ValueError, match="overlong_buffer"):
        make_datamodule(overlong_buffer=0)


def test_shard_batches_give_every_rank_identical_chunk_shapes(monkeypatch):
    from _rollout_fakes import addition_problems

    import nft_lit.datamodule as dmod

    problems = addition_problems(7)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(dmod, "_world", lambda rank=rank: (rank, 3))
        shards.append(dmod.shard_batches(problems, batch_prompts=2))
    assert [[len(c) for c, _ in s] for s in shards] == [[2, 1]] * 3
    scored = [p.id for s in shards for c, real in s for p in c[:real]]
    assert sorted(scored) == sorted(p.id for p in problems)  # each problem scored exactly once
