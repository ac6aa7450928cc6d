"""Kill-and-resume: killed in iteration 3 of 4, resumed from last.ckpt == 4 uninterrupted iterations (HF engine)."""

import pytest
import torch
from _rollout_fakes import PARITY_OVERRIDES
from hydra import compose, initialize_config_dir

from nft_lit.cli import run_fit
from nft_lit.compose import CONFIG_DIR

# Parity rewards give mixed groups from a random-init model, so every iteration really updates the weights.
OVERRIDES = [
    "experiment=smoke",
    "algorithm=nft",
    "eval.every_n_iterations=3",
    *PARITY_OVERRIDES,
    "logger=[csv]",
]


def _run(run_dir, *extra):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*OVERRIDES, f"run_dir={run_dir}", *extra])
    return run_fit(cfg)


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    _run(full, "iterations=4")

    # "Kill" the run as iteration 3 starts generating: no checkpoint is written on the way out, so the
    # resume starts from the last.ckpt written at the end of iteration 2, as after a SIGKILL.
    from nft_lit.driver import RolloutIteration

    original = RolloutIteration.run

    def dying_run(self, model, logprob_fn, device, iteration):
        if iteration == 2:
            raise _Killed
        return original(self, model, logprob_fn, device, iteration)

    monkeypatch.setattr(RolloutIteration, "run", dying_run)
    with pytest.raises(_Killed):
        _run(part, "iterations=4")
    monkeypatch.setattr(RolloutIteration, "run", original)
    mid = _state(part)
    dm_key = next(k for k in mid if "RolloutDataModule" in k)
    assert mid[dm_key]["iteration"] == 1 and mid["global_step"] == 4

    _run(part, "iterations=4", "ckpt_path=last")
    a, b = _state(full), _state(part)
    assert a["global_step"] == b["global_step"] == 8
    moved = False
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
        moved |= not torch.equal(value, mid["state_dict"][name])
    assert moved
    # the data-sampling position (prompts consumed) is identical too: no prompt re-used or skipped
    assert a[dm_key] == b[dm_key] and a[dm_key]["cursor"] > mid[dm_key]["cursor"]
    # the optimizer moments and LR schedule were restored, not restarted
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 8
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
