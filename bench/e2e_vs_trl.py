"""One RL iteration end to end (generate, verify, train) in nft-lit (GRPO, NFT) vs TRL's GRPOTrainer.

    .venv/bin/python bench/e2e_vs_trl.py            # 4-layer d=256 Llama, 16 prompts x K=8, 64 new tokens
    .venv/bin/python bench/e2e_vs_trl.py --quick    # tiny shape, for the harness test

Equal work on both sides: the same random-init model (same seed), the same synthetic prompts, K answers per
prompt, ``max_new_tokens``, sampling (temperature 1, no truncation), reward, AdamW (lr, betas, weight decay,
grad clip 1.0, constant LR) and ``--updates`` optimizer steps per iteration from one generation, with the
old log-probs recomputed before training (TRL does so when an iteration has several optimizer steps).
TRL runs with ``loss_type="dapo"`` (token-mean, clip 0.2/0.28, std-scaled advantages, no KL), the same
objective as configs/algorithm/grpo.yaml. The reward is a parity of the decoded answer: a deterministic
binary verifier that gives mixed groups under a random-init model, so NFT's dynamic sampling keeps nearly
every group in one generation round (kept groups are reported).

Each side runs in its own subprocess (separate peak RSS) for ``--iterations`` iterations; the first
iteration pays for start-up, so s/iteration is the median of the later ones, timed between consecutive
iteration ends. Goal from the issue: nft-lit <= 0.8x TRL's time per iteration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import median, meta, peak_rss_mib, print_table, quiet_trainer, run_worker, write_json

SCRIPT = Path(__file__).resolve()
CONFIG_DIR = SCRIPT.parents[1] / "configs"
SIDES = ("trl", "nft_lit_grpo", "nft_lit_nft")
GOAL_RATIO = 0.8


@dataclass
class Setup:
    """The shared workload of every side."""

    prompts: int = 16
    answers: int = 8
    max_new_tokens: int = 64
    updates: int = 2
    micro_batch: int = 16
    iterations: int = 3
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 1024
    lr: float = 1e-5
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 0  # torch intra-op threads in every side; 0 keeps torch's default

    def check(self) -> None:
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


def build(setup: Setup) -> tuple[Any, Any, list[Any]]:
    """Model, char tokenizer and the synthetic prompts; identical in every subprocess (fixed seeds)."""
    from nft_lit.models import build_char_tokenizer, tiny_causal_lm
    from nft_lit.synthetic import ALPHABET, ArithmeticTask, sample_problems

    tokenizer = build_char_tokenizer(ALPHABET)
    model = tiny_causal_lm(
        arch="llama",
        vocab_size=len(tokenizer),
        hidden_size=setup.hidden,
        num_layers=setup.layers,
        num_heads=setup.heads,
        intermediate_size=setup.intermediate,
        max_position_embeddings=256,
        seed=setup.seed,
    )
    # Exactly `prompts` problems: every iteration of every side generates for the same prompts.
    problems = sample_problems(ArithmeticTask(digits=3), "train", setup.prompts, setup.seed)
    return model, tokenizer, problems


def run_trl(setup: Setup) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer, problems = build(setup)
    tmp = tempfile.mkdtemp(prefix="nft-lit-e2e-trl-")  # TRL wants an output_dir; nothing is saved there
    total = setup.prompts * setup.answers
    accumulation = total // setup.updates // setup.micro_batch
    marks: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks.append(time.perf_counter())

    lengths: list[int] = []

    def reward(completions: list[str], completion_ids: list[list[int]], **kw: Any) -> list[float]:
        lengths.extend(len(c) for c in completion_ids)
        return [parity_reward(c) for c in completions]

    config = GRPOConfig(
        output_dir=tmp,
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
    start = time.perf_counter()
    trainer.train()
    fit_seconds = time.perf_counter() - start
    # marks[0] is on_train_begin; every `updates` steps end an iteration. The first one pays for start-up.
    ends = marks[setup.updates :: setup.updates]
    iteration_seconds = [b - a for a, b in itertools.pairwise(ends)]
    return {
        "iteration_seconds": iteration_seconds,
        "fit_seconds": fit_seconds,
        "optimizer_steps": trainer.state.global_step,
        "response_tokens_mean": sum(lengths) / max(len(lengths), 1),
        "answers_generated": len(lengths),
        "threads": torch.get_num_threads(),
    }


def run_nft_lit(setup: Setup, algorithm: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from nft_lit.datamodule import ROLLOUT_TRAINER_SETTINGS, RolloutDataModule
    from nft_lit.module import PolicyModule
    from nft_lit.rollout import HFGenerateEngine, SamplingParams
    from nft_lit.sampler import Sampler
    from nft_lit.steps import StepBatch

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
    stats: list[dict[str, float]] = []  # each iteration's rollout statistics (logged as rollout/*)

    class RecordingDataModule(RolloutDataModule):
        def rollout(self, *args: Any, **kwargs: Any) -> list[StepBatch]:
            steps = super().rollout(*args, **kwargs)
            stats.append(dict(steps[0].rollout_stats))
            return steps

    datamodule = RecordingDataModule(
        problems=problems,
        sampler=Sampler(HFGenerateEngine(batch_size=setup.prompts * setup.answers), tokenizer, ParityVerifier()),
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
    )
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
    return {
        "iteration_seconds": iteration_seconds,
        "fit_seconds": fit_seconds,
        "optimizer_steps": trainer.global_step,
        "response_tokens_mean": median([s["response_length_mean"] for s in stats]),
        "kept_groups_mean": sum(s["kept_groups"] for s in stats) / len(stats),
        "gen_seconds": median([s["gen_seconds"] for s in stats[1:]]),
        "threads": torch.get_num_threads(),
    }


def worker(side: str, setup: Setup, out: Path) -> None:
    import torch

    if setup.threads > 0:
        torch.set_num_threads(setup.threads)
    result = run_trl(setup) if side == "trl" else run_nft_lit(setup, side.removeprefix("nft_lit_"))
    result["peak_rss_mib"] = peak_rss_mib()
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape (harness check, < 2 min)")
    for name, value in asdict(Setup()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {SIDES}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/e2e_vs_trl.json"))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    base = (
        Setup(
            prompts=4,
            answers=4,
            max_new_tokens=8,
            micro_batch=4,
            iterations=2,
            hidden=64,
            layers=2,
            heads=2,
            intermediate=128,
        )
        if args.quick
        else Setup()
    )
    given = {k: v for k, v in vars(args).items() if k in asdict(base) and v is not None}
    setup = Setup(**{**asdict(base), **given})
    setup.check()
    if args.worker:
        worker(args.worker, setup, args.worker_out)
        return

    sides = [s for s in args.sides.split(",") if s]
    unknown = set(sides) - set(SIDES)
    if unknown or "trl" not in sides:
        raise SystemExit(f"--sides must list 'trl' and any of {SIDES}, got {args.sides!r}")
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(setup).items()]
    rows = []
    for side in sides:
        print(f"running {side} ...", file=sys.stderr, flush=True)
        result = run_worker(SCRIPT, ["--worker", side, *cli], timeout_s=900)
        rows.append({"side": side, "s_per_iteration": median(result["iteration_seconds"]), **result})
    trl = rows[0]["s_per_iteration"] if rows[0]["side"] == "trl" else None
    for row in rows:
        row["ratio_vs_trl"] = row["s_per_iteration"] / trl if trl else None

    print(
        f"one iteration: {setup.prompts} prompts x K={setup.answers}, {setup.max_new_tokens} new tokens, "
        f"{setup.updates} optimizer steps, Llama d={setup.hidden} L={setup.layers}; "
        f"median of {setup.iterations - 1} warm iterations"
    )
    print_table(
        rows,
        [
            ("side", "side", ""),
            ("s_per_iteration", "s/iter", ".3f"),
            ("ratio_vs_trl", "x TRL", ".2f"),
            ("fit_seconds", "fit s", ".2f"),
            ("response_tokens_mean", "resp tok", ".1f"),
            ("kept_groups_mean", "kept grp", ".1f"),
            ("peak_rss_mib", "RSS MiB", ".0f"),
        ],
    )
    verdicts = {}
    for row in rows[1:]:
        ok = row["ratio_vs_trl"] <= GOAL_RATIO
        verdicts[row["side"]] = ok
        print(f"{row['side']}: {row['ratio_vs_trl']:.2f}x TRL (goal <= {GOAL_RATIO}): {'OK' if ok else 'BEHIND'}")
    write_json(args.out, {"meta": meta(setup=asdict(setup)), "rows": rows, "goal_met": verdicts})


if __name__ == "__main__":
    main()
