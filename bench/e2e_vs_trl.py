"""One RL iteration end to end (generate, verify, train): nft-lit (GRPO, NFT) vs TRL's GRPOTrainer, HF and vLLM.

    .venv/bin/python bench/e2e_vs_trl.py --threads 1                 # both workloads, every side, 3 runs (~25 min)
    .venv/bin/python bench/e2e_vs_trl.py --workload longtail --runs 1
    .venv/bin/python bench/e2e_vs_trl.py --quick                     # tiny shape, harness test (< 2 min idle)

Sides are (framework, algorithm, engine):
    trl/hf            TRL GRPOTrainer, ``loss_type="dapo"``, sampling with ``model.generate`` (the baseline)
    nft_lit_grpo/hf   nft-lit, configs/algorithm/grpo.yaml, ``HFGenerateEngine``
    nft_lit_nft/hf    nft-lit, configs/algorithm/nft.yaml, ``HFGenerateEngine``
    nft_lit_nft/vllm  nft-lit NFT with a colocated ``VLLMEngine`` (dtype="policy", i.e. float32, eager)
    trl/vllm          TRL with ``use_vllm=True, vllm_mode="colocate"``
A side that cannot run records its error (one line) instead of a number; the other sides go on.

Equal work on every side: the same random-init Llama (same seed), the same synthetic prompts, K answers per
prompt, ``max_new_tokens``, sampling (temperature 1, no truncation), reward, AdamW (lr, betas, weight decay,
grad clip 1.0, constant LR) and ``--updates`` optimizer steps per iteration from one generation, with the
old log-probs recomputed before training (TRL does so when an iteration has several optimizer steps; nft-lit
takes the first step's from its training forward, exact since no update happened since the rollout). TRL
runs with ``loss_type="dapo"`` (token-mean, clip 0.2/0.28, std-scaled advantages, no KL), the objective of
configs/algorithm/grpo.yaml. The reward is a parity of the decoded answer: a deterministic binary verifier
that gives mixed groups under a random-init model, so NFT's dynamic sampling keeps nearly every group in its
one generation round (kept groups are reported). TRL splits each step into ``--micro-batch`` answers;
nft-lit packs answers sorted by length into micro-batches of ``--max-tokens-per-micro-batch`` padded tokens
(auto: ``micro_batch x (longest prompt + max_new_tokens) / 4``; 0 turns it off: ``--micro-batch`` answers).
Both vLLM sides run eager (``enforce_eager=True``, passed to the ``vllm.LLM`` TRL builds too). nft-lit's
engine runs in the policy's float32; TRL's in bfloat16, TRL's own choice (it has no dtype option and vLLM's
"auto" picks bfloat16): forced to float32 it fails on CPU at its first weight sync (``TRL_VLLM_DTYPE``).
TRL's vLLM importance-sampling correction is off (nft-lit has none). The vLLM sides get
``VLLM_CPU_KVCACHE_SPACE=1`` (GiB; unless set) instead of vLLM's 4 GiB default.

Workloads (``--workload``):
    default   16 prompts x K=8, 64 new tokens, the 14-symbol arithmetic alphabet: answers of ~16 tokens.
    longtail  4 prompts x K=8, 256 new tokens, micro-batch 8, a 144-symbol alphabet (vocab 146: the arithmetic
              characters, then Latin Extended-A/B letters). A random-init model stops with probability of the
              order of 1/vocab per token (the exact rate is the random draw's: 0.7-1.4/vocab over the alphabet
              sizes tried), so answer lengths are near-geometric: with 144 symbols they spread over 1..256
              (median ~85, mean ~110 tokens) and ~14% are cut at 256. Every side prints its length
              distribution (min/median/p90/max, truncated share; tokens, EOS included).

Statistics: each side runs ``--iterations`` iterations (default 4) in its own subprocess (separate peak RSS);
the first pays for start-up, so a run's s/iteration is the median of the warm ones, timed between consecutive
iteration ends. ``--runs`` (default 3) repeats the whole comparison (every side in turn); each side reports
the median across runs and the min-max spread of s/iteration and of its ratio to TRL/hf, the ratio taken
within each run. Goal: nft-lit NFT <= 0.5x TRL's time per iteration at equal work (GOAL_RATIO).

Columns besides s/iteration: "rollout s" is the data side of an iteration (nft-lit: ``RolloutIteration.run``
= sync, generate, verify, plan, old log-probs; TRL: ``_generate_and_score_completions`` = generate, reward,
advantages, old log-probs), "generate s" the engine's part of it (TRL/vllm: with its weight sync), "train s" an
iteration minus its rollout, "padding" the padded share of the token positions the training forwards compute
(TRL pads a whole generation batch to its longest prompt + answer; nft-lit reports ``rollout/padding_fraction``),
"micro-b/it" forward/backward passes per iteration. nft-lit sides also record the iteration stage's phase times
(``seconds/*`` of ``IterationResult.stats``, medians of the warm iterations). ``--quick``: a tiny model, one
run of 2 iterations, the default workload, the HF sides and (when vllm is installed) nft_lit_nft/vllm.
Writes bench/results/e2e_vs_trl.json: meta (machine, versions, load averages before/after), per workload its
setup, one row per side (medians, spreads, per-run figures, length summary, error if any) and the verdicts.
"""

