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
COVERED_ELSEWHERE = {"gpu_loop.py": "tests/test_bench_gpu_loop.py"}  # its own harness test (slow)
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


E2E_BASELINE = "trl/hf"


def check_e2e_workload(data: dict, workload: str, sides: set[str]) -> None:
    block = data["workloads"][workload]
    setup = block["setup"]
    rows = {r["side"]: r for r in block["rows"]}
    assert set(rows) == sides
    for side, row in rows.items():
        assert "error" not in row and row["runs_ok"] == data["meta"]["runs"], (side, row.get("error"))
        # equal work: every side made the same number of optimizer updates per iteration
        assert row["optimizer_steps"] == setup["updates"] * setup["iterations"], side
        assert row["iterations_timed"] == setup["iterations"] - 1, side
        assert row["s_per_iteration_min"] <= row["s_per_iteration"] <= row["s_per_iteration_max"], side
        assert all(positive(t) for t in row["s_per_iteration_runs"]), side
        assert positive(row["generate_s"]), side
        assert row["generate_s"] <= row["rollout_s"], side  # generation is a part of the rollout
        assert 0 <= row["padding_fraction"] < 1, side
        lengths = row["lengths"]  # every answer of every iteration, EOS included
        assert lengths["answers"] == setup["prompts"] * setup["answers"] * setup["iterations"] * data["meta"]["runs"]
        assert 1 <= lengths["min"] <= lengths["median"] <= lengths["p90"] <= lengths["max"] <= setup["max_new_tokens"]
        assert 0 <= lengths["truncated_share"] <= 1, side
        assert positive(row["peak_rss_mib"]), side
        # one run: the ratio is the run's own, against that run's TRL/hf
        assert row["ratio_vs_trl"] == pytest.approx(row["s_per_iteration"] / rows[E2E_BASELINE]["s_per_iteration"])
        if row["framework"] == "nft-lit":
            assert 0 < row["kept_groups_mean"] <= setup["prompts"], side
            assert "generate" in row["phase_seconds"] or "gen" in row["phase_seconds"], side
    if "nft_lit_grpo/hf" in rows:
        assert rows["nft_lit_grpo/hf"]["kept_groups_mean"] == setup["prompts"]  # GRPO keeps every group
    assert set(block["goal_met"]) == {s for s in sides if s.startswith("nft_lit")}


def check_e2e(data: dict) -> None:
    import importlib.util

    meta = data["meta"]
    assert meta["workloads"] == ["default"] and meta["runs"] == 1 and meta["quick"]
    # the vLLM side runs whenever vllm is installed (TRL's colocated vLLM is left out of --quick: slow start)
    assert meta["vllm_installed"] == (importlib.util.find_spec("vllm") is not None)
    sides = {E2E_BASELINE, "nft_lit_grpo/hf", "nft_lit_nft/hf"} | (
        {"nft_lit_nft/vllm"} if meta["vllm_installed"] else set()
    )
    check_e2e_workload(data, "default", sides)


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


def check_demo_iteration(data: dict) -> None:
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"before", "after"} and not any("error" in r for r in rows.values())
    for row in rows.values():
        # every phase measured; the iteration holds at least its generation and training
        assert all(positive(row[p]) for p in ("generate", "train", "iteration")), row
        assert row["iteration"] >= row["generate"] + row["train"] and row["warm_iterations"] == 2
    assert rows["after"]["speedup_vs_before"] == pytest.approx(rows["before"]["iteration"] / rows["after"]["iteration"])


# script -> (arguments after the script, JSON checker, pytest marks)
SPECS: dict[str, tuple[list[str], Callable[[dict], None], list[Any]]] = {
    "loss_throughput.py": (["--quick"], check_loss_throughput, []),
    "e2e_vs_trl.py": (["--quick"], check_e2e, [pytest.mark.slow, pytest.mark.vllm]),  # vLLM side when installed
    "train_step.py": (["--quick"], check_train_step, []),
    "memory.py": (["--quick"], check_memory, [pytest.mark.slow]),
    "gpu_check.py": (["--cpu-smoke"], check_gpu_smoke, []),
    "rollout_throughput.py": (["--quick"], check_rollout, [pytest.mark.slow, pytest.mark.vllm]),
    "verify_throughput.py": (["--quick"], check_verify, []),  # needs ../shared/data/math500
    "demo_iteration.py": (
        ["--quick", "--variants", "before,after", "--iterations", "3", "--threads", "1"],
        check_demo_iteration,
        [pytest.mark.slow],
    ),
}


