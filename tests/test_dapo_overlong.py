"""DAPO's overlong penalty at official strength: factor 0.5 on nft-lit's 0/1 rewards is the official recipe's
factor 1.0 on its ±1 scores (docs/ALGORITHMS.md, "DAPO"): same advantages, loss and gradient."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nft_lit.iteration import RewardShaping
from nft_lit.losses import DAPOLoss, LossBatch, group_stats

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MAX_NEW_TOKENS, BUFFER = 20, 8  # the penalty ramps over lengths 12..20
OFFICIAL_EPS = 1e-6  # the std epsilon of the official group normalisation
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # DAPO's clip-higher


def _dapo_config():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="algorithm/dapo").algorithm


def _stats64(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer's group mean and Bessel-corrected std, in float64 (``group_stats`` returns float32)."""
    mean, std = torch.empty_like(rewards), torch.empty_like(rewards)
    for g in group_ids.unique():
        members = group_ids == g
        mean[members], std[members] = rewards[members].mean(), rewards[members].std()
    return mean, std


def _step(seed: int = 0):
    """5 groups of 6 answers: correctness, lengths (many inside the buffer), old and new log-probs (float64)."""
    gen = torch.Generator().manual_seed(seed)
    num_groups, k = 5, 6
    group_ids = torch.arange(num_groups).repeat_interleave(k)
    correct = (torch.rand(num_groups * k, generator=gen) < 0.5).double()
    correct[0:k] = 1.0  # an all-correct group: only the overlong penalty separates its answers
    correct[k : 2 * k] = 0.0  # an all-wrong one
    lengths = torch.randint(6, MAX_NEW_TOKENS + 1, (num_groups * k,), generator=gen)
    lengths[2 * k : 3 * k] = 8  # a mixed group with no overlong answer
    correct[2 * k : 3 * k] = torch.tensor([1.0, 0, 1, 0, 0, 0])
    mask = (torch.arange(MAX_NEW_TOKENS)[None, :] < lengths[:, None]).double()
    old = -torch.rand(num_groups * k, MAX_NEW_TOKENS, generator=gen, dtype=torch.float64) * 3 - 0.1
    # ratios in [e^-0.9, e^0.9] = [0.41, 2.46]: many clipped, none reaching a dual clip (> 3)
    drift = (0.4 * torch.randn(num_groups * k, MAX_NEW_TOKENS, generator=gen, dtype=torch.float64)).clamp(-0.9, 0.9)
    return correct, lengths, group_ids, mask, old, old + drift


def _official_loss_and_grad(correct, lengths, group_ids, mask, old, new):
    """The official recipe from its definition: score = +1 / -1 (correct / not), plus the soft overlong
    punishment min(-(L - (L_max - B)) / B · factor, 0) with factor 1.0; A = (score - mean_q) / (std_q + eps)
    (Bessel std over the prompt's answers); loss = token-mean over the batch of max(-A·R, -A·clip(R, 1 - 0.2,
    1 + 0.28))."""
    expected_len = MAX_NEW_TOKENS - BUFFER
    penalty = torch.clamp(-(lengths.double() - expected_len) / BUFFER * 1.0, max=0.0)
    score = torch.where(correct > 0, 1.0, -1.0).double() + penalty
    mean, std = _stats64(score, group_ids)
    adv = ((score - mean) / (std + OFFICIAL_EPS))[:, None]
    new = new.clone().requires_grad_(True)
    ratio = (new - old).exp()
    token_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    loss = (token_loss * mask).sum() / mask.sum()
    (grad,) = torch.autograd.grad(loss, new)
    return loss.detach(), grad


def _ours_loss_and_grad(factor, std_eps, correct, lengths, group_ids, mask, old, new):
    """nft-lit: 0/1 reward shaped by RewardShaping (overlong_buffer, overlong_penalty_factor), DAPOLoss from
    configs/algorithm/dapo.yaml; group statistics in float64 so the comparison can be to 1e-12."""
    shaping = RewardShaping(buffer=BUFFER, factor=factor)
    rewards = torch.tensor(shaping(correct.tolist(), lengths.tolist(), MAX_NEW_TOKENS), dtype=torch.float64)
    mean, std = _stats64(rewards, group_ids)
    mean32, std32 = group_stats(rewards, group_ids)  # the pipeline's statistics: the same, in float32
    assert torch.allclose(mean32.double(), mean, atol=1e-6) and torch.allclose(std32.double(), std, atol=1e-6)
    loss_fn = instantiate({**_dapo_config().loss, "std_eps": std_eps})
    assert isinstance(loss_fn, DAPOLoss)
    batch = LossBatch(
        old_logprobs=old, response_mask=mask, rewards=rewards, group_ids=group_ids, group_mean=mean, group_std=std
    )
    new = new.clone().requires_grad_(True)
    loss = loss_fn(new, batch).loss
    (grad,) = torch.autograd.grad(loss, new)
    return loss.detach(), grad


def test_dapo_config_uses_half_the_official_factor_on_binary_rewards():
    cfg = _dapo_config()
    assert cfg.overlong_penalty_factor == 0.5 and cfg.overlong_buffer == 512
    assert cfg.loss.std_eps == OFFICIAL_EPS / 2 and cfg.loss.agg == "token-mean"
    assert (cfg.loss.clip_low, cfg.loss.clip_high, cfg.loss.dual_clip) == (CLIP_LOW, CLIP_HIGH, None)


def test_factor_half_on_binary_rewards_is_the_official_gradient():
    """±1 scores are 2·r − 1 for r in {0, 1}; with the penalty scaled the same way (official 1.0 = 2 × 0.5) the
    whole official score is 2·(shaped 0/1 reward) − 1, so A = 2(r − mean) / (2·std + eps): the same advantage
    as nft-lit's at std_eps = eps / 2, hence the same loss and gradient."""
    step = _step()
    official_loss, official_grad = _official_loss_and_grad(*step)
    assert official_grad.abs().max() > 1e-3 and (official_grad[step[3] == 0] == 0).all()

    cfg = _dapo_config()
    factor = cfg.overlong_penalty_factor
    loss, grad = _ours_loss_and_grad(factor, cfg.loss.std_eps, *step)
    torch.testing.assert_close(grad, official_grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, official_loss, rtol=0, atol=1e-12)

    # at GRPO's std_eps (1e-6, the official number on the other scale) the advantages differ by |A|·eps/(2 std)
    _, grad_same_eps = _ours_loss_and_grad(factor, OFFICIAL_EPS, *step)
    relative = (grad_same_eps - official_grad).abs().max() / official_grad.abs().max()
    assert 1e-12 < relative < 1e-5

    # the old factor 1.0 on 0/1 rewards is twice the official penalty: a different gradient
    _, grad_old = _ours_loss_and_grad(1.0, OFFICIAL_EPS / 2, *step)
    assert (grad_old - official_grad).abs().max() > 0.05 * official_grad.abs().max()
