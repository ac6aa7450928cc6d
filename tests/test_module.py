import lightning.pytorch as pl
import pytest
import torch
from _rollout_fakes import ITERATION_METRICS, make_datamodule

from nft_lit.datamodule import ROLLOUT_TRAINER_SETTINGS
from nft_lit.losses import (
    AGGREGATIONS,
    DAPOLoss,
    DrGRPOLoss,
    GRPOLoss,
    InfoNCALoss,
    NFTLoss,
    RFTLoss,
)
from nft_lit.models import tiny_causal_lm
from nft_lit.module import PolicyModule, response_logprobs_and_entropy


def _model():
    return tiny_causal_lm(vocab_size=14, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64, seed=3)


class _GradRecorder(PolicyModule):
    """Records the gradient of every optimizer step (Adam's update hides tiny differences in sign flips)."""

    def _clip_gradients(self):
        self.grads = getattr(self, "grads", [])
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters()})
        return super()._clip_gradients()


def _fit(loss, iterations=1, compile=False, lr=1e-2, **dm_kwargs):
    torch.manual_seed(0)
    module = _GradRecorder(_model(), loss, lr=lr, warmup_steps=0, weight_decay=0.0, grad_clip=None, compile=compile)
    dm = make_datamodule(**dm_kwargs)
    trainer = pl.Trainer(
        max_epochs=iterations,
        **ROLLOUT_TRAINER_SETTINGS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, dm)
    return module, trainer


