"""Fixtures shared by several test modules."""

from collections.abc import Callable

import pytest

from nft_lit.demo.warmup import ModelShape, WarmupConfig


@pytest.fixture
def tiny_warmup() -> Callable[..., WarmupConfig]:
    """WarmupConfig factory: 1-digit addition with a 2-layer model reaches a 20% sampled pass rate in a few
    dozen steps, so warm-up tests and the cut-down demo run in seconds. Keyword arguments override fields."""

    def make(**overrides: object) -> WarmupConfig:
        fields: dict[str, object] = dict(
            name="tiny",
            sft_task={"digits": 1, "operation": "+"},
            rl_task={"digits": 1, "operation": "+"},
            model=ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
            lr=3e-3,
            batch_size=32,
            train_size=80,
            max_steps=400,
            eval_every=20,
            eval_size=32,
            target_pass_rate=0.2,
            max_pass_rate=1.0,
            max_new_tokens=3,
        )
        return WarmupConfig(**{**fields, **overrides})  # type: ignore[arg-type]

    return make