from __future__ import annotations

import argparse
import atexit
import inspect
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common import median, meta, peak_rss_mib, print_table, quiet_trainer, run_worker, write_json

SCRIPT = Path(__file__).resolve()
CONFIG_DIR = SCRIPT.parents[1] / "configs"
BASELINE = "trl/hf"
SIDES = (BASELINE, "nft_lit_grpo/hf", "nft_lit_nft/hf", "nft_lit_nft/vllm", "trl/vllm")
WORKLOADS = ("default", "longtail")
GOAL_RATIO = 0.5
# The dtype of TRL's colocated vLLM: None keeps TRL's (vLLM "auto": bfloat16 for this float32 model). "float32"
# (nft-lit's dtype="policy") fails on vLLM-CPU 0.32 at TRL's first weight sync, which calls the vLLM model's
# load_weights directly: "AttributeError: 'Parameter' object has no attribute 'weight_loader'" (the CPU float32
# path repacks the linear weights after loading; nft-lit's VLLMEngine syncs through collective_rpc("reload_weights")).
TRL_VLLM_DTYPE: str | None = None
WORKER_TIMEOUT_S = 900
AUTO, OFF = -1, 0  # --max-tokens-per-micro-batch: automatic budget, or fixed micro-batches of --micro-batch
FIRST_EXTRA_CODE_POINT = 0x100  # longtail's extra symbols: Latin Extended-A/B letters (no space, no control)


@dataclass
class Setup:
    """The shared workload of every side."""

    prompts: int = 16
    answers: int = 8
    max_new_tokens: int = 64
    symbols: int = 0  # alphabet size of the char tokenizer; 0: the arithmetic alphabet (nft_lit.synthetic)
    updates: int = 2
    micro_batch: int = 16
    max_tokens_per_micro_batch: int = AUTO  # nft-lit only; -1 auto, 0 off (micro-batches of micro_batch)
    iterations: int = 4
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 1024
    lr: float = 1e-5
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 0  # torch intra-op threads in every side; 0 keeps torch's default

    def check(self) -> None:
        from_synthetic = 14  # len(nft_lit.synthetic.ALPHABET); not imported here (the parent stays light)
        total = self.prompts * self.answers
        if self.iterations < 2:
            raise ValueError(f"--iterations must be >= 2 (the first one pays start-up), got {self.iterations}")
        if total % self.updates or (total // self.updates) % self.micro_batch:
            raise ValueError(
                f"--prompts x --answers = {total} answers must split into --updates={self.updates} steps of whole"
                f" --micro-batch={self.micro_batch} micro-batches (TRL needs equal gradient-accumulation steps)"
            )
        if self.hidden % self.heads or self.hidden // self.heads < 32:
            raise ValueError(f"--hidden/--heads must divide and give head size >= 32, got {self.hidden}/{self.heads}")
        if self.symbols and self.symbols < from_synthetic:
            raise ValueError(
                f"--symbols must be 0 or >= {from_synthetic} (the prompts' characters), got {self.symbols}"
            )
        if self.max_tokens_per_micro_batch < AUTO:
            raise ValueError(
                f"--max-tokens-per-micro-batch must be -1 (auto), 0 (off) or > 0, got {self.max_tokens_per_micro_batch}"
            )


# Workload presets; command-line values override them (in every workload asked for).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # 32 answers: the whole bench (5 sides, both workloads, 3 runs) stays near 25 min on 2 CPU cores
    "longtail": {"prompts": 4, "answers": 8, "max_new_tokens": 256, "symbols": 144, "micro_batch": 8},
}
QUICK = {
    "prompts": 4,
    "answers": 4,
    "max_new_tokens": 8,
    "micro_batch": 4,
    "iterations": 2,
    "hidden": 64,
    "layers": 2,
    "heads": 2,
    "intermediate": 128,
}
QUICK_PRESETS: dict[str, dict[str, Any]] = {"default": {}, "longtail": {"max_new_tokens": 24, "symbols": 20}}


