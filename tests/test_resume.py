"""Kill-and-resume: 2 iterations, then resume to 4 from last.ckpt == 4 uninterrupted iterations (HF engine)."""

import torch
from hydra import compose, initialize_config_dir

from nft_lit.cli import CONFIG_DIR, run_fit

# Parity rewards give mixed groups from a random-init model, so every iteration really updates the weights.
OVERRIDES = [
    "experiment=smoke",
    "algorithm=nft",
    "eval.every_n_iterations=3",
    "reward.verifier._target_=_rollout_fakes.ParityVerifier",
    "~data.problems",
    "+data.problems={_target_: _rollout_fakes.addition_problems, size: 60}",
    "~eval.heldout",
    "+eval.heldout={_target_: _rollout_fakes.addition_problems, size: 4, seed: 1}",
    "logging.tensorboard=false",
]


def _run(run_dir, *extra):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*OVERRIDES, f"run_dir={run_dir}", *extra])
    return run_fit(cfg)


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _run(full, "iterations=4")
    _run(part, "iterations=2")
    mid = _state(part)
    assert mid["epoch"] == 1
    _run(part, "iterations=4", "ckpt_path=last")
    a, b = _state(full), _state(part)
    assert a["global_step"] == b["global_step"] > 0
    moved = False
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
        moved |= not torch.equal(value, mid["state_dict"][name])
    assert moved
    # the data-sampling position (prompts consumed) is identical too: no prompt re-used or skipped
    dm_key = next(k for k in a if "RolloutDataModule" in k)
    assert a[dm_key] == b[dm_key] and a[dm_key]["cursor"] > mid[dm_key]["cursor"]
    # the optimizer moments and LR schedule were restored, not restarted
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
