"""GPU loop check (H100/H200, ~3 min): torch.compile inside the Lightning loop, and token-budget batching.

    python3 bench/gpu_loop.py                   # Qwen2.5-0.5B-shaped random-init model, bf16, one GPU
    python3 bench/gpu_loop.py --parts compile   # only part (a); --parts budget: only part (b)
    .venv/bin/python bench/gpu_loop.py --cpu-smoke   # tiny model on CPU: checks the harness (no numbers);
                                                     # compiles with backend aot_eager (no C++ build)

Without a CUDA GPU (and without --cpu-smoke) it prints why and exits 0 without measuring anything.

Both parts train a ``PolicyModule`` (NFT loss, AdamW, grad-norm clip) with ``Trainer.fit`` (manual
optimization, bf16-true, one device, as configs/trainer/gpu.yaml) on optimizer steps (``StepBatch``) built by
the real stages from synthetic groups of random tokens: the iteration's plan phase (``plan_iteration``:
``plan_steps`` -> ``build_steps``) and old-log-prob phase (``iteration_old_logprobs`` / ``fill_old_logprobs``),
handed over by a datamodule whose ``transfer_batch_to_device`` is the rollout datamodule's. The model is
built as in bench/gpu_check.py (hidden 896, 24 layers, 14/2 heads, vocab 151936, tied output layer, 494M
parameters; the builder is replicated, not imported: gpu_check.py imports hydra through loss_throughput.py,
which the GPU machine may lack). A step is timed between consecutive
``on_train_batch_end`` hooks, each after ``torch.cuda.synchronize()``, so data transfer, hooks and logging are
inside it; every variant starts from the same initial weights, on a fresh module and Trainer.

(a) ``module.compile``: PolicyModule(compile=False) vs PolicyModule(compile=True) over the same prebuilt steps
    of 16 answers of 2,048 tokens (512 prompt + 1,536 response, all the same length: one compiled graph, as
    in gpu_check.py's compiled rows, which were measured in a bare loop) in 2 micro-batches of 8, activation
    checkpointing off. The first step holds the compile (forward and backward graphs); it is reported apart
    (compile overhead ~ compiled first step - eager first step), then 1 more warm-up step and 8 timed steps
    (median s/step). Eager steps take ~0.4 s and the compile ~40-60 s (bench/gpu_check.py --compile took 76 s
    in all against 35 s eager), so part (a) is ~1.5 min.
(b) Token budget at long-tail lengths: 16 groups x 8 answers, prompt 512, response lengths log-uniform on
    [512, 8192] (fixed seed; median 2,048, mean ~2,770), planned into 2 optimizer steps of 64 answers two ways:
    fixed ``micro_batch_size`` vs ``max_tokens_per_micro_batch``, in pairs of equal worst-case micro-batch
    size: 2 answers (<= 17,408 padded tokens) vs 16,384 tokens, and 4 answers (<= 34,816) vs 32,768 tokens.
    Activation checkpointing is on: at ~33k response columns the float32 log-softmax/entropy tail alone takes
    ~115 GiB (gpu_check.py: ~3.5 MiB per response column), so the 4 / 32k pair may not fit an H200 and is
    then reported as out of memory. The first step's old log-probs come from its training forward
    (``old_logprobs_from_forward``), the second's from ``fill_old_logprobs`` (timed apart: it pays for
    padding too); one untimed warm-up step (the second step) precedes the two timed ones. At ~50k computed
    tokens/s a variant takes ~15-25 s, so part (b) is ~1.5 min.

Part (b) runs first (eager, no compile to wait for); the JSON is rewritten after every variant, so a run cut
by a timeout keeps what it measured. A variant that runs out of GPU memory is recorded as such and the others
go on; any other error is recorded too, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import random
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from common import median, meta, no_gpu_message, print_table, quiet_trainer, write_json

from nft_lit.datamodule import step_loader
from nft_lit.iteration import Group
from nft_lit.losses import NFTLoss
from nft_lit.module import PolicyModule, response_logprobs_and_entropy
from nft_lit.steps import (
    LogprobGap,
    StepBatch,
    StepLayout,
    fill_old_logprobs,
    iteration_old_logprobs,
    padding_fraction,
    plan_iteration,
)


@dataclass(frozen=True)
class Config:
    # model (Qwen2.5-0.5B shape, as bench/gpu_check.py)
    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    vocab: int = 151936
    # (a) compile inside the loop: fixed-length answers
    a_prompt: int = 512
    a_response: int = 1536
    a_answers: int = 8
    a_groups_per_step: int = 2
    a_micro_batch: int = 8
    a_distinct_steps: int = 4  # steps built; the timed ones cycle through them
    a_warmup: int = 2
    a_steps: int = 8
    a_checkpointing: bool = False
    # (b) token budget at long-tail lengths
    b_prompt: int = 512
    b_min: int = 512
    b_max: int = 8192
    b_answers: int = 8
    b_groups_per_step: int = 8
    b_steps: int = 2
    b_pairs: tuple[tuple[int, int], ...] = ((2, 16384), (4, 32768))  # (micro_batch_size, token budget)
    b_checkpointing: bool = True
    seed: int = 0
    # PolicyModule(compile=True) compiles with torch.compile's default (inductor). The CPU smoke swaps in
    # "aot_eager" (Dynamo capture and AOTAutograd's forward/backward graphs, no code generation): a cold
    # inductor build of even the tiny model takes minutes of C++ compilation on a small CPU.
    compile_backend: str = "inductor"


CPU_SMOKE = Config(
    hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=256,
    a_prompt=16, a_response=48, a_answers=4, a_groups_per_step=2, a_micro_batch=4, a_distinct_steps=2,
    a_warmup=1, a_steps=2,
    b_prompt=8, b_min=8, b_max=64, b_answers=4, b_groups_per_step=4, b_steps=2, b_pairs=((2, 128), (4, 256)),
    compile_backend="aot_eager",
)  # fmt: skip


class OutOfMemory(Exception):
    """A variant did not fit the device."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build_model(cfg: Config, max_len: int, device: torch.device) -> torch.nn.Module:
    """bench/gpu_check.py's random-init Qwen2 (bf16 on GPU; float32 on CPU, where it only checks the harness)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Qwen2Config(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        dtype=str(dtype).removeprefix("torch."),
    )
    torch.manual_seed(cfg.seed)
    with device:
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.cpu()  # the shared initial weights; each variant trains its own copy on the device


def make_groups(cfg: Config, lengths: list[list[int]], prompt: int, cap: float, rng: random.Random) -> list[Group]:
    """Groups of random tokens; answer j is correct when j is odd (mixed groups, as after dynamic sampling)."""
    groups = []
    for p, answer_lengths in enumerate(lengths):
        correct = [float(j % 2) for j in range(len(answer_lengths))]
        groups.append(
            Group(
                prompt_index=p,
                prompt_ids=[rng.randrange(2, cfg.vocab) for _ in range(prompt)],
                response_ids=[[rng.randrange(2, cfg.vocab) for _ in range(n)] for n in answer_lengths],
                engine_logprobs=[[0.0] * n for n in answer_lengths],
                correct=correct,
                rewards=list(correct),
                truncated=[n >= cap for n in answer_lengths],
            )
        )
    return groups


def long_tail_lengths(cfg: Config, rng: random.Random) -> list[list[int]]:
    """Response lengths log-uniform on [b_min, b_max]: density ~ 1/length, many short answers, a long tail."""
    lo, hi = math.log(cfg.b_min), math.log(cfg.b_max)
    groups = cfg.b_groups_per_step * cfg.b_steps
    return [[round(math.exp(rng.uniform(lo, hi))) for _ in range(cfg.b_answers)] for _ in range(groups)]


def plan(groups: list[Group], num_answers: int, layout: StepLayout) -> list[StepBatch]:
    """The iteration stage's plan phase (``plan_iteration``) on one rank (pad id 0, temperature 1)."""
    layout.check(len(groups), num_answers)
    return plan_iteration(groups, num_answers, layout, pad_id=0, temperature=1.0)[0]


