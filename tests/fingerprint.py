"""Behaviour fingerprints of `nft-lit fit`: what a run logs and the weights it ends with.

A fingerprint is read only through the command line and the files a run writes (``csv/metrics.csv``,
``checkpoints/last.ckpt``), never through the package's internals, so it survives any refactor of the code
behind them. ``tests/fingerprints.json`` holds the fingerprints recorded before the rollout iteration was
redesigned into stages (issue 12); ``test_fingerprint.py`` re-runs the same commands and compares.

Re-record (only when behaviour is meant to change, and say why in the commit):
    .venv/bin/python tests/fingerprint.py --write
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
RECORDED = TESTS / "fingerprints.json"

# Parity rewards give mixed groups from a random-init model, so every iteration really updates the weights.
_PARITY = [
    "~data.problems",
    "+data.problems={_target_: _rollout_fakes.addition_problems, size: 60}",
    "~eval.heldout",
    "+eval.heldout={_target_: _rollout_fakes.addition_problems, size: 4, seed: 1}",
    "reward.verifier._target_=_rollout_fakes.ParityVerifier",
]
_SMOKE = ["experiment=smoke", "iterations=4", "eval.every_n_iterations=2", *_PARITY]

# name -> `nft-lit fit` overrides. "demo_tiny" needs a warm-up folder (made by `runs_need_warmup`).
RUNS: dict[str, list[str]] = {
    "smoke_nft": _SMOKE,
    "smoke_grpo": [*_SMOKE, "algorithm=grpo"],
    "smoke_infonca_fsdp2": [*_SMOKE, "algorithm=infonca", "trainer=cpu_fsdp2"],
    "demo_tiny": [
        "experiment=demo",
        "iterations=3",
        "data.problems.digits=1",
        "data.problems.size=60",
        "eval.heldout.digits=1",
        "eval.heldout.size=16",
        "eval.every_n_iterations=1",
        "sampling.max_new_tokens=3",
        "datamodule.prompts_per_step=8",
        "datamodule.gen_prompts_per_round=8",
        "datamodule.max_prompt_tokens=8",
    ],
}


def weights_sha256(ckpt: Path) -> str:
    """Hash of every tensor of the checkpoint's model state, in key order (bit-exact identity of weights)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_metrics(metrics_csv: Path) -> dict[str, list[float]]:
    """Per-step train/loss and train/grad_norm, and every held-out avg@1 point, in logged order."""
    out: dict[str, list[float]] = {"train/loss": [], "train/grad_norm": [], "val/heldout/avg@1": []}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, values in out.items():
                if row.get(key):
                    values.append(float(row[key]))
    return out


def tiny_warmup_config(**overrides: object):
    """The tiny demo base policy (1-digit addition, 2 layers, 20% sampled pass rate in a few dozen steps): the
    demo fingerprint's base and tests/conftest.py's ``tiny_warmup``. Keyword arguments override fields."""
    from nft_lit.demo.warmup import ModelShape, WarmupConfig

    fields: dict[str, object] = dict(
        name="demo",
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


def pinned_env(cache: Path) -> dict[str, str]:
    """The environment of every process a fingerprint runs: the warm-up and `nft-lit fit` alike.

    The pins must be in place before torch is imported, so they cannot be applied to the pytest process that
    calls :func:`fingerprint`; everything that computes runs in a child process with them instead.
    """
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        # MKL's default code path may round differently with the memory alignment of its inputs (any change of
        # the code's allocations moves that) and with the CPU; its conditional-reproducibility mode on the AVX2
        # path, strict (alignment-independent), does not, at the AVX2 speed (COMPATIBLE is ~4x slower).
        "MKL_CBWR": "AVX2,STRICT",
        # torch's own vectorised kernels (softmax, norms, activations) dispatch on the CPU's widest SIMD: an
        # AVX-512 machine rounds differently from an AVX2 one, and the demo's SFT steps of warm-up amplify
        # that. Every x86-64 machine this project runs on has AVX2.
        "ATEN_CPU_CAPABILITY": "avx2",
        "NFT_LIT_CACHE": str(cache),
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }


def _run(cmd: list[str], env: dict[str, str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"fingerprint {what} failed:\n{proc.stderr[-4000:]}")


def fingerprint(name: str, workdir: Path) -> dict:
    """Run ``RUNS[name]`` with `nft-lit fit` in ``workdir`` and return its fingerprint."""
    run_dir = workdir / name
    cache = workdir / "cache"
    env = pinned_env(cache)
    if name.startswith("demo"):
        _run([sys.executable, __file__, "--warmup", str(cache / "warmup")], env, workdir, "warm-up")
    cmd = [sys.executable, "-m", "nft_lit.cli", "fit", *RUNS[name], f"hydra.run.dir={run_dir}"]
    _run(cmd, env, workdir, f"run {name}")
    return {
        **read_metrics(run_dir / "csv" / "metrics.csv"),
        "weights_sha256": weights_sha256(run_dir / "checkpoints" / "last.ckpt"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record into {RECORDED.name}")
    parser.add_argument("--warmup", metavar="DIR", help="only build the tiny warm-up base into DIR")
    parser.add_argument("names", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    if args.warmup:
        from nft_lit.demo.warmup import warmup

        warmup(tiny_warmup_config(), Path(args.warmup))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        prints = {name: fingerprint(name, Path(tmp)) for name in args.names}
    print(json.dumps(prints, indent=1))
    if args.write:
        recorded = json.loads(RECORDED.read_text()) if RECORDED.exists() else {}
        RECORDED.write_text(json.dumps({**recorded, **prints}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
