"""The loss library against the paper (Eq. 10, Prop. 4.1/4.2, App. B) and against exact aggregation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nft_lit.analysis import gradient_weights, grpo_weight_closed_form, nft_weight_closed_form
from nft_lit.losses import (
    AGGREGATIONS,
    DAPOLoss,
    DrGRPOLoss,
    GRPOLoss,
    InfoNCALoss,
    LossBatch,
    NFTLoss,
    PolicyLoss,
    RFTLoss,
    group_sizes,
    group_stats,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALGORITHMS = sorted(p.stem for p in (CONFIG_DIR / "algorithm").glob("*.yaml"))
# no value sits on a clip boundary (0.8, 0.9, 1.2, 1.28, 1.5), where the subgradient is ambiguous
RATIOS = torch.tensor(
    [0.05, 0.3, 0.7, 0.85, 0.95, 0.99, 1.0, 1.05, 1.25, 1.45, 2.0, 3.0, 8.0, 50.0], dtype=torch.float64
)


def make_loss(name: str, **overrides: object) -> PolicyLoss:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name=f"algorithm/{name}")
    node = cfg.algorithm.loss
    for key, value in overrides.items():
        node[key] = value
    return instantiate(node)


def random_step(
    num_groups: int = 4, k: int = 4, t: int = 6, seed: int = 0, binary: bool = True, drift: float = 0.3
) -> tuple[torch.Tensor, LossBatch]:
    """A whole optimizer step: mixed groups, ragged lengths, log-probs drifted off-policy by ~drift."""
    gen = torch.Generator().manual_seed(seed)
    b = num_groups * k
    group_ids = torch.arange(num_groups).repeat_interleave(k)
    rewards = torch.zeros(b)
    for g in range(num_groups):  # every group mixed: r̂ = (g % (k - 1) + 1) / k
        rewards[g * k : g * k + (g % (k - 1)) + 1] = 1.0
    if not binary:
        rewards = rewards - 0.3 * torch.rand(b, generator=gen)
    lengths = torch.randint(2, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    old = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3 - 0.1
    new = old + drift * torch.randn(b, t, generator=gen, dtype=torch.float64)
    return new, LossBatch.from_rewards(old, mask, rewards.double(), group_ids)


# --------------------------------------------------------------------------------------------- statistics
def test_group_stats_whole_group_bessel():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    group_ids = torch.tensor([7, 7, 7, 7, 3, 3, 3])
    mean, std = group_stats(rewards, group_ids)
    assert torch.allclose(mean, torch.tensor([0.5] * 4 + [2 / 3] * 3))
    expected = [torch.tensor([1.0, 0, 0, 1]).std().item()] * 4 + [torch.tensor([1.0, 1, 0]).std().item()] * 3
    assert torch.allclose(std, torch.tensor(expected))
    assert group_sizes(group_ids).tolist() == [4, 4, 4, 4, 3, 3, 3]


def test_group_stats_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same length"):
        group_stats(torch.zeros(3), torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------------- Prop. 4.1 closed forms
@pytest.mark.parametrize("r_hat", [0.125, 0.25, 0.5, 0.75, 0.875])
@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("omega", ["uniform", "dr_grpo", "grpo"])
def test_nft_gradient_weight_matches_prop_4_1(r_hat, epsilon, omega):
    loss = NFTLoss(epsilon=epsilon, omega=omega)
    for reward in (0, 1):
        measured = gradient_weights(loss, RATIOS, reward=reward, r_hat=r_hat)
        expected = nft_weight_closed_form(RATIOS, reward, r_hat, epsilon, omega).float()
        assert torch.allclose(measured, expected, rtol=1e-5, atol=1e-7), (reward, measured, expected)


@pytest.mark.parametrize("r_hat", [0.125, 0.5, 0.875])
@pytest.mark.parametrize(("clip_low", "clip_high"), [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)])
def test_grpo_gradient_weight_matches_prop_4_1(r_hat, clip_low, clip_high):
    loss = GRPOLoss(clip_low=clip_low, clip_high=clip_high, std_eps=0.0)
    for reward in (0, 1):
        measured = gradient_weights(loss, RATIOS, reward=reward, r_hat=r_hat)
        expected = grpo_weight_closed_form(RATIOS, reward, r_hat, clip_low, clip_high).float()
        assert torch.allclose(measured, expected, rtol=1e-5, atol=1e-7), (reward, measured, expected)


def test_prop_4_1_grpo_omega_uses_normalised_advantages():
    """With ω = sqrt((1−r̂)/r̂) the NFT weights at R = 1 are exactly A⁺ and A⁻ of Prop. 4.1."""
    r_hat = 0.25
    loss = NFTLoss(omega="grpo")
    one = torch.ones(1, dtype=torch.float64)
    assert gradient_weights(loss, one, 1, r_hat).item() == pytest.approx(math.sqrt((1 - r_hat) / r_hat))
    assert gradient_weights(loss, one, 0, r_hat).item() == pytest.approx(-math.sqrt(r_hat / (1 - r_hat)))


# ---------------------------------------------------------------------------------- Prop. 4.2 on-policy
def _policy_grad(loss: PolicyLoss, batch: LossBatch, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. a logits 'model' whose log-probs equal old_logprobs (strictly on-policy, R = 1)."""
    logits = logits.clone().requires_grad_(True)
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    (grad,) = torch.autograd.grad(loss(logprobs, batch).loss, logits)
    return grad


