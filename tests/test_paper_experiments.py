"""The paper experiments hold NFT paper App. B's protocol for every algorithm.

configs/experiment/paper_7b.yaml and paper_32b.yaml are composed with each configs/algorithm entry and the
App. B numbers are read off the objects `nft-lit fit` builds from them (the loss, the PolicyModule and its
optimizer schedule, the datamodule's rollout settings and step layout), without loading a model: the model
spec only names the checkpoint, and the datamodule gets a stand-in problem list and no sampler (both are only
used when sampling).
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nft_lit.compose import CONFIG_DIR, check_config
from nft_lit.iteration import check_loss_fits
from nft_lit.losses import DrGRPOLoss, GRPOLoss, NFTLoss, RFTLoss

ALGORITHMS = sorted(p.stem for p in (CONFIG_DIR / "algorithm").glob("*.yaml"))
PAPER_EXPERIMENTS = ("paper_7b", "paper_32b")

# App. B (shared/paper/nft_paper.txt) and the authors' released train_{7B,32B}.sh scripts.
PROMPTS_PER_STEP, NUM_ANSWERS, NUM_MINI_BATCHES, LR = 512, 16, 16, 1e-6  # l. 1426-1428
ITERATIONS = {"grpo": 580, "dr_grpo": 580}  # l. 1450-1452 (Dr. GRPO: l. 1454-1455); 320 otherwise (l. 1429)
PROMPT_TOKENS = {"paper_7b": 512, "paper_32b": 2048}  # train_7B.sh / train_32B.sh max_prompt_length
# l. 1431: 4K for 7B; l. 1432: 32K for DAPO at 32B, 16K for the others
CONTEXT = {"paper_7b": {}, "paper_32b": {"dapo": 32768}}
DEFAULT_CONTEXT = {"paper_7b": 4096, "paper_32b": 16384}
OVERLONG_BUFFER = {"paper_7b": 512, "paper_32b": 4096}  # DAPO only (NFT removes it, l. 1439-1441)
NO_DYNAMIC_SAMPLING = {"grpo", "dr_grpo"}  # l. 1447 (GRPO) and l. 1454-1455 (Dr. GRPO: GRPO but the std)


def _compose(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        # ${hydra:runtime.output_dir} needs a running Hydra job; tests give the run dir explicitly.
        return compose("train", overrides=["run_dir=/tmp/nft-lit-test-paper", *overrides])


def _build(cfg):
    """(PolicyModule, RolloutDataModule) as `nft-lit fit` builds them, minus the model, data and sampler."""
    module = instantiate(cfg.module, _convert_="object")
    cfg.datamodule.problems, cfg.datamodule.sampler = ["unused"], None  # in place of the data and the tokenizer
    datamodule = instantiate(cfg.datamodule, _convert_="object")
    return module, datamodule


def _learning_rates(module, steps: int) -> list[float]:
    """The LR of the first ``steps`` optimizer steps under the module's own optimizer and schedule."""
    module.model = torch.nn.Linear(2, 2)  # configure_optimizers only needs parameters
    optim = module.configure_optimizers()
    optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_paper_experiment_follows_app_b_for_every_algorithm(experiment, algorithm):
    cfg = _compose(f"experiment={experiment}", f"algorithm={algorithm}")
    check_config(cfg)
    module, datamodule = _build(cfg)
    loss, settings, layout = module.loss_fn, datamodule.settings, datamodule.layout
    check_loss_fits(loss, settings, layout.whole_groups)  # the start-up check of `nft-lit fit` passes
    assert type(loss).__name__ == cfg.algorithm.loss._target_.rsplit(".", 1)[1]

    # 512 prompts x 16 answers per iteration, 16 mini-batches (= optimizer steps), one pass
    assert settings.prompts_per_step == PROMPTS_PER_STEP and settings.num_answers == NUM_ANSWERS
    assert layout.num_mini_batches == NUM_MINI_BATCHES
    assert cfg.iterations == ITERATIONS.get(algorithm, 320) == cfg.trainer.max_epochs

    # lr 1e-6 with a linear warm-up, then constant
    assert module.lr == LR and module.warmup_steps > 0
    warm = module.warmup_steps
    lrs = _learning_rates(module, warm + 3)
    assert lrs == pytest.approx([LR * min(1.0, (k + 1) / warm) for k in range(warm + 3)], rel=1e-12)
    assert lrs[0] < lrs[warm - 1] == lrs[-1] == pytest.approx(LR)

    # context = prompt + response budget, and the vLLM engine's window is that context
    context = CONTEXT[experiment].get(algorithm, DEFAULT_CONTEXT[experiment])
    assert settings.max_prompt_tokens == PROMPT_TOKENS[experiment]
    assert settings.max_prompt_tokens + datamodule.sampling.max_new_tokens == context == cfg.rollout.max_model_len
    assert cfg.eval.max_new_tokens == datamodule.sampling.max_new_tokens  # validation: the training context
    assert datamodule.sampling.temperature == 1.0 and datamodule.sampling.top_p == 1.0

    # DAPO's design choices (l. 1429-1431): token-level normalisation for every algorithm (Dr. GRPO included),
    # dynamic sampling but for GRPO / Dr. GRPO, overlong shaping for DAPO only, no KL
    assert loss.agg == "token-mean"
    assert settings.dynamic_sampling == (algorithm not in NO_DYNAMIC_SAMPLING)
    assert settings.shaping.buffer == (OVERLONG_BUFFER[experiment] if algorithm == "dapo" else None)
    assert loss.kl_coef == 0.0

    if isinstance(loss, RFTLoss):  # l. 1445-1446: negatives zeroed, ω(q) = 1
        assert loss.neg_weight == 0.0 and loss.omega == "uniform"
    elif isinstance(loss, NFTLoss):  # l. 1442-1443: ε = 1, ω(q) = 1 − r̂; the paper's λ = 1 (Eq. 10)
        assert loss.epsilon == 1.0 and loss.omega == "dr_grpo" and loss.neg_weight == 1.0
    if isinstance(loss, GRPOLoss):  # GRPO, Dr. GRPO, DAPO clip: DAPO's 0.2 and clip-higher 0.28 (l. 1449-1450)
        assert (loss.clip_low, loss.clip_high) == (0.2, 0.28) and loss.dual_clip is None
        assert loss.scale_by_std == (not isinstance(loss, DrGRPOLoss))  # l. 1454-1455: Dr. GRPO drops the std
    else:
        assert not hasattr(loss, "clip_low")  # NFT, RFT and InfoNCA do not clip the ratio

    assert cfg.eval.temperature == (0.6 if experiment == "paper_32b" else None)  # None: 1.0 per benchmark


