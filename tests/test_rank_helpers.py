"""nft_lit.distributed without a process group, and as rank k of n."""

from _rollout_fakes import addition_problems

import nft_lit.distributed as dist
from nft_lit.distributed import all_gather_objects, derive_seed, rank_and_world, shard_batches


def test_one_rank_without_a_process_group():
    assert rank_and_world() == (0, 1)
    assert all_gather_objects({"a": 1}) == [{"a": 1}]


def test_shard_batches_give_every_rank_identical_chunk_shapes(monkeypatch):
    problems = addition_problems(7)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(dist, "rank_and_world", lambda rank=rank: (rank, 3))
        shards.append(shard_batches(problems, batch_size=2))
    assert [[len(c) for c, _ in s] for s in shards] == [[2, 1]] * 3
    scored = [p.id for s in shards for c, real in s for p in c[:real]]
    assert sorted(scored) == sorted(p.id for p in problems)  # each problem scored exactly once


def test_derived_seeds_are_distinct_and_stable():
    seeds = {derive_seed(0, i, r, k) for i in range(10) for r in range(5) for k in range(4)}
    assert len(seeds) == 200
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) < 2**31
