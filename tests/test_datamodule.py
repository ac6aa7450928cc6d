"""RolloutDataModule as an adapter: it hands the stages their inputs, with the policy as an argument."""

import pytest
import torch
from _rollout_fakes import make_datamodule

from nft_lit.models import tiny_causal_lm
from nft_lit.module import response_logprobs_and_entropy
from nft_lit.rollout import LogprobGapError


def _policy():
    return tiny_causal_lm(vocab_size=14, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64, seed=3)


def _logprob_fn(model):
    return lambda ids, mask, prompt_len, t: response_logprobs_and_entropy(model, ids, mask, prompt_len, t)[0]


def test_one_iteration_runs_without_a_trainer_and_hands_its_statistics_to_the_first_step():
    dm = make_datamodule(num_mini_batches=2)
    model = _policy()
    steps = dm.rollout(model, _logprob_fn(model), "cpu")
    assert len(steps) == 2 and dm.sampler.engine.syncs == 1
    assert steps[0].rollout_stats["kept_groups"] == 4.0 and steps[1].rollout_stats == {}
    assert steps[0].rollout_stats["logprob_gap"] > 0  # the fake engine's log-probs are not the model's
    assert all(s.temperature == 1.0 for s in steps)
    assert dm.state_dict() == {"cursor": dm.stream.cursor, "iteration": 0} and dm.stream.cursor > 0
    assert model.training  # restored after the old-log-prob pass


def test_the_gap_check_names_an_engine_running_in_another_dtype():
    dm = make_datamodule(max_logprob_gap=1e-6)
    dm.sampler.engine.dtype = torch.bfloat16  # an engine with its own weights copy, in bf16
    model = _policy()
    with pytest.raises(LogprobGapError, match="engine runs in bfloat16 but the policy is float32"):
        dm.rollout(model, _logprob_fn(model), "cpu")
