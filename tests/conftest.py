"""Fixtures shared by several test modules."""

from collections.abc import Callable

import pytest
from fingerprint import tiny_warmup_config

from nft_lit.demo.warmup import WarmupConfig


@pytest.fixture
def tiny_warmup() -> Callable[..., WarmupConfig]:
    """WarmupConfig factory: 1-digit addition with a 2-layer model reaches a 20% sampled pass rate in a few
    dozen steps, so warm-up tests and the cut-down demo run in seconds. Keyword arguments override fields."""

    def make(**overrides: object) -> WarmupConfig:
        return tiny_warmup_config(**{"name": "tiny", **overrides})

    return make