def test_logprobs_match_unpadded_per_sequence_computation():
    model = _model().eval()
    prompts = [[3, 4, 5], [6, 7]]
    responses = [[8, 9, 1], [10]]
    ids = torch.tensor([[3, 4, 5, 8, 9, 1], [0, 6, 7, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    lp, ent = response_logprobs_and_entropy(model, ids, mask, prompt_len=3, temperature=0.7)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        seq = torch.tensor([p + r])
        logits = model(input_ids=seq).logits[0, len(p) - 1 : -1].float() / 0.7
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        assert torch.allclose(lp[i, : len(r)], ref, atol=1e-5)
        assert (ent[i, : len(r)] > 0).all()


@pytest.mark.parametrize("loss", [NFTLoss(), GRPOLoss()], ids=["nft", "grpo"])
def test_micro_batching_does_not_change_the_update(loss):
    """Exact aggregation: one optimizer step over 1-sequence micro-batches == one over the whole mini-batch."""
    small, _ = _fit(loss, micro_batch_size=1, num_mini_batches=2, dynamic_sampling=isinstance(loss, NFTLoss))
    large, _ = _fit(loss, micro_batch_size=16, num_mini_batches=2, dynamic_sampling=isinstance(loss, NFTLoss))
    assert len(small.grads) == len(large.grads) == 2
    for gs, gl in zip(small.grads, large.grads, strict=True):
        assert any(g.abs().max() > 1e-4 for g in gs.values())
        for name, g in gs.items():
            assert torch.allclose(g, gl[name], atol=1e-6, rtol=1e-4), name


def _every_loss_and_aggregation():
    for agg in AGGREGATIONS:
        for make in (NFTLoss, RFTLoss, GRPOLoss, DrGRPOLoss, DAPOLoss, InfoNCALoss):
            yield pytest.param(make, agg, id=f"{make.__name__}-{agg}")


@pytest.mark.parametrize(("make_loss", "agg"), list(_every_loss_and_aggregation()))
def test_token_budget_micro_batches_give_the_one_big_batch_gradient(make_loss, agg):
    """Length-sorted micro-batches packed to a token budget (and the first step's logπ_old taken from its
    training forward) give the gradient of each step as one micro-batch with an old-log-prob pass."""
    loss = make_loss(agg=agg, agg_constant=9.0)
    options = {
        "num_mini_batches": 2,
        "dynamic_sampling": loss.requires_binary_rewards,
        "whole_groups": loss.requires_whole_groups,
    }
    # A tiny lr: Adam's first update is ~lr x sign(gradient), so at lr 1e-2 rounding-level differences in the
    # first step's gradient flip signs and move the second step's weights apart.
    budget, _ = _fit(loss, lr=1e-9, max_tokens_per_micro_batch=12, **options)
    one_batch, _ = _fit(loss, lr=1e-9, micro_batch_size=16, old_logprobs_from_forward=False, **options)
    assert len(budget.grads) == len(one_batch.grads) == 2
    for gb, g1 in zip(budget.grads, one_batch.grads, strict=True):
        assert any(g.abs().max() > 1e-5 for g in gb.values())
        for name, g in gb.items():
            # float32 sums in another order: equal to rounding, relative to the gradient's scale
            assert torch.allclose(g, g1[name], atol=1e-5 * float(g1[name].abs().max()), rtol=1e-4), name


def test_whole_group_loss_trains_and_logs_iteration_scalars():
    _, trainer = _fit(InfoNCALoss(), iterations=2, whole_groups=True, micro_batch_size=4)
    m = trainer.logged_metrics
    for key in ITERATION_METRICS:
        assert key in m, key
    assert trainer.global_step == 4  # 2 iterations x 2 optimizer steps
    assert float(m["train/grad_norm"]) > 0


def test_warmup_then_constant_lr():
    module = PolicyModule(_model(), NFTLoss(), lr=1.0, warmup_steps=4)
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_bad_module_options_name_the_option():
    with pytest.raises(ValueError, match=r"module\.lr"):
        PolicyModule(_model(), NFTLoss(), lr=0.0)
    with pytest.raises(ValueError, match=r"module\.warmup_steps"):
        PolicyModule(_model(), NFTLoss(), warmup_steps=-1)


def test_lightning_fsdp1_strategy_is_refused_at_setup():
    """FSDPStrategy runs training_step inside the root unit's forward, where our per-micro-batch backward fails
    (seen on an H200: 'Expects BACKWARD_PRE or BACKWARD_POST state'). Lightning only builds it on a GPU, so the
    check is called with the strategy object itself."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    module = PolicyModule(_model(), NFTLoss())
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"trainer\.strategy: .*FSDPStrategy.*trainer=gpu_fsdp"):
        module.setup("fit")
    module._trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    module.setup("fit")


def test_activation_checkpointing_gives_the_same_gradients():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from nft_lit.module import decoder_layer_classes

    assert decoder_layer_classes(_model()) == {LlamaDecoderLayer}  # the FSDP2 wrap unit
    grads = []
    for checkpointing in (False, True):
        module = PolicyModule(_model(), NFTLoss(), activation_checkpointing=checkpointing)
        module.configure_model()
        assert module.model.is_gradient_checkpointing == checkpointing
        module.model.train()
        ids = torch.tensor([[3, 4, 5, 8, 9, 1], [0, 6, 7, 10, 11, 12]])
        lp, _ = response_logprobs_and_entropy(module.model, ids, (ids > 0).long(), prompt_len=3, temperature=1.0)
        lp.sum().backward()
        grads.append({n: p.grad for n, p in module.model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


@pytest.mark.slow
def test_compiled_log_prob_forward_gives_the_eager_gradients():
    """module.compile=true: the same optimizer-step gradients over two iterations (old log-probs included)."""
    eager, _ = _fit(NFTLoss(), iterations=2)
    compiled, _ = _fit(NFTLoss(), iterations=2, compile=True)
    assert len(eager.grads) == len(compiled.grads) >= 2
    for step_e, step_c in zip(eager.grads, compiled.grads, strict=True):
        for name, grad in step_e.items():
            torch.testing.assert_close(step_c[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_kl_penalty_uses_a_frozen_reference_copy():
    module, trainer = _fit(GRPOLoss(kl_coef=0.5), iterations=1, dynamic_sampling=False)
    assert module.ref_model is not None
    assert all(not p.requires_grad for p in module.ref_model.parameters())
    init = _model().state_dict()
    for name, p in module.ref_model.state_dict().items():
        assert torch.equal(p, init[name]), name  # the reference never moves
    assert any(not torch.equal(p, init[n]) for n, p in module.model.state_dict().items())
    # GRPOLoss.validate_batch refuses kl_coef > 0 without ref_logprobs: the steps ran, so they were given
    assert trainer.global_step == 2


def test_rollout_loop_refuses_a_trainer_that_keeps_its_first_loader():
    """Without reloading every epoch the loop would train on the first iteration's rollouts forever."""
    module = PolicyModule(_model(), NFTLoss(), lr=1e-2, warmup_steps=0)
    trainer = pl.Trainer(
        max_epochs=2,
        **{**ROLLOUT_TRAINER_SETTINGS, "reload_dataloaders_every_n_epochs": 0},
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        trainer.fit(module, make_datamodule())


def test_logged_loss_parts_add_up_to_the_step_loss():
    """Positive/negative parts are shares of the step loss: summed over micro-batches, not averaged."""
    # two optimizer steps: the last one is off-policy, so its loss (0 on-policy for NFT) and parts are non-zero
    _, trainer = _fit(NFTLoss(), micro_batch_size=2, num_mini_batches=2, dynamic_sampling=True)
    m = trainer.callback_metrics
    assert float(m["train/loss/positive"]) != 0.0 and float(m["train/loss/negative"]) != 0.0
    parts = float(m["train/loss/positive"]) + float(m["train/loss/negative"])
    assert parts == pytest.approx(float(m["train/loss"]), rel=1e-5, abs=1e-8)


def test_the_loss_declares_how_each_metric_reduces_over_the_step():
    """The module combines the loss's metrics by their declared reduction, never by their names."""
    from nft_lit.losses import LossOutput

    class _CustomMetricLoss(NFTLoss):
        def forward(self, logprobs, batch):
            out = super().forward(logprobs, batch)
            tokens = batch.response_mask.sum()
            metrics = {**out.metrics, "mine/total_tokens": tokens, "mine/fewest_tokens": tokens}
            reductions = {**out.reductions, "mine/total_tokens": "sum", "mine/fewest_tokens": "min"}
            return LossOutput(out.loss, metrics, reductions)

    _, trainer = _fit(_CustomMetricLoss(), micro_batch_size=2, num_mini_batches=1, dynamic_sampling=True)
    m = trainer.callback_metrics
    # one step of 4 groups x 4 answers in micro-batches of 2 answers: "sum" adds every micro-batch's tokens
    assert float(m["train/mine/total_tokens"]) > float(m["train/mine/fewest_tokens"]) > 0
    with pytest.raises(ValueError, match="declare no reduction"):
        LossOutput(torch.zeros(()), {"x": torch.zeros(())})
