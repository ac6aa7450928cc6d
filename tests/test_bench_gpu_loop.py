"""bench/gpu_loop.py's harness: its --cpu-smoke mode runs both parts and writes sane JSON (never timing)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from test_bench import positive, run  # the bench runner and checks of tests/test_bench.py


def finite(values: list[Any]) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def check_compile(part: dict) -> None:
    rows = {r["variant"]: r for r in part["rows"]}
    assert set(rows) == {"eager", "compiled"}
    setup = part["setup"]
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("error"))
        assert row["compiled"] == (name == "compiled")
        steps = row["step_seconds"]
        assert len(steps) == setup["warmup_steps"] + setup["timed_steps"], name
        assert all(positive(t) for t in steps), name
        assert positive(row["first_step_s"]) and positive(row["warm_step_s"]) and positive(row["tokens_per_s"]), name
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["warm_step_s"])
        assert row["micro_batches_per_step"] == setup["answers_per_step"] / setup["micro_batch"]
        assert len(row["losses"]) == len(steps) and finite(row["losses"]), name
        assert row["peak_mem_gib"] is None  # CPU: no device memory to report
    assert rows["eager"]["graphs_compiled"] in (0, None)  # an internal torch counter: None when it is gone
    graphs = rows["compiled"]["graphs_compiled"]
    assert graphs is None or graphs >= 1
    assert part["step_time_ratio"] == pytest.approx(rows["compiled"]["warm_step_s"] / rows["eager"]["warm_step_s"])
    assert part["speedup"] == pytest.approx(1 / part["step_time_ratio"])
    # same initial weights and data: the first step's loss agrees (float32 on CPU)
    assert part["first_loss_abs_diff"] < 1e-4


def check_budget(part: dict) -> None:
    setup, lengths = part["setup"], part["lengths"]
    lo, hi = setup["response_range"]
    assert lengths["answers"] == setup["groups"] * setup["answers"]
    assert lo <= lengths["min"] <= lengths["median"] <= lengths["p90"] <= lengths["max"] <= hi
    assert lengths["min"] < lengths["max"]  # a spread of lengths, not one
    rows = {r["variant"]: r for r in part["rows"]}
    assert len(rows) == 2 * len(part["pairs"]) >= 4
    total_tokens = {r["response_tokens"] for r in part["rows"]}
    assert len(total_tokens) == 1  # every plan holds the same answers
    for row in part["rows"]:
        name = row["variant"]
        assert "error" not in row, (name, row.get("error"))
        assert 0 <= row["padding_fraction"] < 1, name
        assert row["micro_batches"] >= setup["optimizer_steps"], name
        assert len(row["step_seconds"]) == setup["optimizer_steps"] and all(positive(t) for t in row["step_seconds"])
        for key in ("train_s", "warm_step_s", "response_tokens_per_s", "tokens_per_s", "old_logprobs_s"):
            assert positive(row[key]), (name, key)
        assert row["response_tokens_per_s"] == pytest.approx(row["response_tokens"] / row["train_s"])
        assert row["computed_tokens"] > row["response_tokens"]  # prompts (and padding) are computed too
        assert len(row["losses"]) == setup["optimizer_steps"] and finite(row["losses"]), name
        if row["batching"] == "fixed":
            assert row["max_micro_batch_tokens"] <= row["micro_batch_size"] * (setup["prompt"] + hi)
        else:
            budget = row["max_tokens_per_micro_batch"]
            assert row["max_micro_batch_tokens"] <= max(budget, setup["prompt"] + hi)
    for pair in part["pairs"]:
        fixed, budget = rows[pair["fixed"]], rows[pair["budget"]]
        assert fixed["batching"] == "fixed" and budget["batching"] == "budget"
        # packing answers of similar length pads less than fixed-size micro-batches of arrival order
        assert pair["padding_budget"] < pair["padding_fixed"], pair
        assert pair["padding_fixed"] == fixed["padding_fraction"]
        assert pair["speedup"] == pytest.approx(budget["response_tokens_per_s"] / fixed["response_tokens_per_s"])
        assert positive(pair["speedup_iteration"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_loop_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu_loop.json"
    proc = run("gpu_loop.py", "--cpu-smoke", "--out", str(out), timeout=540)
    assert "(a) module.compile" in proc.stdout and "(b) token budget" in proc.stdout, proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["parts"] == ["budget", "compile"]
    assert data["errors"] == [] and positive(data["seconds"])
    check_budget(data["token_budget"])
    check_compile(data["compile"])


def test_gpu_loop_without_gpu_exits_cleanly(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the no-GPU path does not apply")
    out = tmp_path / "gpu_loop.json"
    proc = run("gpu_loop.py", "--out", str(out), timeout=120)
    assert "no CUDA GPU" in proc.stderr
    assert not out.exists()  # nothing measured, nothing written
