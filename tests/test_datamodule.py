"""The iteration stage (driver.RolloutIteration) without a trainer, and RolloutDataModule as its adapter: the
policy comes in as an argument, the iteration's statistics and pending gap go to the module explicitly."""

import pytest
import torch
from _rollout_fakes import make_datamodule

from nft_lit.driver import IterationResult
from nft_lit.models import tiny_causal_lm
from nft_lit.module import response_logprobs_and_entropy
from nft_lit.rollout import LogprobGapError


def _policy():
    return tiny_causal_lm(vocab_size=14, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64, seed=3)


def _logprob_fn(model):
    return lambda ids, mask, prompt_len, t: response_logprobs_and_entropy(model, ids, mask, prompt_len, t)[0]


def test_one_iteration_runs_without_a_trainer_and_returns_its_statistics_beside_the_steps():
    phases = []
    dm = make_datamodule(num_mini_batches=2, old_logprobs_from_forward=False, on_phase=phases.append)
    model = _policy()
    result = dm.stage.run(model, _logprob_fn(model), "cpu", iteration=0)
    assert isinstance(result, IterationResult) and result.pending_gap is None
    steps, stats = result.steps, result.stats
    assert len(steps) == 2 and dm.sampler.engine.syncs == 1
    assert stats["rollout/kept_groups"] == 4.0 and stats["rollout/optimizer_steps"] == 2.0
    assert stats["rollout/logprob_gap"] > 0  # the fake engine's log-probs are not the model's
    names = ("sync", "generate", "verify", "verify_wait", "filter", "plan", "old_logprobs")
    assert all(stats[f"seconds/{p}"] >= 0 for p in names)
    assert stats["seconds/rollout"] >= sum(stats[f"seconds/{p}"] for p in ("sync", "generate", "plan", "old_logprobs"))
    assert 0 <= stats["rollout/padding_fraction"] < 1
    assert all(s.temperature == 1.0 for s in steps)
    assert dm.state_dict() == {"cursor": dm.stream.cursor, "iteration": 0} and dm.stream.cursor > 0
    assert model.training  # restored after the old-log-prob pass
    assert phases == ["sync", "generate", "plan", "old-logprobs"]


def test_the_gap_check_names_an_engine_running_in_another_dtype():
    dm = make_datamodule(max_logprob_gap=1e-6, old_logprobs_from_forward=False)
    dm.sampler.engine.dtype = torch.bfloat16  # an engine with its own weights copy, in bf16
    model = _policy()
    with pytest.raises(LogprobGapError, match="engine runs in bfloat16 but the policy is float32"):
        dm.stage.run(model, _logprob_fn(model), "cpu", iteration=0)


def test_the_first_step_takes_its_old_logprobs_from_the_training_forward():
    """Step 0 is exactly on-policy: the old-log-prob pass skips it and leaves the gap for the module to finish."""
    dm = make_datamodule(num_mini_batches=2)
    model = _policy()
    calls = []

    def counting(ids, mask, prompt_len, t):
        calls.append(ids.shape[0])
        return _logprob_fn(model)(ids, mask, prompt_len, t)

    result = dm.stage.run(model, counting, "cpu", iteration=0)
    steps, gap = result.steps, result.pending_gap
    assert steps[0].old_logprobs_from_forward and not steps[1].old_logprobs_from_forward
    assert sum(calls) == sum(mb.input_ids.shape[0] for mb in steps[1].micro_batches)  # only step 1's answers
    assert gap is not None and "rollout/logprob_gap" not in result.stats
    for mb in steps[0].micro_batches:  # the module adds step 0's tokens; here, by hand
        logprobs = _logprob_fn(model)(mb.input_ids, mb.attention_mask, mb.prompt_len, 1.0)
        steps[0].take_old_logprobs(mb, logprobs, gap)
    assert gap.finish() > 0


def test_a_model_with_dropout_keeps_the_old_logprob_pass_for_every_step():
    dm = make_datamodule(num_mini_batches=2)
    model = _policy()
    model.model.layers[0].mlp.act_fn = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Dropout(0.1))
    result = dm.stage.run(model, _logprob_fn(model), "cpu", iteration=0)
    assert not result.steps[0].old_logprobs_from_forward and result.pending_gap is None
    assert result.stats["rollout/logprob_gap"] > 0


def test_the_adapter_hands_the_iteration_to_the_policy_and_announces_training():
    """train_dataloader: the policy read from the trainer, the stage run for this epoch, its statistics and
    pending gap given to the policy (begin_iteration), not carried in the batches; the phase hook sees "train"."""
    from types import SimpleNamespace

    model = _policy()
    received = []
    policy = SimpleNamespace(
        model=model,
        response_logprobs=_logprob_fn(model),
        device=torch.device("cpu"),
        begin_iteration=lambda stats, gap: received.append((stats, gap)),
    )
    phases = []
    dm = make_datamodule(num_mini_batches=2)
    dm.on_phase = phases.append  # wired after construction, as a front end does with its progress bar
    dm.trainer = SimpleNamespace(current_epoch=3, lightning_module=policy)
    steps = list(dm.train_dataloader())
    assert len(steps) == 2 and dm.iteration == 3
    [(stats, gap)] = received
    assert stats["rollout/kept_groups"] == 4.0 and gap is not None  # step 0 takes logπ_old from its forward
    assert not any(hasattr(s, "rollout_stats") or hasattr(s, "pending_gap") for s in steps)
    assert phases == ["sync", "generate", "plan", "old-logprobs", "train"]


def test_the_resumed_iteration_is_not_generated_again():
    """After load_state_dict, Lightning sets up the finished epoch again: an empty step, no prompt consumed."""
    from types import SimpleNamespace

    dm = make_datamodule()
    dm.load_state_dict({"cursor": 24, "iteration": 5})
    dm.trainer = SimpleNamespace(current_epoch=5, lightning_module=None)
    [step] = list(dm.train_dataloader())
    assert not step.micro_batches and dm.stream.cursor == 24 and dm.sampler.engine.syncs == 0
    assert dm.state_dict() == {"cursor": 24, "iteration": 5}


def test_the_progress_bar_takes_phases_before_it_has_a_trainer():
    """A front end wires ``on_phase`` to ``PhaseProgressBar.set_phase`` when it builds both, before fit."""
    from nft_lit.callbacks import PhaseProgressBar

    bar = PhaseProgressBar()
    dm = make_datamodule(on_phase=bar.set_phase)
    dm.on_phase("sync")  # no bar shown yet: nothing to update, no trainer needed
    assert dm.on_phase == bar.set_phase
    dm.on_phase = None
    dm.on_phase("generate")  # back to the default: nobody listens
