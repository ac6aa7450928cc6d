"""Behaviour did not change with the rollout stages redesign (issue 12): `nft-lit fit` gives bit-equal numbers.

The fingerprints in fingerprints.json were recorded at the commit before the redesign (tests/fingerprint.py
explains how and how to re-record). Each run compares per-step loss and gradient norm, every held-out avg@1 point
and a hash of the final weights, exactly: one process (NFT, GRPO), two FSDP2 processes (InfoNCA, whole groups),
and the demo path (warmed-up base, greedy held-out evaluation).
"""

import json
import platform

import pytest
from fingerprint import RECORDED, RUNS, fingerprint

# The recorded numbers come from x86-64 with MKL and ATen pinned to their AVX2 code paths (fingerprint.pinned_env),
# which every x86-64 machine has, AVX-512 ones included. ARM has neither MKL nor AVX2 kernels: its runs are
# repeatable on the same machine but round differently, so there is nothing to compare them with.
_X86 = platform.machine().lower() in {"x86_64", "amd64"}


@pytest.mark.slow
@pytest.mark.skipif(not _X86, reason="fingerprints are recorded on x86-64 (MKL/ATen AVX2 paths); this CPU is not")
@pytest.mark.parametrize("name", sorted(RUNS))
def test_fit_matches_the_recorded_fingerprint(tmp_path, name):
    expected = json.loads(RECORDED.read_text())[name]
    got = fingerprint(name, tmp_path)
    assert got["train/loss"] == expected["train/loss"]
    assert got["train/grad_norm"] == expected["train/grad_norm"]
    assert got["val/heldout/avg@1"] == expected["val/heldout/avg@1"]
    assert got["weights_sha256"] == expected["weights_sha256"]