def parity_reward(text: str) -> float:
    """1.0 when the code points of the answer sum to an even number: binary, deterministic, ~50% positive."""
    return float(sum(map(ord, text)) % 2 == 0)


class ParityVerifier:
    """``nft_lit.reward.Verifier`` for ``parity_reward`` (the same function TRL's side is given)."""

    def score(self, responses: list[str], golds: list[str], truncated: list[bool]) -> Any:
        from nft_lit.reward import VerifyResult

        start = time.perf_counter()
        rewards = [parity_reward(r) for r in responses]
        return VerifyResult(rewards, {"seconds": time.perf_counter() - start, "timeouts": 0.0, "errors": 0.0})


def alphabet(symbols: int) -> str:
    """The char tokenizer's alphabet: the arithmetic one (every prompt character), padded to ``symbols``."""
    from nft_lit.synthetic import ALPHABET

    extra = max(symbols - len(ALPHABET), 0)
    return ALPHABET + "".join(chr(FIRST_EXTRA_CODE_POINT + i) for i in range(extra))


def build(setup: Setup) -> tuple[Any, Any, list[Any]]:
    """Model, char tokenizer and the synthetic prompts; identical in every subprocess (fixed seeds)."""
    from nft_lit.models import build_char_tokenizer, tiny_causal_lm
    from nft_lit.synthetic import ArithmeticTask, sample_problems

    tokenizer = build_char_tokenizer(alphabet(setup.symbols))
    # Exactly `prompts` problems: every iteration of every side generates for the same prompts.
    problems = sample_problems(ArithmeticTask(digits=3), "train", setup.prompts, setup.seed)
    longest = max(len(tokenizer(p.question, add_special_tokens=False).input_ids) for p in problems)
    model = tiny_causal_lm(
        arch="llama",
        vocab_size=len(tokenizer),
        hidden_size=setup.hidden,
        num_layers=setup.layers,
        num_heads=setup.heads,
        intermediate_size=setup.intermediate,
        # vLLM takes its max_model_len from here: room for the longest prompt and answer
        max_position_embeddings=max(256, 64 * math.ceil((longest + setup.max_new_tokens) / 64)),
        seed=setup.seed,
    )
    return model, tokenizer, problems


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the worker exits (TRL's output_dir, the model folder vLLM loads)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def warm(values: list[float]) -> list[float]:
    """Per-iteration values without the first iteration's (start-up)."""
    return values[1:]


def run_trl(setup: Setup, engine: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer, problems = build(setup)
    tmp = scratch_dir("nft-lit-e2e-trl-")  # TRL wants an output_dir; nothing is saved there
    vllm_args: dict[str, Any] = {}
    if engine == "vllm":
        import functools

        from nft_lit.models import save_hf_folder

        # Colocate mode starts vllm.LLM(model=model.name_or_path): it needs the model as a folder.
        folder = save_hf_folder(model, tokenizer, tmp / "model")
        model.name_or_path = model.config.name_or_path = str(folder)
        import trl.generation.vllm_generation as trl_vllm

        # Eager, as nft-lit's VLLMEngine. The dtype stays TRL's (it has no option; vLLM's "auto" runs the float32
        # folder in bfloat16): forced to float32 (TRL_VLLM_DTYPE), TRL's weight sync fails on CPU (see there).
        extra_llm_args = {"enforce_eager": True} | ({"dtype": TRL_VLLM_DTYPE} if TRL_VLLM_DTYPE else {})
        trl_vllm.LLM = functools.partial(trl_vllm.LLM, **extra_llm_args)
        vllm_args = {
            "use_vllm": True,
            "vllm_mode": "colocate",
            "vllm_enable_sleep_mode": False,
            "vllm_importance_sampling_correction": False,
        }
    total = setup.prompts * setup.answers
    accumulation = total // setup.updates // setup.micro_batch
    marks: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks.append(time.perf_counter())

    lengths: list[int] = []
    truncated: list[bool] = []
    eos = tokenizer.eos_token_id

    def reward(completions: list[str], completion_ids: list[list[int]], **kw: Any) -> list[float]:
        lengths.extend(len(c) for c in completion_ids)
        truncated.extend(eos not in c for c in completion_ids)
        return [parity_reward(c) for c in completions]

    config = GRPOConfig(
        output_dir=str(tmp),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=setup.seed,
        learning_rate=setup.lr,
        weight_decay=setup.weight_decay,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        per_device_train_batch_size=setup.micro_batch,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation * setup.updates,
        num_generations=setup.answers,
        max_completion_length=setup.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_iterations=1,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        scale_rewards="group",
        max_steps=setup.updates * setup.iterations,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        **vllm_args,
    )
    dataset = Dataset.from_list([{"prompt": p.question, "answer": p.answer} for p in problems])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    # Phase clocks: the whole rollout (generate, reward, advantages, old log-probs) once per iteration, and
    # the generation within it (with vLLM: the weight sync too). TRL pads the whole generation batch to its
    # longest prompt + answer, and every micro-batch keeps that width: its padded share is measured here.
    rollout_seconds: list[float] = []
    generate_seconds: list[float] = []
    padding: list[float] = []
    score_and_rollout, generate = trainer._generate_and_score_completions, trainer._generate

    def timed_rollout(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = score_and_rollout(*args, **kwargs)
        rollout_seconds.append(time.perf_counter() - start)
        masks = (out["prompt_mask"], out["completion_mask"])
        padding.append(1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks))
        return out

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        generate_seconds.append(time.perf_counter() - start)
        return out

    trainer._generate_and_score_completions = timed_rollout
    trainer._generate = timed_generate
    start = time.perf_counter()
    trainer.train()
    fit_seconds = time.perf_counter() - start
    # marks[0] is on_train_begin; every `updates` steps end an iteration. The first one pays for start-up.
    ends = marks[setup.updates :: setup.updates]
    iteration_seconds = [b - a for a, b in itertools.pairwise(ends)]
    engine_dtype = "float32 (policy)"
    if engine == "vllm":
        engine_dtype = str(trainer.vllm_generation.llm.llm_engine.model_config.dtype).removeprefix("torch.")
    return {
        "engine_dtype": engine_dtype,
        "iteration_seconds": iteration_seconds,
        "rollout_seconds": rollout_seconds,
        "generate_seconds": generate_seconds,
        "padding_fraction": median(warm(padding)),
        "micro_batches_per_iteration": accumulation * setup.updates,
        "fit_seconds": fit_seconds,
        "optimizer_steps": trainer.state.global_step,
        "lengths": lengths,
        "truncated": truncated,
        "answers_generated": len(lengths),
        "threads": torch.get_num_threads(),
    }


def stat(stats: dict[str, float], name: str) -> float | None:
    """A rollout statistic, logged as ``rollout/<name>`` (or bare ``<name>`` by older nft-lit); None if absent."""
    return stats.get(f"rollout/{name}", stats.get(name))


def phase_seconds(stats: dict[str, float]) -> dict[str, float]:
    """The datamodule's phase times: ``seconds/<phase>`` (or ``<phase>_seconds`` by older nft-lit)."""
    out = {}
    for key, value in stats.items():
        if key.startswith("seconds/"):
            out[key.removeprefix("seconds/")] = value
        elif key.endswith("_seconds") and "per_second" not in key:
            out[key.split("/")[-1].removesuffix("_seconds")] = value
    return out


def token_budget(setup: Setup, longest_prompt: int) -> int | None:
    """``--max-tokens-per-micro-batch`` resolved: auto is a quarter of a full fixed micro-batch's padded size."""
    if setup.max_tokens_per_micro_batch == AUTO:
        return setup.micro_batch * (longest_prompt + setup.max_new_tokens) // 4
    return setup.max_tokens_per_micro_batch or None


def run_nft_lit(setup: Setup, algorithm: str, engine_name: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from nft_lit.datamodule import ROLLOUT_TRAINER_SETTINGS, RolloutDataModule
    from nft_lit.module import PolicyModule
    from nft_lit.rollout import HFGenerateEngine, SamplingParams
    from nft_lit.sampler import Sampler

    model, tokenizer, problems = build(setup)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        algo = compose(config_name=f"algorithm/{algorithm}").algorithm
    module = PolicyModule(
        model=model,
        loss=instantiate(algo.loss),
        lr=setup.lr,
        weight_decay=setup.weight_decay,
        warmup_steps=0,
        grad_clip=1.0,
    )
    total = setup.prompts * setup.answers
    if engine_name == "vllm":
        from nft_lit.models import save_hf_folder
        from nft_lit.rollout import VLLMEngine

        folder = save_hf_folder(model, tokenizer, scratch_dir("nft-lit-e2e-vllm-"))
        engine: Any = VLLMEngine(
            model_path=str(folder), dtype="policy", enforce_eager=True, max_num_seqs=total, seed=setup.seed
        )
    else:
        engine = HFGenerateEngine(batch_size=total)  # one generate call for the round, as TRL
    # Every answer's length and truncation, and the generation time, straight from the engine.
    lengths: list[int] = []
    truncated: list[bool] = []
    generate_seconds: list[float] = []
    engine_generate = engine.generate

    def recording_generate(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        batch = engine_generate(*args, **kwargs)
        generate_seconds.append(time.perf_counter() - start)
        lengths.extend(len(ids) for ids in batch.response_ids)
        truncated.extend(bool(t) for t in batch.truncated)
        return batch

    engine.generate = recording_generate
    stats: list[dict[str, float]] = []  # each iteration's rollout statistics (logged as rollout/*, seconds/*)
    rollout_seconds: list[float] = []
    micro_batches: list[int] = []

    longest_prompt = max(len(tokenizer(p.question, add_special_tokens=False).input_ids) for p in problems)
    budget = token_budget(setup, longest_prompt)
    extra: dict[str, Any] = {}
    budget_supported = "max_tokens_per_micro_batch" in inspect.signature(RolloutDataModule.__init__).parameters
    if budget is not None and budget_supported:
        extra["max_tokens_per_micro_batch"] = budget
    datamodule = RolloutDataModule(
        problems=problems,
        sampler=Sampler(engine, tokenizer, ParityVerifier()),
        sampling=SamplingParams(temperature=1.0, max_new_tokens=setup.max_new_tokens),
        prompts_per_step=setup.prompts,
        num_answers=setup.answers,
        num_mini_batches=setup.updates,
        micro_batch_size=setup.micro_batch,
        dynamic_sampling=bool(algo.dynamic_sampling),
        # One generation round, as TRL: equal generation work (groups that are not mixed are dropped).
        gen_prompts_per_round=setup.prompts,
        max_gen_rounds=1,
        seed=setup.seed,
        **extra,
    )
    # Each iteration of the stage the datamodule runs: its time, statistics and forward/backward passes.
    run_iteration = datamodule.stage.run

    def recording_run(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = run_iteration(*args, **kwargs)
        rollout_seconds.append(time.perf_counter() - start)
        stats.append(dict(result.stats))
        micro_batches.append(sum(not mb.is_padding for s in result.steps for mb in s.micro_batches))
        return result

    datamodule.stage.run = recording_run
    marks: list[float] = []

    class EpochClock(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            marks.append(time.perf_counter())

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            marks.append(time.perf_counter())

    trainer = quiet_trainer(max_epochs=setup.iterations, **ROLLOUT_TRAINER_SETTINGS, callbacks=[EpochClock()])
    torch.manual_seed(setup.seed)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    # marks[0] is taken after the first iteration's rollout (Lightning loads data before on_train_start),
    # so only intervals between consecutive iteration ends are full iterations.
    iteration_seconds = [b - a for a, b in itertools.pairwise(marks[1:])]
    phases = [phase_seconds(s) for s in warm(stats)]
    paddings = [p for p in (stat(s, "padding_fraction") for s in warm(stats)) if p is not None]
    engine_dtype = "float32 (policy)" if engine_name == "hf" else str(engine.dtype).removeprefix("torch.")
    return {
        "engine_dtype": engine_dtype,
        "iteration_seconds": iteration_seconds,
        "rollout_seconds": rollout_seconds,
        "generate_seconds": generate_seconds,
        "padding_fraction": median(paddings) if paddings else None,
        "phase_seconds": {k: median([p[k] for p in phases if k in p]) for k in phases[0]} if phases else {},
        "micro_batches_per_iteration": median(warm(micro_batches)),
        "max_tokens_per_micro_batch": extra.get("max_tokens_per_micro_batch"),
        "max_tokens_per_micro_batch_supported": budget_supported,
        "fit_seconds": fit_seconds,
        "optimizer_steps": trainer.global_step,
        "lengths": lengths,
        "truncated": truncated,
        "answers_generated": len(lengths),
        "kept_groups_mean": sum(stat(s, "kept_groups") or 0.0 for s in stats) / len(stats),
        "threads": torch.get_num_threads(),
    }


def one_line(err: BaseException) -> str:
    """The exception as one line: its type and message, whitespace collapsed."""
    return " ".join(f"{type(err).__name__}: {err}".split())


def worker(side: str, setup: Setup, out: Path) -> None:
    """Run one side and write its result; a side that fails writes its error (one line) instead."""
    import torch

    if setup.threads > 0:
        torch.set_num_threads(setup.threads)
    framework, engine = side.split("/")
    try:
        if framework == "trl":
            result = run_trl(setup, engine)
        else:
            result = run_nft_lit(setup, framework.removeprefix("nft_lit_"), engine)
    except Exception as err:  # recorded for this side; the others still run
        traceback.print_exc()
        result = {"error": one_line(err)}
    result["peak_rss_mib"] = peak_rss_mib()
    out.write_text(json.dumps(result))


def run_side(side: str, setup: Setup) -> dict[str, Any]:
    """One side in its own subprocess: its result, or ``{"error": one line}`` when it could not run."""
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(setup).items()]
    try:
        return run_worker(SCRIPT, ["--worker", side, *cli], timeout_s=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"TimeoutExpired: the {side} worker ran past {WORKER_TIMEOUT_S} s"}
    except RuntimeError as err:  # the worker process died (a crash, not an exception it could record)
        lines = [line for line in str(err).splitlines() if line.strip()]
        return {"error": f"worker died: {lines[-1].strip() if len(lines) > 1 else lines[0]}"}


def length_summary(lengths: list[int], truncated: list[bool]) -> dict[str, float]:
    """min / median / p90 / max / mean of answer lengths (tokens, EOS included) and the share cut at the cap."""
    ordered = sorted(lengths)
    return {
        "answers": len(ordered),
        "min": ordered[0],
        "median": median(ordered),
        "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
        "truncated_share": sum(truncated) / len(truncated),
    }


def run_row(result: dict[str, Any]) -> dict[str, Any]:
    """A side's figures in one run (without the per-answer lists)."""
    row = {k: v for k, v in result.items() if k not in ("lengths", "truncated")}
    if "error" in result:
        return row
    row["s_per_iteration"] = median(result["iteration_seconds"])
    row["rollout_s"] = median(warm(result["rollout_seconds"]))
    row["generate_s"] = median(warm(result["generate_seconds"]))
    # the training part of each warm iteration: the iteration ending at k+1 holds rollout k+1
    train = [t - r for t, r in zip(result["iteration_seconds"], warm(result["rollout_seconds"]), strict=False)]
    row["train_s"] = median(train)
    row["lengths"] = length_summary(result["lengths"], result["truncated"])
    return row


def aggregate(runs: list[dict[str, dict[str, Any]]], sides: list[str]) -> list[dict[str, Any]]:
    """Per side: the median across runs and the min-max spread of s/iteration and of the ratio to TRL/hf
    (taken within each run, against that run's TRL/hf), of the same-engine TRL ratio, pooled answer lengths."""
    rows = []
    for side in sides:
        framework, engine = side.split("/")
        results = [run[side] for run in runs]
        ok = [(i, r) for i, r in enumerate(results) if "error" not in r]
        row: dict[str, Any] = {
            "side": side,
            "framework": "trl" if framework == "trl" else "nft-lit",
            "algorithm": "grpo" if framework == "trl" else framework.removeprefix("nft_lit_"),
            "engine": engine,
            "runs_ok": len(ok),
        }
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            row["error"] = errors[0]
        if not ok:
            rows.append(row)
            continue
        rows.append(row)
        row_runs = [run_row(r) for _, r in ok]
        speeds = [r["s_per_iteration"] for r in row_runs]
        row["s_per_iteration_runs"] = speeds
        row["s_per_iteration"] = median(speeds)
        row["s_per_iteration_min"], row["s_per_iteration_max"] = min(speeds), max(speeds)
        for key, against in (("ratio_vs_trl", BASELINE), ("ratio_vs_trl_same_engine", f"trl/{engine}")):
            ratios = [
                r["s_per_iteration"] / median(runs[i][against]["iteration_seconds"])
                for (i, _), r in zip(ok, row_runs, strict=True)
                if against in runs[i] and "error" not in runs[i][against]
            ]
            row[f"{key}_runs"] = ratios
            row[key] = median(ratios) if ratios else None
            row[f"{key}_min"] = min(ratios) if ratios else None
            row[f"{key}_max"] = max(ratios) if ratios else None
        for key in ("rollout_s", "generate_s", "train_s", "fit_seconds", "peak_rss_mib", "micro_batches_per_iteration"):
            row[key] = median([r[key] for r in row_runs])
        paddings = [r["padding_fraction"] for r in row_runs if r.get("padding_fraction") is not None]
        row["padding_fraction"] = median(paddings) if paddings else None
        if framework != "trl":
            row["kept_groups_mean"] = median([r["kept_groups_mean"] for r in row_runs])
            names = sorted({k for r in row_runs for k in r["phase_seconds"]})
            row["phase_seconds"] = {
                k: median([r["phase_seconds"][k] for r in row_runs if k in r["phase_seconds"]]) for k in names
            }
            row["max_tokens_per_micro_batch"] = row_runs[0]["max_tokens_per_micro_batch"]
        row["engine_dtype"] = row_runs[0]["engine_dtype"]
        row["optimizer_steps"] = row_runs[0]["optimizer_steps"]
        row["iterations_timed"] = len(results[ok[0][0]]["iteration_seconds"])
        row["threads"] = row_runs[0]["threads"]
        row["lengths"] = length_summary(
            [n for _, r in ok for n in r["lengths"]], [t for _, r in ok for t in r["truncated"]]
        )
        row["runs"] = row_runs
    return rows


def spread(row: dict[str, Any], key: str, spec: str) -> str | None:
    if row.get(key) is None:
        return None
    low, high = row[f"{key}_min"], row[f"{key}_max"]
    return f"{format(low, spec)}-{format(high, spec)}"


def report(name: str, setup: Setup, rows: list[dict[str, Any]], runs: int) -> dict[str, bool]:
    """Print one workload's tables; return the goal verdict of each nft-lit side that ran."""
    budget = "off" if setup.max_tokens_per_micro_batch == OFF else setup.max_tokens_per_micro_batch
    print(
        f"\n== workload {name}: {setup.prompts} prompts x K={setup.answers}, <= {setup.max_new_tokens} new tokens, "
        f"vocab {max(setup.symbols, 14) + 2}, {setup.updates} optimizer steps/iteration, micro-batch "
        f"{setup.micro_batch} (nft-lit token budget: {'auto' if budget == AUTO else budget}), Llama "
        f"d={setup.hidden} L={setup.layers}; per run the median of {setup.iterations - 1} warm iterations, "
        f"then median [min-max] over {runs} run(s)"
    )
    for row in rows:
        row["s_spread"] = spread(row, "s_per_iteration", ".2f")
        row["ratio_spread"] = spread(row, "ratio_vs_trl", ".2f")
    ran = [r for r in rows if r.get("runs_ok")]
    print_table(
        ran,
        [
            ("side", "side", ""),
            ("s_per_iteration", "s/iter", ".3f"),
            ("s_spread", "s/iter range", ""),
            ("ratio_vs_trl", "x TRL/hf", ".2f"),
            ("ratio_spread", "x range", ""),
            ("ratio_vs_trl_same_engine", "x TRL same eng", ".2f"),
            ("rollout_s", "rollout s", ".2f"),
            ("generate_s", "generate s", ".2f"),
            ("train_s", "train s", ".2f"),
            ("padding_fraction", "padding", ".2f"),
            ("micro_batches_per_iteration", "micro-b/it", ".0f"),
            ("kept_groups_mean", "kept grp", ".1f"),
            ("peak_rss_mib", "RSS MiB", ".0f"),
        ],
    )
    print("answer lengths (tokens, EOS included; every answer of every run):")
    print_table(
        [
            {
                "side": r["side"],
                "engine_dtype": r["engine_dtype"],
                **r["lengths"],
                "truncated_pct": 100 * r["lengths"]["truncated_share"],
            }
            for r in ran
        ],
        [
            ("side", "side", ""),
            ("engine_dtype", "engine dtype", ""),
            ("answers", "answers", ".0f"),
            ("min", "min", ".0f"),
            ("median", "median", ".1f"),
            ("p90", "p90", ".0f"),
            ("max", "max", ".0f"),
            ("mean", "mean", ".1f"),
            ("truncated_pct", "truncated %", ".1f"),
        ],
    )
    nft_rows = [r for r in ran if r["framework"] == "nft-lit"]
    names = sorted({k for r in nft_rows for k in r.get("phase_seconds", {})})
    if names:
        print("nft-lit datamodule phases (s, median of warm iterations, then of runs):")
        print_table(
            [{"side": r["side"], **r["phase_seconds"]} for r in nft_rows],
            [("side", "side", "")] + [(k, k, ".3f") for k in names],
        )
    for row in rows:
        if "error" in row:
            print(f"{row['side']}: ERROR ({row['runs_ok']}/{runs} runs ran): {row['error']}")
    verdicts = {}
    for row in ran:
        if row["side"] == BASELINE or row.get("ratio_vs_trl") is None:
            continue
        line = f"{row['side']}: {row['ratio_vs_trl']:.2f}x TRL/hf (runs {row['ratio_spread']})"
        if row["framework"] == "nft-lit":
            verdicts[row["side"]] = ok = row["ratio_vs_trl"] <= GOAL_RATIO
            line += f" (goal <= {GOAL_RATIO}): {'OK' if ok else 'BEHIND'}"
        print(line)
    return verdicts


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shape, 1 run, default workload; HF sides and, when vllm is installed, the vLLM sides (< 2 min)",
    )
    helps = {
        "symbols": "char-tokenizer alphabet size (0: the 14 arithmetic symbols); longtail: 144",
        "max_tokens_per_micro_batch": "nft-lit's token budget per micro-batch, padding counted (datamodule."
        "max_tokens_per_micro_batch); -1: micro_batch x (longest prompt + max_new_tokens) / 4; 0: off",
        "iterations": "iterations per side and run; the first pays for start-up (default 4)",
        "threads": "torch intra-op threads in every side (0: torch's default)",
    }
    for name, value in asdict(Setup()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None, help=helps.get(name))
    parser.add_argument(
        "--workload", default=None, help=f"comma-separated subset of {WORKLOADS} (default: both; --quick: default)"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="repeats of the whole comparison (default 3; --quick: 1)"
    )
    parser.add_argument("--sides", default=None, help=f"comma-separated subset of {SIDES}; must include {BASELINE}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/e2e_vs_trl.json"))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    given = {k: v for k, v in vars(args).items() if k in asdict(Setup()) and v is not None}
    if args.worker:
        setup = Setup(**given)  # the parent passes every field
        setup.check()
        worker(args.worker, setup, args.worker_out)
        return

    workloads = (args.workload or ("default" if args.quick else ",".join(WORKLOADS))).split(",")
    if set(workloads) - set(WORKLOADS) or not workloads:
        raise SystemExit(f"--workload must list some of {WORKLOADS}, got {args.workload!r}")
    setups = {}
    for name in workloads:
        preset = {**QUICK, **QUICK_PRESETS[name]} if args.quick else PRESETS[name]
        setups[name] = replace(Setup(**preset), **given)
        setups[name].check()
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        raise SystemExit(f"--runs must be >= 1, got {runs}")
    has_vllm = vllm_importable()
    # --quick leaves out trl/vllm (the slowest start): the harness check stays under 2 minutes
    default_sides = [s for s in SIDES if (has_vllm or not s.endswith("/vllm")) and not (args.quick and s == "trl/vllm")]
    sides = args.sides.split(",") if args.sides else default_sides
    unknown = set(sides) - set(SIDES)
    if unknown or BASELINE not in sides:
        raise SystemExit(f"--sides must list {BASELINE!r} and any of {SIDES}, got {args.sides!r}")
    sides = [s for s in SIDES if s in sides]  # the baseline first
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated vLLM (both vLLM sides)
    # vLLM on CPU reserves its KV cache up front (4 GiB by default); 1 GiB holds every workload here many times
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    load_before = os.getloadavg()
    started = time.time()
    results: dict[str, list[dict[str, dict[str, Any]]]] = {name: [] for name in workloads}
    for run in range(runs):
        for name in workloads:
            one: dict[str, dict[str, Any]] = {}
            for side in sides:
                print(f"run {run + 1}/{runs}, workload {name}: {side} ...", file=sys.stderr, flush=True, end="")
                side_start = time.perf_counter()
                one[side] = run_side(side, setups[name])
                print(f" {time.perf_counter() - side_start:.0f} s", file=sys.stderr, flush=True)
                if "error" in one[side]:
                    print(f"  {side} failed: {one[side]['error']}", file=sys.stderr, flush=True)
            results[name].append(one)
    load_after = os.getloadavg()

    payload: dict[str, Any] = {}
    goal_met: dict[str, dict[str, bool]] = {}
    for name in workloads:
        rows = aggregate(results[name], sides)
        goal_met[name] = report(name, setups[name], rows, runs)
        payload[name] = {"setup": asdict(setups[name]), "rows": rows, "goal_met": goal_met[name]}
    minutes = (time.time() - started) / 60
    print(
        f"\n{runs} run(s) in {minutes:.1f} min; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}"
    )
    write_json(
        args.out,
        {
            "meta": meta(
                runs=runs,
                sides=sides,
                workloads=workloads,
                goal_ratio=GOAL_RATIO,
                quick=args.quick,
                vllm_installed=has_vllm,
                minutes=minutes,
                load_before=load_before,
                load_after=load_after,
            ),
            "workloads": payload,
            "goal_met": goal_met,
        },
    )


if __name__ == "__main__":
    main()
