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
    dm = make_datamodule(num_mini_batches=2, old_logprobs_from_forward=False)
    model = _policy()
    steps = dm.rollout(model, _logprob_fn(model), "cpu")
    assert len(steps) == 2 and dm.sampler.engine.syncs == 1
    stats = steps[0].rollout_stats
    assert stats["rollout/kept_groups"] == 4.0 and steps[1].rollout_stats == {}
    assert stats["rollout/logprob_gap"] > 0  # the fake engine's log-probs are not the model's
    phases = ("sync", "generate", "verify", "verify_wait", "filter", "plan", "old_logprobs")
    assert all(stats[f"seconds/{p}"] >= 0 for p in phases)
    assert stats["seconds/rollout"] >= sum(stats[f"seconds/{p}"] for p in ("sync", "generate", "plan", "old_logprobs"))
    assert 0 <= stats["rollout/padding_fraction"] < 1
    assert all(s.temperature == 1.0 for s in steps)
    assert dm.state_dict() == {"cursor": dm.stream.cursor, "iteration": 0} and dm.stream.cursor > 0
    assert model.training  # restored after the old-log-prob pass


def test_the_gap_check_names_an_engine_running_in_another_dtype():
    dm = make_datamodule(max_logprob_gap=1e-6, old_logprobs_from_forward=False)
    dm.sampler.engine.dtype = torch.bfloat16  # an engine with its own weights copy, in bf16
    model = _policy()
    with pytest.raises(LogprobGapError, match="engine runs in bfloat16 but the policy is float32"):
        dm.rollout(model, _logprob_fn(model), "cpu")


def test_the_first_step_takes_its_old_logprobs_from_the_training_forward():
    """Step 0 is exactly on-policy: the old-log-prob pass skips it and leaves the gap for the module to finish."""
    dm = make_datamodule(num_mini_batches=2)
    model = _policy()
    calls = []

    def counting(ids, mask, prompt_len, t):
        calls.append(ids.shape[0])
        return _logprob_fn(model)(ids, mask, prompt_len, t)

    steps = dm.rollout(model, counting, "cpu")
    assert steps[0].old_logprobs_from_forward and not steps[1].old_logprobs_from_forward
    assert sum(calls) == sum(mb.input_ids.shape[0] for mb in steps[1].micro_batches)  # only step 1's answers
    assert steps[0].pending_gap is not None and "rollout/logprob_gap" not in steps[0].rollout_stats
    for mb in steps[0].micro_batches:  # the module adds step 0's tokens; here, by hand
        steps[0].pending_gap.add(
            mb.engine_logprobs,
            _logprob_fn(model)(mb.input_ids, mb.attention_mask, mb.prompt_len, 1.0),
            mb.loss_batch.response_mask,
        )
    assert steps[0].pending_gap.finish() > 0


def test_a_model_with_dropout_keeps_the_old_logprob_pass_for_every_step():
    dm = make_datamodule(num_mini_batches=2)
    model = _policy()
    model.model.layers[0].mlp.act_fn = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Dropout(0.1))
    steps = dm.rollout(model, _logprob_fn(model), "cpu")
    assert not steps[0].old_logprobs_from_forward and steps[0].pending_gap is None
    assert steps[0].rollout_stats["rollout/logprob_gap"] > 0