def _on_policy_step(k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_groups, t, vocab = 5, 5, 7
    b = num_groups * k
    logits = torch.randn(b, t, vocab, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (b, t), generator=gen)
    old = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    rewards = torch.zeros(b, dtype=torch.float64)
    for g in range(num_groups):
        rewards[g * k : g * k + 1 + g % (k - 1)] = 1.0
    mask = (torch.arange(t)[None] < torch.randint(1, t + 1, (b,), generator=gen)[:, None]).double()
    batch = LossBatch.from_rewards(old, mask, rewards, torch.arange(num_groups).repeat_interleave(k))
    return logits, tokens, batch


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("epsilon", [0.5, 1.0])
def test_prop_4_2_on_policy_nft_equals_dr_grpo(agg, epsilon):
    logits, tokens, batch = _on_policy_step(k=8)
    nft = NFTLoss(epsilon=epsilon, omega="dr_grpo", agg=agg, agg_constant=7.0)
    dr = DrGRPOLoss(agg=agg, agg_constant=7.0)
    assert torch.allclose(_policy_grad(nft, batch, logits, tokens), _policy_grad(dr, batch, logits, tokens), atol=1e-12)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_prop_4_2_on_policy_nft_equals_grpo_up_to_bessel(agg):
    k = 8
    logits, tokens, batch = _on_policy_step(k=k)
    nft_grad = _policy_grad(NFTLoss(omega="grpo", agg=agg), batch, logits, tokens)
    grpo_grad = _policy_grad(GRPOLoss(std_eps=0.0, agg=agg), batch, logits, tokens)
    # GRPO's Bessel std is sqrt(K/(K−1)) × the population std, so its advantages are that much smaller
    assert torch.allclose(nft_grad, grpo_grad * math.sqrt(k / (k - 1)), atol=1e-12)
    r_hat = batch.group_mean
    population = LossBatch(**{**batch.__dict__, "group_std": torch.sqrt(r_hat * (1 - r_hat))})
    grpo_population_grad = _policy_grad(GRPOLoss(std_eps=0.0, agg=agg), population, logits, tokens)
    assert torch.allclose(nft_grad, grpo_population_grad, atol=1e-12)


# ------------------------------------------------------------------------------------------- NFT values
def test_nft_loss_is_zero_on_policy():
    _, batch = random_step(drift=0.0)
    for omega in ("uniform", "dr_grpo", "grpo"):
        out = NFTLoss(omega=omega)(batch.old_logprobs.clone(), batch)
        assert out.loss.item() == 0.0


def test_nft_negative_token_loss_zero_for_ratio_above_one_with_eps_one():
    ratios = torch.tensor([1.0, 1.01, 1.5, 3.0, 100.0], dtype=torch.float64)
    old = torch.full((5, 1), -2.0, dtype=torch.float64)
    batch = LossBatch(
        old_logprobs=old,
        response_mask=torch.ones(5, 1),
        rewards=torch.zeros(5, dtype=torch.float64),
        group_ids=torch.arange(5),
        group_mean=torch.full((5,), 0.4, dtype=torch.float64),
        group_std=torch.full((5,), 0.5, dtype=torch.float64),
    )
    loss = NFTLoss(epsilon=1.0, agg="sum-constant", agg_constant=1.0)
    assert loss(old + ratios.log()[:, None], batch).loss.item() == 0.0


def test_nft_straight_through_gradient_below_eps_never_zero_never_nan():
    r_hat, eps = 0.875, 0.3
    ratios = torch.tensor([1.0, 1.1, 1.2, 2.0, 10.0, math.exp(9.5), math.exp(12.0)], dtype=torch.float64)
    assert ((1 - r_hat * ratios) < 0).any()  # the log's argument would be negative without the clip
    weights = gradient_weights(NFTLoss(epsilon=eps), ratios, reward=0, r_hat=r_hat)
    assert torch.isfinite(weights).all()
    below = (1 - r_hat * ratios) / (1 - r_hat) < eps
    capped = ratios > math.exp(10.0)  # beyond the released code's log-ratio cap the token has no gradient
    # below ε: ∂ℓ/∂R = −ω·(1/ε)·∂x/∂R with ∂x/∂R = −r̂/(1 − r̂), so w = −ω r̂ /((1 − r̂) ε)
    expected = -(1 - r_hat) * r_hat / (1 - r_hat) / eps
    assert torch.allclose(weights[below & ~capped], torch.tensor(expected, dtype=torch.float32))
    assert (weights[below & ~capped] != 0).all()
    assert (weights[capped] == 0).all()
    # the loss value itself stays finite too
    batch = LossBatch.from_rewards(torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    out = NFTLoss(epsilon=1e-4)(torch.tensor([[30.0], [0.0]]), batch)
    assert torch.isfinite(out.loss)


def test_nft_metrics_report_the_eps_floor_fraction():
    new, batch = random_step(drift=1.5, seed=3)
    out = NFTLoss(epsilon=1.0)(new, batch)
    keys = {"loss/positive", "loss/negative", "ratio/mean", "ratio/min", "ratio/max", "clip/neg_eps_frac"}
    assert keys <= out.metrics.keys()
    assert 0 < out.metrics["clip/neg_eps_frac"].item() < 1
    assert out.metrics["loss/positive"] + out.metrics["loss/negative"] == pytest.approx(out.loss.item())


# ----------------------------------------------------------------------------------------- RFT, InfoNCA
def test_rft_negative_answers_get_exactly_zero_gradient():
    new, batch = random_step(drift=0.5)
    new = new.clone().requires_grad_(True)
    RFTLoss()(new, batch).loss.backward()
    negative = batch.rewards == 0
    assert (new.grad[negative] == 0).all()
    assert (new.grad[~negative][batch.response_mask[~negative].bool()] != 0).all()


def test_infonca_with_two_answers_equals_dpo():
    beta = 0.1
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(6, 5, generator=gen, dtype=torch.float64) - 0.5
    new = (old + 0.4 * torch.randn(6, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mask = torch.ones(6, 5, dtype=torch.float64)
    mask[1, 3:] = 0
    mask[4, 2:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # chosen/rejected per pair
    batch = LossBatch.from_rewards(old, mask, rewards, torch.tensor([0, 0, 1, 1, 2, 2]))
    nca = InfoNCALoss(beta=beta, sft_weight=0.0)(new, batch).loss
    seq = ((new - old) * mask).sum(-1).view(3, 2)
    chosen = torch.where(rewards.view(3, 2)[:, 0] == 1, seq[:, 0], seq[:, 1])
    rejected = torch.where(rewards.view(3, 2)[:, 0] == 1, seq[:, 1], seq[:, 0])
    dpo = -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()
    assert nca.item() == pytest.approx(dpo.item(), rel=1e-12)
    (g1,) = torch.autograd.grad(nca, new)
    (g2,) = torch.autograd.grad(dpo, new)
    assert torch.allclose(g1, g2)


def test_infonca_refuses_incomplete_groups():
    new, batch = random_step(k=4)
    half = torch.arange(6)  # cuts the second group in two
    part = _sub_batch(batch, half)
    with pytest.raises(ValueError, match="whole groups"):
        InfoNCALoss()(new[half], part)


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("loss_cls", [NFTLoss, RFTLoss])
def test_nft_family_refuses_non_binary_rewards(loss_cls):
    new, batch = random_step(binary=False)
    with pytest.raises(ValueError, match="binary rewards"):
        loss_cls()(new, batch)


@pytest.mark.parametrize("loss_cls", [NFTLoss, RFTLoss])
def test_nft_family_refuses_r_hat_outside_open_interval(loss_cls):
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    batch = LossBatch.from_rewards(torch.zeros(4, 2), torch.ones(4, 2), rewards, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"r̂_q strictly inside \(0, 1\)"):
        loss_cls()(torch.zeros(4, 2), batch)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: NFTLoss(epsilon=0.0), "epsilon must be > 0"),
        (lambda: NFTLoss(epsilon=-1.0), "epsilon must be > 0"),
        (lambda: NFTLoss(omega="sqrt"), "omega must be one of"),
        (lambda: NFTLoss(neg_weight=-0.5), "neg_weight must be a finite number >= 0"),
        (lambda: NFTLoss(neg_weight=math.nan), "neg_weight must be a finite number >= 0"),
        (lambda: NFTLoss(neg_weight=math.inf), "neg_weight must be a finite number >= 0"),
        (lambda: NFTLoss(agg="mean"), "agg must be one of"),
        (lambda: GRPOLoss(clip_low=1.5), "clip_low"),
        (lambda: GRPOLoss(dual_clip=0.5), "dual_clip"),
        (lambda: InfoNCALoss(beta=0.0), "beta"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_option(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_kl_penalty_needs_reference_logprobs():
    new, batch = random_step()
    with pytest.raises(ValueError, match="ref_logprobs"):
        GRPOLoss(kl_coef=0.1)(new, batch)
    batch.ref_logprobs = batch.old_logprobs
    on_ref = GRPOLoss(kl_coef=0.1)(batch.old_logprobs, batch).loss
    assert on_ref.item() == pytest.approx(GRPOLoss()(batch.old_logprobs, batch).loss.item())  # KL(π‖π) = 0


# --------------------------------------------------------------------------------- exact aggregation
def _losses_for_aggregation() -> list[PolicyLoss]:
    out: list[PolicyLoss] = []
    for agg in AGGREGATIONS:
        out += [
            NFTLoss(epsilon=0.5, agg=agg, agg_constant=9.0),
            RFTLoss(agg=agg, agg_constant=9.0),
            GRPOLoss(agg=agg, agg_constant=9.0, dual_clip=3.0),
            DrGRPOLoss(agg=agg, agg_constant=9.0),
            DAPOLoss(agg=agg, agg_constant=9.0),
            InfoNCALoss(agg=agg, agg_constant=9.0, sft_weight=0.5),
        ]
    return out


def _sub_batch(batch: LossBatch, rows: torch.Tensor) -> LossBatch:
    """Rows of a step, carrying the WHOLE step's normalisers (what the training loop passes)."""
    return LossBatch(
        old_logprobs=batch.old_logprobs[rows],
        response_mask=batch.response_mask[rows],
        rewards=batch.rewards[rows],
        group_ids=batch.group_ids[rows],
        group_mean=batch.group_mean[rows],
        group_std=batch.group_std[rows],
        group_size=batch.group_size[rows],
        num_tokens=batch.token_count(),
        num_sequences=batch.sequence_count(),
        num_groups=batch.group_count(),
    )


@pytest.mark.parametrize("loss", _losses_for_aggregation(), ids=lambda lo: f"{type(lo).__name__}-{lo.agg}")
def test_aggregation_exact_over_micro_batches_and_ranks(loss):
    k = 4
    new, batch = random_step(num_groups=6, k=k, drift=0.6, seed=7)
    full = new.clone().requires_grad_(True)
    loss(full, batch).loss.backward()

    # 3 micro-batches of whole groups (InfoNCA needs them; the others would accept any split)
    accumulated = new.clone().requires_grad_(True)
    for chunk in torch.arange(batch.rewards.numel()).chunk(3):
        loss(accumulated[chunk], _sub_batch(batch, chunk)).loss.backward()
    assert torch.allclose(full.grad, accumulated.grad, atol=1e-12)

    # 2 simulated data-parallel ranks: each scales its loss by world size, DDP averages the gradients
    world = 2
    rank_grads = []
    for rank_rows in torch.arange(batch.rewards.numel()).chunk(world):
        x = new.clone().requires_grad_(True)
        (loss(x[rank_rows], _sub_batch(batch, rank_rows)).loss * world).backward()
        rank_grads.append(x.grad)
    assert torch.allclose(full.grad, sum(rank_grads) / world, atol=1e-12)


def test_token_mean_without_global_normaliser_is_not_exact():
    """Guards the test above: per-micro-batch normalisation (the classic bug) gives a different gradient."""
    loss = NFTLoss()
    new, batch = random_step(num_groups=6, drift=0.6, seed=7)
    full = new.clone().requires_grad_(True)
    loss(full, batch).loss.backward()
    naive = new.clone().requires_grad_(True)
    chunks = list(torch.arange(batch.rewards.numel()).chunk(3))
    for chunk in chunks:
        sub = _sub_batch(batch, chunk)
        sub.num_tokens = None  # each micro-batch normalised by its own token count
        (loss(naive[chunk], sub).loss / len(chunks)).backward()
    assert not torch.allclose(full.grad, naive.grad, atol=1e-6)


# -------------------------------------------------------------------------------------- configs + step
@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_config_composes_and_instantiates(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name=f"algorithm/{name}")
    algo = cfg.algorithm
    assert algo.name == name
    loss = instantiate(algo.loss)
    assert isinstance(loss, PolicyLoss)
    assert isinstance(algo.dynamic_sampling, bool)
    assert algo.whole_groups == loss.requires_whole_groups
    assert algo.num_answers >= 2
    if loss.requires_binary_rewards:
        assert algo.overlong_buffer is None, "NFT/RFT need binary rewards: no overlong shaping"


def test_all_six_algorithms_have_configs():
    assert set(ALGORITHMS) == {"nft", "rft", "grpo", "dr_grpo", "dapo", "infonca"}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_training_step_changes_parameters(name):
    """TRL-style check: one optimizer step through each loss on a tiny random LM moves its weights."""
    from nft_lit.models import tiny_causal_lm

    torch.manual_seed(0)
    model = tiny_causal_lm(vocab_size=12, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64)
    k, num_groups, prompt_len, resp_len = 4, 3, 3, 5
    b = k * num_groups
    ids = torch.randint(2, 12, (b, prompt_len + resp_len))
    loss_fn = make_loss(name)

    def response_logprobs() -> torch.Tensor:
        logits = model(ids).logits[:, prompt_len - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, prompt_len:, None])[..., 0]

    with torch.no_grad():
        old = response_logprobs()
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    batch = LossBatch.from_rewards(old, torch.ones(b, resp_len), rewards, torch.arange(num_groups).repeat_interleave(k))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # the second step is off-policy, exercising ratios ≠ 1
        optimizer.zero_grad()
        out = loss_fn(response_logprobs(), batch)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(before), f"{name}: unchanged parameters {set(before) - set(changed)}"


def test_positive_ratio_floor_bounds_the_positive_weight():
    """Released-code option: positive ratios are floored straight-through, so the weight ω/R stops at ω/floor."""
    ratios = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0], dtype=torch.float64)
    floored = gradient_weights(NFTLoss(omega="uniform", positive_ratio_floor=0.5), ratios, reward=1, r_hat=0.5)
    assert torch.allclose(floored, (1.0 / ratios.clamp(min=0.5)).float())
    plain = gradient_weights(NFTLoss(omega="uniform"), ratios, reward=1, r_hat=0.5)
    assert torch.allclose(plain, (1.0 / ratios).float())


# ------------------------------------------------------------------------- neg_weight (released code)
def _loss_and_grad(loss: PolicyLoss, new: torch.Tensor, batch: LossBatch) -> tuple[torch.Tensor, torch.Tensor]:
    x = new.clone().requires_grad_(True)
    out = loss(x, batch).loss
    (grad,) = torch.autograd.grad(out, x)
    return out.detach(), grad


@pytest.mark.parametrize("omega", ["uniform", "dr_grpo", "grpo"])
def test_neg_weight_one_is_the_paper_loss_exactly(omega):
    """λ = 1 is Eq. 10: the same value and gradient as the default, bit for bit."""
    new, batch = random_step(drift=1.5, seed=3)
    assert NFTLoss()(new, batch).metrics["clip/neg_eps_frac"] > 0  # the straight-through floor is exercised
    default_loss, default_grad = _loss_and_grad(NFTLoss(omega=omega), new, batch)
    loss, grad = _loss_and_grad(NFTLoss(omega=omega, neg_weight=1.0), new, batch)
    assert torch.equal(loss, default_loss) and torch.equal(grad, default_grad)
    assert make_loss("nft").neg_weight == 1.0  # the config's default is the paper's


def test_neg_weight_zero_drops_the_negative_term_only():
    """λ = 0: negative answers get exactly zero gradient, positive answers exactly NFT's gradient (same ω and
    normaliser: negatives still count in N_tok)."""
    new, batch = random_step(drift=0.6, seed=5)
    _, nft_grad = _loss_and_grad(NFTLoss(), new, batch)
    _, grad = _loss_and_grad(NFTLoss(neg_weight=0.0), new, batch)
    out = NFTLoss(neg_weight=0.0)(new, batch)
    negative = batch.rewards == 0
    assert negative.any() and (~negative).any()
    assert (grad[negative] == 0).all()
    assert torch.equal(grad[~negative], nft_grad[~negative])
    assert (nft_grad[negative][batch.response_mask[negative].bool()] != 0).any()  # NFT's negatives do move
    assert out.metrics["loss/negative"].item() == pytest.approx(0.0, abs=1e-15)  # loss − positive part
    # with ω = 1 as well, it is RFT (which the released code runs as NFT with neg_weight 0)
    _, rft_grad = _loss_and_grad(RFTLoss(), new, batch)
    assert torch.equal(_loss_and_grad(NFTLoss(omega="uniform", neg_weight=0.0), new, batch)[1], rft_grad)


@pytest.mark.parametrize("neg_weight", [0.25, 0.5, 2.0])
def test_neg_weight_scales_the_negative_term_linearly(neg_weight):
    """Value and gradient at λ are the interpolation (1 − λ)·[λ = 0] + λ·[λ = 1] of the two endpoints: the
    negative answers' gradient is λ times NFT's, the positive answers' is unchanged."""
    new, batch = random_step(drift=1.5, seed=3)  # some negative tokens at the ε floor
    loss0, grad0 = _loss_and_grad(NFTLoss(neg_weight=0.0), new, batch)
    loss1, grad1 = _loss_and_grad(NFTLoss(neg_weight=1.0), new, batch)
    loss, grad = _loss_and_grad(NFTLoss(neg_weight=neg_weight), new, batch)
    assert torch.allclose(grad, (1 - neg_weight) * grad0 + neg_weight * grad1, rtol=1e-12, atol=1e-15)
    assert loss.item() == pytest.approx(((1 - neg_weight) * loss0 + neg_weight * loss1).item(), rel=1e-12, abs=1e-15)
    negative = batch.rewards == 0
    assert torch.allclose(grad[negative], neg_weight * grad1[negative], rtol=1e-12, atol=1e-15)
    assert torch.equal(grad[~negative], grad1[~negative])