def bench_scripts() -> list[str]:
    return sorted(p.name for p in BENCH.glob("*.py") if p.name not in HELPERS)


def test_every_bench_script_is_covered() -> None:
    missing = [s for s in bench_scripts() if s not in SPECS and s not in COVERED_ELSEWHERE]
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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_e2e_longtail_quick(tmp_path: Path) -> None:
    """The long-tail workload's harness: a larger alphabet (non-ASCII symbols) and answers spread to the cap."""
    out = tmp_path / "result.json"
    sides = "trl/hf,nft_lit_nft/hf"
    run("e2e_vs_trl.py", "--quick", "--workload", "longtail", "--sides", sides, "--out", str(out), timeout=240)
    data = json.loads(out.read_text())
    check_e2e_workload(data, "longtail", set(sides.split(",")))
    for row in data["workloads"]["longtail"]["rows"]:
        lengths = row["lengths"]
        assert lengths["min"] < lengths["max"] == data["workloads"]["longtail"]["setup"]["max_new_tokens"]
        assert 0 < lengths["truncated_share"] < 1


def _e2e_module() -> Any:
    import importlib.util

    sys.path.insert(0, str(BENCH))  # the script imports its helpers as `common`
    try:
        spec = importlib.util.spec_from_file_location("e2e_vs_trl", BENCH / "e2e_vs_trl.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_e2e_aggregate_runs() -> None:
    """Across runs: median and min-max of s/iteration, the ratio taken within each run, errors kept per side."""
    e2e = _e2e_module()

    def result(seconds: list[float], lengths: list[int]) -> dict[str, Any]:
        return {
            "iteration_seconds": seconds,
            "rollout_seconds": [9.0] + [s / 2 for s in seconds],
            "generate_seconds": [9.0] + [s / 4 for s in seconds],
            "padding_fraction": 0.25,
            "micro_batches_per_iteration": 4,
            "fit_seconds": sum(seconds) + 9,
            "optimizer_steps": 8,
            "lengths": lengths,
            "truncated": [n == 4 for n in lengths],
            "peak_rss_mib": 500.0,
            "threads": 1,
            "engine_dtype": "float32",
        }

    runs = [
        {"trl/hf": result([2.0, 2.0, 2.0], [1, 2]), "trl/vllm": {"error": "ValueError: no"}},
        {"trl/hf": result([4.0, 4.0, 4.0], [3, 4]), "trl/vllm": {"error": "ValueError: no"}},
        {"trl/hf": result([1.0, 3.0, 3.0], [4, 4]), "trl/vllm": result([1.5, 1.5, 1.5], [2, 2])},
    ]
    rows = {r["side"]: r for r in e2e.aggregate(runs, ["trl/hf", "trl/vllm"])}
    trl, vllm = rows["trl/hf"], rows["trl/vllm"]
    assert trl["s_per_iteration_runs"] == [2.0, 4.0, 3.0] and trl["s_per_iteration"] == 3.0
    assert (trl["s_per_iteration_min"], trl["s_per_iteration_max"]) == (2.0, 4.0)
    assert trl["ratio_vs_trl_runs"] == [1.0, 1.0, 1.0]
    assert trl["train_s"] == pytest.approx(1.5)  # each warm iteration minus its own rollout, median, then median
    assert trl["lengths"]["answers"] == 6 and trl["lengths"]["truncated_share"] == pytest.approx(0.5)
    assert (trl["lengths"]["min"], trl["lengths"]["max"], trl["lengths"]["median"]) == (1, 4, 3.5)
    # a side that failed in some runs: its error, and figures from the runs that ran (ratio within run 3)
    assert vllm["runs_ok"] == 1 and vllm["error"] == "ValueError: no"
    assert vllm["ratio_vs_trl"] == pytest.approx(1.5 / 3.0)
    assert vllm["ratio_vs_trl_same_engine"] == 1.0
