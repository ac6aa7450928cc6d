"""Shared helpers of the bench scripts: run metadata, JSON output, peak RSS, one-variant-per-subprocess runs.

Each variant whose memory is compared runs in a fresh interpreter (``run_worker``) so its peak RSS is its
own: the parent process never imports the model, and ``ru_maxrss`` of a child covers only that child.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

# Every bench runs offline: nothing may reach the HF hub (models are random-init, built from a config).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}


def meta(**extra: Any) -> dict[str, Any]:
    """Date, machine and library versions recorded with every result (docs/PERFORMANCE.md quotes them)."""
    import torch

    info: dict[str, Any] = {
        "date": str(date.today()),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info.update(extra)
    return info


def no_gpu_message(script: str) -> str:
    """What a GPU benchmark prints, before exiting 0 with nothing measured, on a machine without CUDA."""
    import torch

    return (
        f"{script}: no CUDA GPU is available (torch.cuda.is_available() is False, torch {torch.__version__}); "
        "it measures an H100/H200. Nothing was measured. Use --cpu-smoke to check the harness on CPU."
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def median(values: list[float]) -> float:
    if not values:
        raise ValueError("median of an empty list: the benchmark recorded no measurement")
    return statistics.median(values)


def run_worker(script: Path, args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run ``script --worker-out FILE *args`` in a fresh interpreter and return the JSON it wrote to FILE.

    A failing worker raises with its stderr tail, so a broken variant is reported rather than skipped.
    """
    with tempfile.TemporaryDirectory(prefix="nft-lit-bench-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, **OFFLINE_ENV}
        proc = subprocess.run(
            [sys.executable, str(script), "--worker-out", str(out), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-40:])
            raise RuntimeError(f"{script.name} worker {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def quiet_trainer(**overrides: Any) -> Any:
    """A one-device float32 Lightning Trainer with nothing but the work: no logger, checkpoints, progress bar,
    model summary or validation. ``overrides`` are further ``pl.Trainer`` arguments (they win)."""
    import lightning.pytorch as pl

    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return pl.Trainer(**{**settings, **overrides})


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a fixed-width table; ``columns`` = (key, header, format spec)."""
    widths = [max(len(header), 10) for _, header, _ in columns]
    print("  ".join(f"{header:>{w}}" for (_, header, _), w in zip(columns, widths, strict=True)))
    for row in rows:
        cells = []
        for (key, _, spec), w in zip(columns, widths, strict=True):
            value = row.get(key)
            cells.append(f"{'-' if value is None else format(value, spec):>{w}}")
        print("  ".join(cells))


def synthetic_steps(
    *,
    prompts: int,
    answers: int,
    prompt_tokens: int,
    response_tokens: int,
    vocab: int,
    micro_batch: int,
    mini_batches: int = 1,
    seed: int = 0,
    logprob_fn: Any = None,
    device: str = "cpu",
) -> list[Any]:
    """Optimizer steps (``StepBatch``) of random-token mixed groups, batched by the real rollout stages.

    Response lengths are uniform in [response_tokens/2, response_tokens]; answer j of every group is correct
    when j is odd, so every group is mixed (as after dynamic sampling). The groups go through
    ``nft_lit.steps`` as in an iteration on one rank: ``plan_steps``, ``build_steps`` (temperature 1, pad id 0
    as in ``nft_lit.models``' char tokenizer). With ``logprob_fn`` (``(input_ids, attention_mask, prompt_len,
    temperature) -> log-probs``, the caller sets eval mode) the old log-probs are recomputed by
    ``fill_old_logprobs`` on ``device``; otherwise they stay zero.
    """
    import random

    from nft_lit.iteration import Group
    from nft_lit.steps import StepLayout, build_steps, fill_old_logprobs, plan_steps

    rng = random.Random(seed)
    groups = []
    for p in range(prompts):
        lengths = [rng.randint(response_tokens // 2, response_tokens) for _ in range(answers)]
        responses = [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]
        correct = [float(j % 2) for j in range(answers)]
        groups.append(
            Group(
                prompt_index=p,
                prompt_ids=[rng.randrange(2, vocab) for _ in range(prompt_tokens)],
                response_ids=responses,
                engine_logprobs=[[0.0] * n for n in lengths],
                correct=correct,
                rewards=list(correct),
                truncated=[False] * answers,
            )
        )
    layout = StepLayout(num_mini_batches=mini_batches, micro_batch_size=micro_batch)
    layout.check(prompts, answers)
    plan = plan_steps(len(groups), answers, layout, world=1)
    steps = build_steps(groups, plan, rank=0, num_answers=answers, pad_id=0, temperature=1.0)
    if logprob_fn is not None:
        fill_old_logprobs(steps, logprob_fn, device)
    return steps
