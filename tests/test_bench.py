"""Every bench/*.py runs in its quick mode and writes sane results (harness correctness, never timing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
HELPERS = {"common.py"}  # imported by the scripts, not a benchmark
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def run(script: str, *args: str, timeout: float = 300, expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if expect_ok:
        assert proc.returncode == 0, f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_loss_throughput(data: dict) -> None:
    names = [r["algorithm"] for r in data["rows"]]
    assert set(names) == {"nft", "rft", "grpo", "dr_grpo", "dapo", "infonca"}
    assert all(positive(r["tokens_per_s"]) for r in data["rows"])
    assert next(r for r in data["rows"] if r["algorithm"] == "grpo")["cost_vs_grpo"] == pytest.approx(1.0)


def check_e2e(data: dict) -> None:
    setup = data["meta"]["setup"]
    rows = {r["side"]: r for r in data["rows"]}
    assert set(rows) == {"trl", "nft_lit_grpo", "nft_lit_nft"}
    for side, row in rows.items():
        # equal work: every side made the same number of optimizer updates per iteration
        assert row["optimizer_steps"] == setup["updates"] * setup["iterations"], side
        assert len(row["iteration_seconds"]) == setup["iterations"] - 1, side
        assert all(positive(t) for t in row["iteration_seconds"]), side
        assert 0 < row["response_tokens_mean"] <= setup["max_new_tokens"], side
        assert positive(row["peak_rss_mib"]), side
        assert row["ratio_vs_trl"] == pytest.approx(row["s_per_iteration"] / rows["trl"]["s_per_iteration"])
    assert rows["trl"]["answers_generated"] == setup["prompts"] * setup["answers"] * setup["iterations"]
    assert 0 < rows["nft_lit_nft"]["kept_groups_mean"] <= setup["prompts"]
    assert rows["nft_lit_grpo"]["kept_groups_mean"] == setup["prompts"]  # GRPO keeps every group
    assert set(data["goal_met"]) == {"nft_lit_grpo", "nft_lit_nft"}


def check_train_step(data: dict) -> None:
    rows = {r["side"]: r for r in data["rows"]}
    assert set(rows) == {"bare torch", "lightning"}
    assert all(positive(r["tokens_per_s"]) for r in rows.values())
    assert data["overhead_ratio"] == pytest.approx(
        rows["bare torch"]["tokens_per_s"] / rows["lightning"]["tokens_per_s"]
    )
    # The Lightning step and the bare loop did the same work: identical weights after the same steps.
    assert data["max_weight_diff"] < 1e-6


def check_memory(data: dict) -> None:
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"sft", "nft", "grpo_kl"}
    assert rows["grpo_kl"]["reference_model"] == 1.0 and rows["nft"]["reference_model"] == 0.0
    assert rows["nft"]["optimizer_steps"] == rows["grpo_kl"]["optimizer_steps"] == data["meta"]["shape"]["mini_batches"]
    for row in rows.values():
        # an iteration allocates at least the gradients and AdamW's two moments (3x the fp32 weights)
        assert row["iteration_mib"] >= 2.5 * row["weights_mib"], row
    assert rows["sft"]["ratio_vs_sft"] == 1.0


def check_verify(data: dict) -> None:
    assert data["meta"]["pairs"] == 200 and positive(data["verifications_per_s"])
    # the bench's pairs are built to be scored right: other-form answers 1, wrong answers 0
    assert data["other_form_scored_1"] >= 0.9 and data["wrong_scored_0"] >= 0.95
    assert data["stats"]["timeouts"] == 0


def check_gpu_smoke(data: dict) -> None:
    rows = [(r["attention"], r["micro_batch"], r["checkpointing"]) for r in data["train_step"]]
    assert rows == [("sdpa", 2, False), ("sdpa", 2, True)]
    assert all(positive(r["tokens_per_s"]) and r["mfu"] is None for r in data["train_step"])  # no peak FLOP/s on CPU
    assert len(data["losses"]) == 6 and all(positive(r["mtok_per_s"]) for r in data["losses"])
    g = data["generation"]
    assert g["new_tokens"] == g["batch"] * data["meta"]["shape"]["gen_new"] and positive(g["tokens_per_s"])


def check_rollout(data: dict) -> None:
    assert data["rows"] and all(positive(r["tokens_per_s"]) for r in data["rows"])


# script -> (arguments after the script, JSON checker, pytest marks)
SPECS: dict[str, tuple[list[str], Callable[[dict], None], list[Any]]] = {
    "loss_throughput.py": (["--quick"], check_loss_throughput, []),
    "e2e_vs_trl.py": (["--quick"], check_e2e, [pytest.mark.slow]),
    "train_step.py": (["--quick"], check_train_step, []),
    "memory.py": (["--quick"], check_memory, [pytest.mark.slow]),
    "gpu_check.py": (["--cpu-smoke"], check_gpu_smoke, []),
    "rollout_throughput.py": (["--quick"], check_rollout, [pytest.mark.slow, pytest.mark.vllm]),
    "verify_throughput.py": (["--quick"], check_verify, []),  # needs ../shared/data/math500
}


def bench_scripts() -> list[str]:
    return sorted(p.name for p in BENCH.glob("*.py") if p.name not in HELPERS)


def test_every_bench_script_is_covered() -> None:
    missing = [s for s in bench_scripts() if s not in SPECS]
    assert not missing, f"bench scripts without a quick-mode check in tests/test_bench.py: {missing}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=SPECS[s][2]) for s in bench_scripts() if s in SPECS]
)  # fmt: skip
def test_bench_quick(script: str, tmp_path: Path) -> None:
    args, check, _ = SPECS[script]
    out = tmp_path / "result.json"
    proc = run(script, *args, "--out", str(out))
    assert proc.stdout.strip(), f"{script} printed no table"
    check(json.loads(out.read_text()))


def test_gpu_check_without_gpu_exits_cleanly(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the no-GPU path does not apply")
    out = tmp_path / "gpu.json"
    proc = run("gpu_check.py", "--out", str(out))
    assert "no CUDA GPU" in proc.stderr
    assert not out.exists()  # nothing measured, nothing written


def test_e2e_rejects_unequal_split() -> None:
    proc = run("e2e_vs_trl.py", "--quick", "--updates", "3", timeout=120, expect_ok=False)
    assert proc.returncode != 0
    assert "--updates=3" in proc.stderr