def test_dr_grpo_keeps_its_constant_normaliser_outside_the_paper_experiments():
    """configs/algorithm/dr_grpo.yaml is the Dr. GRPO paper's loss; only the paper experiments switch it to
    token-mean (the NFT paper ran Dr. GRPO on DAPO's code), and an explicit override still wins there."""
    plain = instantiate(_compose("algorithm=dr_grpo").algorithm.loss)
    assert isinstance(plain, DrGRPOLoss)
    assert plain.agg == "seq-mean-token-sum-norm" and plain.agg_constant == 3584  # the max response length
    smoke = _compose("experiment=smoke", "algorithm=dr_grpo")
    assert instantiate(smoke.algorithm.loss).agg == "seq-mean-token-sum-norm"
    for experiment in PAPER_EXPERIMENTS:
        assert instantiate(_compose(f"experiment={experiment}", "algorithm=dr_grpo").algorithm.loss).agg == "token-mean"
    cfg = _compose("experiment=paper_32b", "algorithm=dr_grpo", "algorithm.loss.agg=seq-mean-token-sum-norm")
    restored = instantiate(cfg.algorithm.loss)
    assert restored.agg == "seq-mean-token-sum-norm" and restored.agg_constant == 14336


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_per_algorithm_table_names_only_shipped_algorithms(experiment):
    """A misspelt key in `paper_by_algorithm` would silently fall back to the default: catch it here."""
    cfg = _compose(f"experiment={experiment}")
    assert set(cfg.paper_by_algorithm) <= set(ALGORITHMS)


def test_command_line_overrides_beat_the_per_algorithm_table():
    cfg = _compose("experiment=paper_32b", "algorithm=dapo", "iterations=7", "sampling.max_new_tokens=1024")
    assert cfg.iterations == 7 and cfg.sampling.max_new_tokens == 1024
    assert cfg.algorithm.overlong_buffer == 4096 and cfg.rollout.max_model_len == 32768