def step_counts(steps: list[StepBatch]) -> dict[str, float]:
    real = [mb for s in steps for mb in s.micro_batches if not mb.is_padding]
    return {
        "response_tokens": float(sum(mb.loss_batch.response_mask.sum() for mb in real)),
        "tokens": float(sum(mb.attention_mask.sum() for mb in real)),
        "computed_tokens": float(sum(mb.attention_mask.numel() for mb in real)),
        "micro_batches": len(real),
        "max_micro_batch_tokens": max(mb.attention_mask.numel() for mb in real),
    }


class _Steps(pl.LightningDataModule):
    """The steps, one per dataloader item, moved to the device as ``RolloutDataModule`` moves them."""

    def __init__(self, steps: list[StepBatch]) -> None:
        super().__init__()
        self.steps = steps

    def train_dataloader(self) -> Any:
        return step_loader(self.steps)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, StepBatch) else batch


class _Clock(pl.Callback):
    """Marks after a device sync: at the epoch start and at every batch end; records each step's loss."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[float] = []
        self.losses: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        sync(self.device)
        self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        sync(self.device)
        self.marks.append(time.perf_counter())
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss) if loss is not None else math.nan)

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def new_module(
    base: torch.nn.Module, device: torch.device, compile: bool, checkpointing: bool, backend: str = "inductor"
) -> PolicyModule:
    module = PolicyModule(
        model=copy.deepcopy(base).to(device),
        loss=NFTLoss(),
        lr=1e-6,
        warmup_steps=0,
        grad_clip=1.0,
        activation_checkpointing=checkpointing,
        compile=compile,
    )
    if compile and backend != "inductor":  # the CPU smoke only (Config.compile_backend)
        module._logprobs_fn = torch.compile(response_logprobs_and_entropy, backend=backend)
    return module


def fit(module: PolicyModule, steps: list[StepBatch], device: torch.device) -> _Clock:
    clock = _Clock(device)
    gpu = device.type == "cuda"
    trainer = quiet_trainer(
        accelerator="gpu" if gpu else "cpu",
        precision="bf16-true" if gpu else "32-true",
        max_epochs=1,
        log_every_n_steps=1,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=_Steps(steps))
    if len(clock.marks) != len(steps) + 1:
        raise RuntimeError(f"expected {len(steps)} training steps, the clock saw {len(clock.marks) - 1}")
    return clock


def guarded(device: torch.device, errors: list[str], run: Any, **label: Any) -> dict:
    """``run()``'s row, or ``label`` with the error: out of memory (expected for a too-big variant) or any
    other (counted in ``errors``, which makes the exit status 1). Device memory is freed either way."""
    try:
        row = run()
    except torch.OutOfMemoryError:
        row = {**label, "error": "out of memory"}
    except Exception as exc:  # one broken variant must not lose the others' numbers
        if "out of memory" in str(exc):
            row = {**label, "error": "out of memory"}
        else:
            traceback.print_exc()
            errors.append(f"{label}: {type(exc).__name__}: {exc}")
            row = {**label, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    free(device)
    return row


# ---------------------------------------------------------------------------------------------------- (a)
def compile_steps(cfg: Config, base: torch.nn.Module, device: torch.device) -> list[StepBatch]:
    rng = random.Random(cfg.seed)
    groups_n = cfg.a_groups_per_step * cfg.a_distinct_steps
    lengths = [[cfg.a_response] * cfg.a_answers for _ in range(groups_n)]
    groups = make_groups(cfg, lengths, cfg.a_prompt, math.inf, rng)  # none truncated
    layout = StepLayout(num_mini_batches=cfg.a_distinct_steps, micro_batch_size=cfg.a_micro_batch)
    steps = plan(groups, cfg.a_answers, layout)
    # logπ_old of the initial weights (eager), shared by both variants: the steps are never modified.
    model = copy.deepcopy(base).to(device).eval()
    module = PolicyModule(model=model, loss=NFTLoss())
    with torch.no_grad():
        fill_old_logprobs(steps, module.response_logprobs, device)
    del module, model
    free(device)
    return steps


def run_compile_variant(
    cfg: Config, base: torch.nn.Module, steps: list[StepBatch], device: torch.device, compile: bool
) -> dict:
    module = new_module(base, device, compile=compile, checkpointing=cfg.a_checkpointing, backend=cfg.compile_backend)
    counts = step_counts(steps)
    per_step = {k: v / len(steps) for k, v in counts.items() if k.endswith("tokens") or k == "micro_batches"}
    schedule = [steps[i % len(steps)] for i in range(cfg.a_warmup + cfg.a_steps)]
    graphs_before = _dynamo_graphs()
    free(device)
    clock = fit(module, schedule, device)
    times = clock.intervals()
    warm = median(times[cfg.a_warmup :])
    graphs_after = _dynamo_graphs()
    return {
        "variant": "compiled" if compile else "eager",
        "compiled": compile,
        "backend": cfg.compile_backend if compile else None,
        "checkpointing": cfg.a_checkpointing,
        "micro_batch": cfg.a_micro_batch,
        "micro_batches_per_step": per_step["micro_batches"],
        "first_step_s": times[0],
        "second_step_s": times[1] if len(times) > 1 else None,
        "warm_step_s": warm,
        "step_seconds": times,
        "tokens_per_s": per_step["tokens"] / warm,
        "response_tokens_per_s": per_step["response_tokens"] / warm,
        "tokens_per_step": per_step["tokens"],
        "peak_mem_gib": peak_gib(device),
        "graphs_compiled": None if graphs_before is None else graphs_after - graphs_before,
        "losses": clock.losses,
    }


def _dynamo_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # an internal counter, only informative
        return None


def part_compile(cfg: Config, base: torch.nn.Module, device: torch.device, errors: list[str]) -> dict:
    steps = compile_steps(cfg, base, device)
    rows = []
    for compile in (False, True):
        label = {"variant": "compiled" if compile else "eager", "compiled": compile}
        started = time.perf_counter()
        rows.append(
            guarded(device, errors, lambda c=compile: run_compile_variant(cfg, base, steps, device, c), **label)
        )
        print(f"  (a) {label['variant']}: {time.perf_counter() - started:.1f} s", flush=True)
    eager, compiled = rows
    both = "error" not in eager and "error" not in compiled
    return {
        "setup": {
            "answers_per_step": cfg.a_answers * cfg.a_groups_per_step,
            "sequence": cfg.a_prompt + cfg.a_response,
            "prompt": cfg.a_prompt,
            "micro_batch": cfg.a_micro_batch,
            "warmup_steps": cfg.a_warmup,
            "timed_steps": cfg.a_steps,
        },
        "rows": rows,
        # compiled / eager warm step time (< 1: compile pays), and its inverse on tokens/s
        "step_time_ratio": compiled["warm_step_s"] / eager["warm_step_s"] if both else None,
        "speedup": eager["warm_step_s"] / compiled["warm_step_s"] if both else None,
        "compile_overhead_s": compiled["first_step_s"] - eager["first_step_s"] if both else None,
        "memory_ratio": (compiled["peak_mem_gib"] / eager["peak_mem_gib"] if both and eager["peak_mem_gib"] else None),
        # same weights, same data: the first step's loss agrees up to bf16 rounding
        "first_loss_abs_diff": abs(compiled["losses"][0] - eager["losses"][0]) if both else None,
    }


# ---------------------------------------------------------------------------------------------------- (b)
def run_budget_variant(
    cfg: Config, base: torch.nn.Module, groups: list[Group], layout: StepLayout, device: torch.device
) -> dict:
    steps = plan(groups, cfg.b_answers, layout)
    if len(steps) < 2:
        raise ValueError("part (b) needs >= 2 optimizer steps (the second is the warm-up step)")
    counts = step_counts(steps)
    module = new_module(base, device, compile=False, checkpointing=cfg.b_checkpointing)
    model = module.model
    assert model is not None
    free(device)
    # The iteration stage's old-log-prob phase: the first step's logπ_old from its training forward (its gap
    # then pending, handed to the module as RolloutDataModule does), the others' recomputed.
    gap = LogprobGap()
    sync(device)
    started = time.perf_counter()
    first_from_forward = iteration_old_logprobs(steps, model, module.response_logprobs, device, gap)
    sync(device)
    old_seconds = time.perf_counter() - started
    module.begin_iteration({}, gap if first_from_forward else None)
    old_peak = peak_gib(device)
    free(device)
    # One untimed warm-up step (the last step: its old log-probs are filled and it is never modified), then all.
    clock = fit(module, [steps[-1], *steps], device)
    times = clock.intervals()[1:]
    train_seconds = sum(times)
    budget = layout.max_tokens_per_micro_batch
    return {
        "variant": f"tokens<={budget}" if budget else f"micro_batch={layout.micro_batch_size}",
        "batching": "budget" if budget else "fixed",
        "micro_batch_size": None if budget else layout.micro_batch_size,
        "max_tokens_per_micro_batch": budget,
        "checkpointing": cfg.b_checkpointing,
        "padding_fraction": padding_fraction(steps),
        "micro_batches": counts["micro_batches"],
        "micro_batches_per_step": counts["micro_batches"] / len(steps),
        "max_micro_batch_tokens": counts["max_micro_batch_tokens"],
        "computed_tokens": counts["computed_tokens"],
        "response_tokens": counts["response_tokens"],
        "old_logprobs_s": old_seconds,
        "train_s": train_seconds,
        "warm_step_s": train_seconds / len(times),
        "step_seconds": times,
        "response_tokens_per_s": counts["response_tokens"] / train_seconds,
        "tokens_per_s": counts["tokens"] / train_seconds,
        "iteration_s": old_seconds + train_seconds,
        "peak_mem_gib": peak_gib(device),
        "peak_old_logprobs_gib": old_peak,
        "losses": clock.losses[1:],
    }


def length_summary(lengths: list[list[int]], cap: int) -> dict[str, float]:
    flat = sorted(n for g in lengths for n in g)
    return {
        "answers": len(flat),
        "min": flat[0],
        "median": statistics.median(flat),
        "mean": statistics.fmean(flat),
        "p90": flat[min(len(flat) - 1, int(0.9 * len(flat)))],
        "max": flat[-1],
        "at_cap_share": sum(n >= cap for n in flat) / len(flat),
    }


def part_budget(
    cfg: Config, base: torch.nn.Module, device: torch.device, errors: list[str], on_row: Any = None
) -> dict:
    rng = random.Random(cfg.seed)
    lengths = long_tail_lengths(cfg, rng)
    groups = make_groups(cfg, lengths, cfg.b_prompt, cfg.b_max, rng)
    rows, pairs = [], []
    for micro_batch, budget in cfg.b_pairs:
        pair = []
        for layout in (
            StepLayout(num_mini_batches=cfg.b_steps, micro_batch_size=micro_batch),
            StepLayout(num_mini_batches=cfg.b_steps, max_tokens_per_micro_batch=budget),
        ):
            label = {
                "variant": f"tokens<={budget}" if layout.max_tokens_per_micro_batch else f"micro_batch={micro_batch}",
                "batching": "budget" if layout.max_tokens_per_micro_batch else "fixed",
            }
            started = time.perf_counter()
            row = guarded(
                device, errors, lambda lay=layout: run_budget_variant(cfg, base, groups, lay, device), **label
            )
            print(f"  (b) {label['variant']}: {time.perf_counter() - started:.1f} s", flush=True)
            pair.append(row)
            rows.append(row)
            if on_row is not None:
                on_row({"rows": rows})
        fixed, budgeted = pair
        ok = "error" not in fixed and "error" not in budgeted
        pairs.append(
            {
                "fixed": fixed["variant"],
                "budget": budgeted["variant"],
                "padding_fixed": fixed.get("padding_fraction"),
                "padding_budget": budgeted.get("padding_fraction"),
                # budget / fixed response tokens/s over the training steps (> 1: the budget is faster)
                "speedup": budgeted["response_tokens_per_s"] / fixed["response_tokens_per_s"] if ok else None,
                # the same with the old-log-prob pass (also batched by the plan) included
                "speedup_iteration": fixed["iteration_s"] / budgeted["iteration_s"] if ok else None,
                "memory_ratio": (
                    budgeted["peak_mem_gib"] / fixed["peak_mem_gib"] if ok and fixed["peak_mem_gib"] else None
                ),
            }
        )
    return {
        "setup": {
            "groups": len(groups),
            "answers": cfg.b_answers,
            "optimizer_steps": cfg.b_steps,
            "prompt": cfg.b_prompt,
            "response_range": [cfg.b_min, cfg.b_max],
            "distribution": "log-uniform",
            "seed": cfg.seed,
        },
        "lengths": length_summary(lengths, cfg.b_max),
        "rows": rows,
        "pairs": pairs,
    }


# ---------------------------------------------------------------------------------------------------- main
def print_compile(result: dict) -> None:
    s = result["setup"]
    print(
        f"(a) module.compile in Trainer.fit: {s['answers_per_step']} answers x {s['sequence']} tokens per step, "
        f"micro-batch {s['micro_batch']}, {s['timed_steps']} timed steps after {s['warmup_steps']}"
    )
    print_table(
        [r for r in result["rows"] if "error" not in r],
        [
            ("variant", "variant", ""),
            ("first_step_s", "1st step s", ".2f"),
            ("warm_step_s", "warm s/step", ".3f"),
            ("tokens_per_s", "tok/s", ".0f"),
            ("peak_mem_gib", "mem GiB", ".1f"),
            ("graphs_compiled", "graphs", ""),
        ],
    )
    for r in (r for r in result["rows"] if "error" in r):
        print(f"  {r['variant']}: {r['error']}")
    if result["speedup"] is not None:
        print(
            f"compiled/eager step time {result['step_time_ratio']:.3f} (speed-up {result['speedup']:.2f}x), "
            f"compile overhead {result['compile_overhead_s']:.1f} s, first-step loss |diff| "
            f"{result['first_loss_abs_diff']:.2e}"
        )


def print_budget(result: dict) -> None:
    s, n = result["setup"], result["lengths"]
    print(
        f"(b) token budget: {s['groups']} groups x {s['answers']} answers in {s['optimizer_steps']} steps, prompt "
        f"{s['prompt']}, responses {s['distribution']} on {s['response_range']} (median {n['median']:.0f}, mean "
        f"{n['mean']:.0f}, p90 {n['p90']}, max {n['max']})"
    )
    print_table(
        [r for r in result["rows"] if "error" not in r],
        [
            ("variant", "variant", ""),
            ("padding_fraction", "padding", ".3f"),
            ("micro_batches", "micro-b.", "d"),
            ("old_logprobs_s", "old-lp s", ".2f"),
            ("warm_step_s", "s/step", ".2f"),
            ("response_tokens_per_s", "resp tok/s", ".0f"),
            ("peak_mem_gib", "mem GiB", ".1f"),
        ],
    )
    for r in (r for r in result["rows"] if "error" in r):
        print(f"  {r['variant']}: {r['error']}")
    for p in result["pairs"]:
        if p["speedup"] is not None:
            print(
                f"{p['budget']} vs {p['fixed']}: padding {p['padding_fixed']:.3f} -> {p['padding_budget']:.3f}, "
                f"speed-up {p['speedup']:.2f}x (with old log-probs {p['speedup_iteration']:.2f}x)"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: harness check only")
    parser.add_argument(
        "--parts", nargs="+", choices=["budget", "compile"], default=["budget", "compile"], help="parts to run"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/gpu_loop.json)")
    args = parser.parse_args()

    if args.cpu_smoke:
        device, cfg = torch.device("cpu"), CPU_SMOKE
    elif not torch.cuda.is_available():
        print(no_gpu_message("bench/gpu_loop.py"), file=sys.stderr)
        return 0
    else:
        device, cfg = torch.device("cuda", 0), Config()
    out = args.out or Path("bench/results/gpu_loop_cpu_smoke.json" if args.cpu_smoke else "bench/results/gpu_loop.json")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    max_len = max(cfg.a_prompt + cfg.a_response, cfg.b_prompt + cfg.b_max)
    base = build_model(cfg, max_len, device)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"{name}: Qwen2-shaped d={cfg.hidden} L={cfg.layers} ({n_params / 1e6:.0f}M params), NFT loss", flush=True)
    payload: dict[str, Any] = {"meta": meta(device=name, config=asdict(cfg), params=n_params, parts=args.parts)}
    errors: list[str] = []

    def save(**parts: Any) -> None:
        payload.update(parts)
        payload["errors"] = errors
        payload["seconds"] = time.perf_counter() - t0
        write_json(out, payload)

    if "budget" in args.parts:
        result = part_budget(cfg, base, device, errors, on_row=lambda partial: save(token_budget=partial))
        save(token_budget=result)
        print_budget(result)
    if "compile" in args.parts:
        result = part_compile(cfg, base, device, errors)
        save(compile=result)
        print_compile(result)
    save()
    print(f"total {time.perf_counter() - t0:.0f} s")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
