"""RolloutDataModule: one training epoch = one rollout iteration (ALGORITHMS.md, "Data collection").

Each epoch's data is built inside ``train_dataloader()`` (the trainer reloads it every epoch): sample
prompts, generate K answers with the rollout engine, verify, compute group statistics over whole groups,
keep mixed groups with extra generation rounds (dynamic sampling), recompute the old log-probs with the
training model, and split the kept batch into ``num_mini_batches`` optimizer steps. One dataloader item is one
optimizer step (a ``StepBatch`` holding its micro-batches), so the module can normalise the loss by the
counts of the whole step (exact aggregation over micro-batches and ranks).

Determinism (exact resume): prompts come from a per-pass permutation seeded by ``seed`` and read at a
cursor kept in ``state_dict()``; the generation seed of round ``r`` of iteration ``i`` on rank ``k`` is
derived from (seed, i, r, k). A resumed run therefore re-uses and skips no prompt.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

# Runtime imports (not TYPE_CHECKING): LightningCLI/jsonargparse read the constructor's type hints.
from nft_lit.data import Problem, ProblemSet
from nft_lit.losses import LossBatch, group_stats
from nft_lit.prompts import PromptTemplate, encode_prompt
from nft_lit.reward import Verifier, overlong_penalty
from nft_lit.rollout import RolloutBatch, RolloutEngine, SamplingParams, check_logprob_gap, logprob_gap, pad_left

log = logging.getLogger(__name__)


# Trainer settings this loop depends on: a new train loader, i.e. a new rollout iteration, every epoch;
# rank-local rollouts (a distributed sampler would split them again); no sanity validation before the first
# rollout. configs/trainer/*.yaml and the LightningCLI entry set them; setup() checks the first.
ROLLOUT_TRAINER_SETTINGS: dict[str, Any] = {
    "reload_dataloaders_every_n_epochs": 1,
    "use_distributed_sampler": False,
    "num_sanity_val_steps": 0,
}


@dataclass
class MicroBatch:
    """Sequences of one forward/backward pass: left-padded prompt then right-padded response.

    The response occupies columns ``prompt_len:``; ``loss_batch`` carries the response-token tensors and
    the normalisers of the whole optimizer step. ``is_padding`` marks a zero-weight micro-batch that only
    exists so that every rank runs the same number of forwards (FSDP collectives).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    loss_batch: LossBatch
    engine_logprobs: torch.Tensor
    is_padding: bool = False

    def to(self, device: torch.device | str) -> MicroBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            engine_logprobs=self.engine_logprobs.to(device),
            loss_batch=self.loss_batch.to(device),
        )


@dataclass
class StepBatch:
    """One optimizer step (a mini-batch of ALGORITHMS.md) on this rank."""

    micro_batches: list[MicroBatch]

    def to(self, device: torch.device | str) -> StepBatch:
        return StepBatch([mb.to(device) for mb in self.micro_batches])


@dataclass
class Group:
    """The K answers of one prompt, with everything needed to train on them."""

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[list[int]]
    engine_logprobs: list[list[float]]
    correct: list[float]
    rewards: list[float]
    truncated: list[bool]

    @property
    def pass_rate(self) -> float:
        return sum(self.correct) / len(self.correct)


def _derive_seed(*parts: int) -> int:
    # A fixed mixing so that (seed, iteration, round, rank) map to well-separated 31-bit seeds.
    h = 0x9E3779B1
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x7F4A7C15) % (2**31 - 1)
    return h


def shard_batches(problems: Sequence[Problem], batch_prompts: int) -> list[tuple[list[Problem], int]]:
    """This rank's share of ``problems`` in chunks, as (chunk, number of real problems at its front).

    Every rank gets the same number of chunks of the same sizes (engines that generate with a sharded model
    need identical ``generate`` calls everywhere): shorter shards are padded with ``problems[0]``, which
    callers generate for but do not score.
    """
    rank, world = _world()
    shard = list(problems)[rank::world]
    per_rank = math.ceil(len(problems) / world)
    padded = shard + [problems[0]] * (per_rank - len(shard))
    out = []
    for start in range(0, per_rank, batch_prompts):
        chunk = padded[start : start + batch_prompts]
        out.append((chunk, max(0, min(len(shard) - start, len(chunk)))))
    return out


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` without a process group)."""
    _, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _pad_right(rows: Sequence[Sequence[float]], pad: float, dtype: torch.dtype) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


class RolloutDataModule(pl.LightningDataModule):
    """Generates, verifies, filters and batches one rollout iteration per epoch.

    Args:
        problems: training problems (``Problem`` records).
        engine: the rollout engine, or a zero-argument factory called once at ``setup`` (engines that
            hold a model copy or a vLLM instance are built lazily, after the trainer has a device).
        tokenizer: HF-style tokenizer (``encode``, ``decode``, ``eos_token_id``, ``pad_token_id``).
        prompt_template: ``PromptTemplate`` turning a question into prompt ids; None encodes the bare question.
        verifier: ``Verifier`` scoring decoded answers against the gold answers.
        sampling: sampling parameters of training rollouts (its ``seed`` is replaced per round).
        prompts_per_step: kept groups per iteration (the paper's 512).
        num_answers: K answers per prompt.
        num_mini_batches: optimizer steps per iteration.
        micro_batch_size: sequences per forward/backward pass.
        dynamic_sampling: keep only groups with 0 < pass rate < 1, generating extra rounds.
        gen_prompts_per_round: prompts generated per round when dynamic sampling (default 3x
            ``prompts_per_step``).
        max_gen_rounds: rounds after which an iteration trains on what it has kept.
        strict: raise instead of training on fewer than ``prompts_per_step`` groups.
        overlong_buffer / overlong_penalty_factor: DAPO overlong reward shaping (off when buffer is None).
        max_prompt_tokens: prompts longer than this are refused at setup.
        whole_groups: keep each group in one micro-batch (required by group-level losses like InfoNCA).
        max_logprob_gap: fail when the mean |engine - trainer| log-prob gap exceeds this (a broken weight
            sync); None only logs it.
        val_problems / val_name / val_num_samples / val_sampling / val_batch_prompts: the set scored by
            Lightning's validation loop (``trainer.validate``, ``nft-lit cli validate``) as ``val/<name>/avg@k``;
            ``val_sampling`` None is greedy decoding at the training ``max_new_tokens``.
        seed: root of every random choice of the data pipeline.
    """

    def __init__(
        self,
        problems: ProblemSet | Sequence[Problem],
        engine: RolloutEngine | Callable[[], RolloutEngine],
        tokenizer: Any,
        prompt_template: PromptTemplate | None,
        verifier: Verifier,
        sampling: SamplingParams,
        prompts_per_step: int,
        num_answers: int,
        num_mini_batches: int = 1,
        micro_batch_size: int = 8,
        dynamic_sampling: bool = True,
        gen_prompts_per_round: int | None = None,
        max_gen_rounds: int = 10,
        strict: bool = False,
        overlong_buffer: int | None = None,
        overlong_penalty_factor: float = 1.0,
        max_prompt_tokens: int | None = None,
        whole_groups: bool = False,
        max_logprob_gap: float | None = None,
        seed: int = 0,
        val_problems: ProblemSet | Sequence[Problem] | None = None,
        val_name: str = "heldout",
        val_num_samples: int = 1,
        val_sampling: SamplingParams | None = None,
        val_batch_prompts: int = 64,
    ) -> None:
        super().__init__()
        if len(problems) == 0:
            raise ValueError("data: the training problem set is empty")
        if num_answers < 2:
            raise ValueError(f"algorithm.num_answers (K) must be >= 2 for group statistics, got {num_answers}")
        if prompts_per_step < 1:
            raise ValueError(f"data.prompts_per_step must be >= 1, got {prompts_per_step}")
        if num_mini_batches < 1 or num_mini_batches > prompts_per_step * num_answers:
            raise ValueError(
                f"data.num_mini_batches must be in [1, prompts_per_step*K={prompts_per_step * num_answers}],"
                f" got {num_mini_batches}"
            )
        if whole_groups and num_mini_batches > prompts_per_step:
            raise ValueError(
                f"data.num_mini_batches={num_mini_batches} exceeds prompts_per_step={prompts_per_step}:"
                " this loss needs whole groups in each optimizer step"
            )
        if micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size must be >= 1, got {micro_batch_size}")
        if max_gen_rounds < 1:
            raise ValueError(f"data.max_gen_rounds must be >= 1, got {max_gen_rounds}")
        if overlong_buffer is not None and overlong_buffer <= 0:
            raise ValueError(f"algorithm.overlong_buffer must be > 0 or null, got {overlong_buffer}")
        self.problems = list(problems)
        self._engine_or_factory = engine
        self.engine: RolloutEngine | None = None
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.verifier = verifier
        self.sampling = sampling
        self.prompts_per_step = prompts_per_step
        self.num_answers = num_answers
        self.num_mini_batches = num_mini_batches
        self.micro_batch_size = micro_batch_size
        self.dynamic_sampling = dynamic_sampling
        self.gen_prompts_per_round = gen_prompts_per_round or 3 * prompts_per_step
        self.max_gen_rounds = max_gen_rounds if dynamic_sampling else 1
        self.strict = strict
        self.overlong_buffer = overlong_buffer
        self.overlong_penalty_factor = overlong_penalty_factor
        self.max_prompt_tokens = max_prompt_tokens
        self.whole_groups = whole_groups
        self.max_logprob_gap = max_logprob_gap
        self.seed = seed
        if val_num_samples < 1:
            raise ValueError(f"data.val_num_samples must be >= 1, got {val_num_samples}")
        self.val_problems = list(val_problems) if val_problems is not None else None
        self.val_name = val_name
        self.val_num_samples = val_num_samples
        self.val_sampling = val_sampling or replace(sampling, temperature=0.0, top_p=1.0, top_k=0)
        self.val_batch_prompts = val_batch_prompts
        # Resume state: prompts consumed so far (index into the concatenated per-pass permutations).
        self.cursor = 0
        self.iteration = 0
        self.last_stats: dict[str, float] = {}
        self._finished_iteration: int | None = None
        self._prompt_cache: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ set-up and state
    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self._has_trainer() and self.trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                f"trainer.reload_dataloaders_every_n_epochs={self.trainer.reload_dataloaders_every_n_epochs}:"
                " it must be 1, since every epoch is a new rollout iteration (generated in train_dataloader)"
            )
        _, world = _world()
        per_round = self.gen_prompts_per_round if self.dynamic_sampling else self.prompts_per_step
        option = "data.gen_prompts_per_round" if self.dynamic_sampling else "data.prompts_per_step"
        if per_round % world:
            # Engines that generate with a sharded model need the same number of prompts on every rank.
            raise ValueError(f"{option}={per_round} must be a multiple of the number of ranks ({world})")
        if self.engine is None:
            e = self._engine_or_factory
            self.engine = e if hasattr(e, "generate") else e()  # type: ignore[operator]

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "iteration": self.iteration}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cursor = int(state_dict["cursor"])
        self.iteration = int(state_dict["iteration"])
        # Checkpoints are written at the end of an iteration; on resume Lightning first sets up that
        # finished epoch again before moving on. It must not consume prompts (see train_dataloader).
        self._finished_iteration = self.iteration

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, StepBatch) else batch

    # ------------------------------------------------------------------ prompts
    def _problem_at(self, position: int) -> int:
        n = len(self.problems)
        epoch, offset = divmod(position, n)
        g = torch.Generator().manual_seed(_derive_seed(self.seed, 0xDA7A, epoch))
        return int(torch.randperm(n, generator=g)[offset])

    def prompt_ids(self, problem_index: int) -> list[int]:
        if problem_index not in self._prompt_cache:
            ids = encode_prompt(self.problems[problem_index].question, self.prompt_template, self.tokenizer)
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                raise ValueError(
                    f"problem {self.problems[problem_index].id!r}: prompt has {len(ids)} tokens,"
                    f" more than data.max_prompt_tokens={self.max_prompt_tokens}"
                )
            self._prompt_cache[problem_index] = ids
        return self._prompt_cache[problem_index]

    def _phase(self, name: str) -> None:
        # Shown by PhaseProgressBar (module.py) when the trainer has one.
        bar = getattr(self.trainer, "progress_bar_callback", None) if self._has_trainer() else None
        if hasattr(bar, "set_phase"):
            bar.set_phase(name)

    def _has_trainer(self) -> bool:
        return getattr(self, "trainer", None) is not None

    # ------------------------------------------------------------------ one iteration
    def _generate_round(self, indices: list[int], round_index: int) -> tuple[list[Group], dict[str, float]]:
        """Generate and verify this rank's share of one round; returns every rank's groups, in order."""
        assert self.engine is not None
        rank, world = _world()
        mine = indices[rank::world]
        stats: dict[str, float] = {}
        self._phase("generate")
        t0 = time.perf_counter()
        sampling = replace(self.sampling, seed=_derive_seed(self.seed, self.iteration, round_index, rank))
        prompts = [self.prompt_ids(i) for i in mine]
        rollout: RolloutBatch = self.engine.generate(prompts, self.num_answers, sampling)
        stats["gen_seconds"] = time.perf_counter() - t0
        stats["gen_tokens"] = float(sum(len(r) for r in rollout.response_ids))
        self._phase("verify")
        t0 = time.perf_counter()
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rollout.response_ids]
        golds = [self.problems[i].answer for i in mine for _ in range(self.num_answers)]
        result = self.verifier.score(texts, golds, list(rollout.truncated))
        stats["verify_seconds"] = time.perf_counter() - t0
        correct = [float(r) for r in result.rewards]
        rewards = list(correct)
        if self.overlong_buffer is not None:
            lengths = [len(r) for r in rollout.response_ids]
            penalties = overlong_penalty(
                lengths, self.sampling.max_new_tokens, self.overlong_buffer, self.overlong_penalty_factor
            )
            rewards = [r + float(p) for r, p in zip(rewards, penalties, strict=True)]
        k = self.num_answers
        groups = [
            Group(
                prompt_index=i,
                prompt_ids=prompts[j],
                response_ids=[list(x) for x in rollout.response_ids[j * k : (j + 1) * k]],
                engine_logprobs=[list(x) for x in rollout.logprobs[j * k : (j + 1) * k]],
                correct=correct[j * k : (j + 1) * k],
                rewards=rewards[j * k : (j + 1) * k],
                truncated=[bool(t) for t in rollout.truncated[j * k : (j + 1) * k]],
            )
            for j, i in enumerate(mine)
        ]
        gathered = all_gather_objects((groups, stats))
        all_groups = sorted((g for gs, _ in gathered for g in gs), key=lambda g: indices.index(g.prompt_index))
        # Wall-clock is the slowest rank; token counts add up.
        merged = {
            "gen_seconds": max(s["gen_seconds"] for _, s in gathered),
            "verify_seconds": max(s["verify_seconds"] for _, s in gathered),
            "gen_tokens": sum(s["gen_tokens"] for _, s in gathered),
        }
        return all_groups, merged

    def collect(self) -> tuple[list[Group], dict[str, float]]:
        """Run generation rounds until ``prompts_per_step`` groups are kept (or rounds run out)."""
        kept: list[Group] = []
        seen: list[Group] = []
        totals = {"gen_seconds": 0.0, "verify_seconds": 0.0, "gen_tokens": 0.0}
        per_round = self.gen_prompts_per_round if self.dynamic_sampling else self.prompts_per_step
        rounds = 0
        while len(kept) < self.prompts_per_step and rounds < self.max_gen_rounds:
            indices = [self._problem_at(self.cursor + j) for j in range(per_round)]
            self.cursor += per_round
            groups, stats = self._generate_round(indices, rounds)
            rounds += 1
            for key in totals:
                totals[key] += stats[key]
            seen.extend(groups)
            kept.extend(g for g in groups if not self.dynamic_sampling or 0.0 < g.pass_rate < 1.0)
        if len(kept) < self.prompts_per_step and self.strict:
            raise RuntimeError(
                f"iteration {self.iteration}: dynamic sampling kept {len(kept)} of"
                f" data.prompts_per_step={self.prompts_per_step} groups after data.max_gen_rounds="
                f"{self.max_gen_rounds} rounds (data.strict=true)"
            )
        kept = kept[: self.prompts_per_step]
        lengths = [len(r) for g in seen for r in g.response_ids]
        correct = [c for g in seen for c in g.correct]
        stats = {
            "reward_mean": sum(r for g in seen for r in g.rewards) / len(lengths),
            "pass_rate": sum(correct) / len(correct),
            "kept_group_fraction": sum(1 for g in seen if 0.0 < g.pass_rate < 1.0) / len(seen),
            "kept_groups": float(len(kept)),
            "all_correct_fraction": sum(1 for g in seen if g.pass_rate == 1.0) / len(seen),
            "gen_rounds": float(rounds),
            "response_length_mean": sum(lengths) / len(lengths),
            "response_length_max": float(max(lengths)),
            "truncation_rate": sum(t for g in seen for t in g.truncated) / len(lengths),
            "gen_seconds": totals["gen_seconds"],
            "gen_tokens_per_second": totals["gen_tokens"] / max(totals["gen_seconds"], 1e-9),
            "verify_seconds": totals["verify_seconds"],
            "verify_answers_per_second": len(lengths) / max(totals["verify_seconds"], 1e-9),
        }
        if kept:
            stats["kept_reward_mean"] = sum(r for g in kept for r in g.rewards) / (len(kept) * self.num_answers)
        return kept, stats

    # ------------------------------------------------------------------ batching
    def _units(self, groups: list[Group]) -> list[list[tuple[int, int]]]:
        """Indivisible units of (group, answer) pairs: whole groups, or single answers."""
        if self.whole_groups:
            return [[(g, j) for j in range(self.num_answers)] for g in range(len(groups))]
        return [[(g, j)] for g in range(len(groups)) for j in range(self.num_answers)]

    def plan(self, groups: list[Group]) -> list[list[list[list[tuple[int, int]]]]]:
        """plan[step][rank] = this rank's micro-batches (lists of (group, answer)) for that optimizer step.

        The same on every rank (it only depends on the gathered groups), and every rank gets the same number
        of micro-batches per step: missing ones are empty and become zero-weight padding.
        """
        _, world = _world()
        units = self._units(groups)
        steps = min(self.num_mini_batches, len(units))
        bounds = [round(s * len(units) / steps) for s in range(steps + 1)]
        plan = []
        for s in range(steps):
            step_units = units[bounds[s] : bounds[s + 1]]
            per_rank = []
            for r in range(world):
                mbs: list[list[tuple[int, int]]] = []
                for unit in step_units[r::world]:
                    if mbs and len(mbs[-1]) + len(unit) <= self.micro_batch_size:
                        mbs[-1].extend(unit)
                    else:
                        mbs.append(list(unit))
                per_rank.append(mbs)
            most = max(len(m) for m in per_rank)
            plan.append([m + [[] for _ in range(most - len(m))] for m in per_rank])
        return plan

    def _micro_batch(
        self, groups: list[Group], members: list[tuple[int, int]], stats: tuple[torch.Tensor, torch.Tensor], step
    ) -> MicroBatch:
        group_mean, group_std = stats
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        is_padding = not members
        if is_padding:
            # A one-token dummy keeps the forward (and FSDP's collectives) identical on every rank.
            members = [(0, 0)]
        prompts = [groups[g].prompt_ids for g, _ in members]
        responses = [groups[g].response_ids[j] for g, j in members]
        p_ids, p_mask = pad_left(prompts, pad)
        r_ids = _pad_right(responses, pad, torch.long)
        r_mask = _pad_right([[1] * len(r) for r in responses], 0, torch.long)
        if is_padding:
            r_mask.zero_()
        flat = [g * self.num_answers + j for g, j in members]
        rewards = torch.tensor([groups[g].rewards[j] for g, j in members], dtype=torch.float32)
        loss_batch = LossBatch(
            old_logprobs=torch.zeros(r_ids.shape, dtype=torch.float32),
            response_mask=r_mask.to(torch.float32),
            rewards=rewards,
            group_ids=torch.tensor([g for g, _ in members], dtype=torch.long),
            group_mean=group_mean[flat],
            group_std=group_std[flat],
            group_size=torch.full((len(members),), float(self.num_answers)),
            ref_logprobs=None,
            num_tokens=step["num_tokens"],
            num_sequences=step["num_sequences"],
            num_groups=step["num_groups"],
        )
        return MicroBatch(
            input_ids=torch.cat([p_ids, r_ids], dim=1),
            attention_mask=torch.cat([p_mask, r_mask], dim=1),
            prompt_len=p_ids.shape[1],
            loss_batch=loss_batch,
            engine_logprobs=_pad_right([groups[g].engine_logprobs[j] for g, j in members], 0.0, torch.float32),
            is_padding=is_padding,
        )

    def build_steps(self, groups: list[Group]) -> list[StepBatch]:
        """Turn the kept groups into this rank's optimizer steps (old log-probs not filled yet)."""
        rank, _ = _world()
        k = self.num_answers
        rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
        ids = torch.arange(len(groups)).repeat_interleave(k)
        # Statistics over the WHOLE group (all K answers), before any mini-batching.
        stats = group_stats(rewards, ids)
        steps = []
        for per_rank in self.plan(groups):
            members = [m for mbs in per_rank for mb in mbs for m in mb]
            counts = {
                "num_tokens": float(sum(len(groups[g].response_ids[j]) for g, j in members)),
                "num_sequences": float(len(members)),
                "num_groups": float(len({g for g, _ in members})),
            }
            mbs = [self._micro_batch(groups, mb, stats, counts) for mb in per_rank[rank]]
            steps.append(StepBatch(mbs))
        return steps

    @torch.no_grad()
    def fill_old_logprobs(
        self,
        steps: list[StepBatch],
        logprob_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
        device: torch.device | str,
    ) -> dict[str, float]:
        """Recompute logπ_old with the training model and measure the engine/trainer log-prob gap.

        ``logprob_fn(input_ids, attention_mask, prompt_len)`` returns the response-token log-probs
        (``PolicyModule.response_logprobs``); the caller puts the model in eval mode.
        """
        gap_sum, tokens = 0.0, 0.0
        for step in steps:
            for mb in step.micro_batches:
                lp = logprob_fn(mb.input_ids.to(device), mb.attention_mask.to(device), mb.prompt_len).float().cpu()
                mask = mb.loss_batch.response_mask
                mb.loss_batch.old_logprobs = lp * mask
                n = float(mask.sum())
                if n > 0:
                    gap_sum += logprob_gap(mb.engine_logprobs, lp, mask) * n
                    tokens += n
        totals = all_gather_objects((gap_sum, tokens))
        gap = sum(s for s, _ in totals) / max(sum(t for _, t in totals), 1.0)
        check_logprob_gap(gap, self.max_logprob_gap)
        return {"logprob_gap": gap}

    def train_dataloader(self) -> DataLoader:
        if not self._has_trainer():
            raise RuntimeError("RolloutDataModule.train_dataloader needs a trainer (it uses the live model)")
        model = self.trainer.lightning_module
        epoch = self.trainer.current_epoch
        if epoch == self._finished_iteration:
            # The iteration the resumed checkpoint closed: Lightning skips to the next epoch without
            # iterating this loader, so hand it an empty (no-op) step instead of generating.
            self._finished_iteration = None
            return DataLoader(_ListDataset([StepBatch([])]), batch_size=None, collate_fn=_identity)
        self.iteration = epoch
        self.setup("fit")
        assert self.engine is not None
        self._phase("sync")
        sync_stats = self.engine.sync_weights(model.model)
        groups, stats = self.collect()
        stats.update({k: float(v) for k, v in (sync_stats or {}).items()})  # already named sync/...
        if groups:
            steps = self.build_steps(groups)
        else:
            # Nothing to learn from (e.g. every group all-wrong): one empty step keeps the run alive
            # (an empty epoch would end `fit`); the module skips it and rollout/kept_groups logs 0.
            log.warning(
                "iteration %d: no group kept after %d rounds; skipping the update", self.iteration, stats["gen_rounds"]
            )
            steps = [StepBatch([])]
        self._phase("old-logprobs")
        was_training = model.training
        model.eval()
        try:
            stats.update(self.fill_old_logprobs(steps, model.response_logprobs, model.device))
        finally:
            model.train(was_training)
        stats["optimizer_steps"] = float(len(steps))
        self.last_stats = stats
        self._phase("train")
        return DataLoader(_ListDataset(steps), batch_size=None, shuffle=False, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader | list:
        """Chunks of this rank's share of ``val_problems`` as (problems, number to score); [] when unset."""
        if not self.val_problems:
            return []
        chunks = shard_batches(self.val_problems, self.val_batch_prompts)
        return DataLoader(_ListDataset(chunks), batch_size=None, shuffle=False, collate_fn=_identity)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _identity(x: Any) -> Any:
    return x
