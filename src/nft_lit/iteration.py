"""The data side of one rollout iteration, as stages with explicit inputs and outputs (docs/ALGORITHMS.md,
"Data step"; docs/ARCHITECTURE.md):

    PromptStream.take -> Sampler.sample (generate, verify) -> RewardShaping (DAPO overlong)
    -> Group per prompt -> keep mixed groups (dynamic sampling) -> steps.py (plan, batch, old log-probs)

``collect_groups`` runs generation rounds until ``prompts_per_step`` groups are kept. Nothing here knows
about Lightning: the iteration stage (``driver.RolloutIteration``) hands these stages their inputs.

Determinism (exact resume): prompts come from a per-pass permutation seeded by ``seed`` and read at a cursor
(``PromptStream.state_dict``); the generation seed of round ``r`` of iteration ``i`` on rank ``k`` is derived
from (seed, i, r, k). A resumed run therefore re-uses and skips no prompt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from nft_lit import metrics as m
from nft_lit.distributed import all_gather_objects, derive_seed, rank_and_world
from nft_lit.losses import PolicyLoss
from nft_lit.reward import overlong_penalty
from nft_lit.rollout import SamplingParams
from nft_lit.sampler import HasQuestionAndAnswer, Sampler


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

    @property
    def mixed(self) -> bool:
        """0 < r̂ < 1: the group has both correct and wrong answers (the only ones dynamic sampling keeps)."""
        return 0.0 < self.pass_rate < 1.0


class PromptStream:
    """Problem indices in a seeded permutation per pass over the set, read at a resumable cursor."""

    def __init__(self, num_problems: int, seed: int) -> None:
        if num_problems < 1:
            raise ValueError("data: the training problem set is empty")
        self.num_problems = num_problems
        self.seed = seed
        self.cursor = 0

    def index_at(self, position: int) -> int:
        """The problem index at ``position`` of the endless stream (pass p is permutation p)."""
        epoch, offset = divmod(position, self.num_problems)
        g = torch.Generator().manual_seed(derive_seed(self.seed, 0xDA7A, epoch))
        return int(torch.randperm(self.num_problems, generator=g)[offset])

    def take(self, n: int) -> list[int]:
        """The next ``n`` problem indices; advances the cursor."""
        indices = [self.index_at(self.cursor + j) for j in range(n)]
        self.cursor += n
        return indices


@dataclass(frozen=True)
class RewardShaping:
    """DAPO's overlong shaping: reward + penalty over the last ``buffer`` tokens of the budget (off when None)."""

    buffer: int | None = None
    factor: float = 1.0

    def __call__(self, correct: list[float], lengths: list[int], max_new_tokens: int) -> list[float]:
        if self.buffer is None:
            return list(correct)
        penalties = overlong_penalty(lengths, max_new_tokens, self.buffer, self.factor)
        return [r + float(p) for r, p in zip(correct, penalties, strict=True)]


@dataclass(frozen=True)
class RolloutSettings:
    """How one iteration collects its groups; every rule on these values is checked here, once, for every
    front end (Hydra, LightningCLI, notebooks).

    Args:
        prompts_per_step: kept groups per iteration (the paper's 512).
        num_answers: K answers per prompt (>= 2: group statistics).
        dynamic_sampling: keep only groups with 0 < r̂ < 1, generating extra rounds.
        gen_prompts_per_round: prompts generated per round when dynamic sampling (None: 3 x prompts_per_step).
        max_gen_rounds: rounds after which an iteration trains on what it has kept.
        strict: raise instead of training on fewer than ``prompts_per_step`` groups.
        shaping: reward shaping applied after verification.
        max_prompt_tokens: a longer prompt is an error naming the problem (None: no limit).
        seed: root of the prompt order and of every generation seed.
    """

    prompts_per_step: int
    num_answers: int
    dynamic_sampling: bool = True
    gen_prompts_per_round: int | None = None
    max_gen_rounds: int = 10
    strict: bool = False
    shaping: RewardShaping = RewardShaping()
    max_prompt_tokens: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_answers < 2:
            raise ValueError(
                f"algorithm.num_answers (K) must be >= 2 for group statistics (and dynamic sampling), got "
                f"{self.num_answers}"
            )
        if self.prompts_per_step < 1:
            raise ValueError(f"datamodule.prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.max_gen_rounds < 1:
            raise ValueError(f"datamodule.max_gen_rounds must be >= 1, got {self.max_gen_rounds}")
        if self.gen_prompts_per_round is not None and self.gen_prompts_per_round < 1:
            raise ValueError(f"datamodule.gen_prompts_per_round must be >= 1 or null, got {self.gen_prompts_per_round}")
        if self.shaping.buffer is not None and self.shaping.buffer <= 0:
            raise ValueError(f"algorithm.overlong_buffer must be > 0 or null, got {self.shaping.buffer}")

    @property
    def prompts_per_round(self) -> int:
        if not self.dynamic_sampling:
            return self.prompts_per_step
        return self.gen_prompts_per_round or 3 * self.prompts_per_step

    @property
    def rounds(self) -> int:
        return self.max_gen_rounds if self.dynamic_sampling else 1

    def check(self, sampling: SamplingParams, world: int) -> None:
        """Rules that involve the sampling parameters or the number of ranks."""
        if not sampling.temperature > 0:
            raise ValueError(
                f"sampling.temperature must be > 0 for training rollouts (the log-probs divide by it), got "
                f"{sampling.temperature}"
            )
        buffer = self.shaping.buffer
        if buffer is not None and not 0 < buffer <= sampling.max_new_tokens:
            raise ValueError(
                f"algorithm.overlong_buffer={buffer} must be in (0, sampling.max_new_tokens="
                f"{sampling.max_new_tokens}] (DAPO penalises the last `buffer` tokens of the response budget)"
            )
        if self.prompts_per_round % world:
            option = "datamodule.gen_prompts_per_round" if self.dynamic_sampling else "datamodule.prompts_per_step"
            # Engines that generate with a sharded model need the same number of prompts on every rank.
            raise ValueError(f"{option}={self.prompts_per_round} must be a multiple of the number of ranks ({world})")


def check_loss_fits(loss: PolicyLoss, settings: RolloutSettings, whole_groups: bool) -> None:
    """What a loss class declares it needs of the data (binary rewards, whole groups), checked at start."""
    name = type(loss).__name__
    if loss.requires_binary_rewards and settings.shaping.buffer is not None:
        raise ValueError(
            f"algorithm.overlong_buffer={settings.shaping.buffer} makes rewards non-binary, but {name} needs"
            " binary rewards (paper Eq. 10): set algorithm.overlong_buffer=null"
        )
    if loss.requires_binary_rewards and not settings.dynamic_sampling:
        raise ValueError(f"{name} needs every group mixed (0 < r̂ < 1): set algorithm.dynamic_sampling=true")
    if loss.requires_whole_groups and not whole_groups:
        raise ValueError(f"{name} needs whole groups per micro-batch: set datamodule.whole_groups=true")


def _score_round(
    problems: Sequence[HasQuestionAndAnswer],
    indices: list[int],
    sampler: Sampler,
    sampling: SamplingParams,
    settings: RolloutSettings,
) -> tuple[list[Group], dict[str, float]]:
    """Generate, verify and shape this rank's share of ``indices``; every rank's groups in ``indices`` order."""
    rank, world = rank_and_world()
    mine = indices[rank::world]
    for i in mine:
        ids = sampler.encode(problems[i].question)
        if settings.max_prompt_tokens is not None and len(ids) > settings.max_prompt_tokens:
            raise ValueError(
                f"problem {getattr(problems[i], 'id', i)!r}: prompt has {len(ids)} tokens, more than"
                f" datamodule.max_prompt_tokens={settings.max_prompt_tokens}"
            )
    answers = sampler.sample([problems[i] for i in mine], settings.num_answers, sampling)
    lengths = [len(r) for r in answers.response_ids]
    rewards = settings.shaping(answers.correct, lengths, sampling.max_new_tokens)
    k = settings.num_answers
    groups = [
        Group(
            prompt_index=i,
            prompt_ids=answers.prompt_ids[j],
            response_ids=answers.response_ids[j * k : (j + 1) * k],
            engine_logprobs=answers.engine_logprobs[j * k : (j + 1) * k],
            correct=answers.correct[j * k : (j + 1) * k],
            rewards=rewards[j * k : (j + 1) * k],
            truncated=answers.truncated[j * k : (j + 1) * k],
        )
        for j, i in enumerate(mine)
    ]
    stats = {
        "generate": answers.gen_seconds,
        "verify": answers.verify_seconds,
        "verify_wait": answers.verify_wait_seconds,
    }
    gathered = all_gather_objects((groups, stats, float(answers.num_tokens)))
    # Back to round order. A round that spans two passes over the problems can hold an index twice: both
    # copies sort at its first position, after each other in rank order (the sort is stable).
    order: dict[int, int] = {}
    for position, index in enumerate(indices):
        order.setdefault(index, position)
    all_groups = sorted((g for gs, _, _ in gathered for g in gs), key=lambda g: order[g.prompt_index])
    # Wall-clock is the slowest rank; token counts add up.
    return all_groups, {
        **{phase: max(s[phase] for _, s, _ in gathered) for phase in stats},
        "gen_tokens": sum(n for _, _, n in gathered),
    }


def collect_groups(
    problems: Sequence[HasQuestionAndAnswer],
    stream: PromptStream,
    sampler: Sampler,
    sampling: SamplingParams,
    settings: RolloutSettings,
    iteration: int,
) -> tuple[list[Group], dict[str, float]]:
    """Generation rounds until ``prompts_per_step`` groups are kept (or rounds run out): (kept, statistics).

    The engine must already sample from the policy's weights (``Sampler.sync``). Every rank calls this and
    gets the same groups (each generates its share of a round; the groups are gathered).
    """
    started = time.perf_counter()
    rank, _ = rank_and_world()
    kept: list[Group] = []
    seen: list[Group] = []
    totals = {"generate": 0.0, "verify": 0.0, "verify_wait": 0.0, "gen_tokens": 0.0}
    rounds = 0
    while len(kept) < settings.prompts_per_step and rounds < settings.rounds:
        indices = stream.take(settings.prompts_per_round)
        round_sampling = replace(sampling, seed=derive_seed(settings.seed, iteration, rounds, rank))
        groups, stats = _score_round(problems, indices, sampler, round_sampling, settings)
        rounds += 1
        for key in totals:
            totals[key] += stats[key]
        seen.extend(groups)
        kept.extend(g for g in groups if not settings.dynamic_sampling or g.mixed)
    if len(kept) < settings.prompts_per_step and settings.strict:
        raise RuntimeError(
            f"iteration {iteration}: dynamic sampling kept {len(kept)} of datamodule.prompts_per_step="
            f"{settings.prompts_per_step} groups after datamodule.max_gen_rounds={settings.max_gen_rounds} rounds"
            " (datamodule.strict=true)"
        )
    kept = kept[: settings.prompts_per_step]
    # Filtering: what the rounds cost besides the engine and the exposed verification (prompt encoding and
    # checks, grouping, shaping, gathering groups over ranks, dynamic sampling's selection).
    totals["filter"] = time.perf_counter() - started - totals["generate"] - totals["verify_wait"]
    return kept, rollout_statistics(seen, kept, rounds, totals, settings.num_answers)


def rollout_statistics(
    seen: list[Group], kept: list[Group], rounds: int, totals: dict[str, float], num_answers: int
) -> dict[str, float]:
    """What an iteration logs of its rounds, under the logged names (``metrics.py``): ``rollout/*`` (rewards
    and pass rate of every generated answer, the kept share, lengths and truncation, generation/verification
    speed) and ``seconds/*`` (generate; verify = busy time of the verifier; verify_wait = the part generation
    did not hide; filter)."""
    lengths = [len(r) for g in seen for r in g.response_ids]
    correct = [c for g in seen for c in g.correct]
    stats: dict[str, Any] = {
        m.REWARD_MEAN: sum(r for g in seen for r in g.rewards) / len(lengths),
        m.PASS_RATE: sum(correct) / len(correct),
        m.KEPT_GROUP_FRACTION: sum(1 for g in seen if g.mixed) / len(seen),
        m.KEPT_GROUPS: float(len(kept)),
        m.ALL_CORRECT_FRACTION: sum(1 for g in seen if g.pass_rate == 1.0) / len(seen),
        m.GEN_ROUNDS: float(rounds),
        m.RESPONSE_LENGTH_MEAN: sum(lengths) / len(lengths),
        m.RESPONSE_LENGTH_MAX: float(max(lengths)),
        m.TRUNCATION_RATE: sum(t for g in seen for t in g.truncated) / len(lengths),
        m.GEN_TOKENS_PER_SECOND: totals["gen_tokens"] / max(totals["generate"], 1e-9),
        m.VERIFY_ANSWERS_PER_SECOND: len(lengths) / max(totals["verify"], 1e-9),
        m.SECONDS_GENERATE: totals["generate"],
        m.SECONDS_VERIFY: totals["verify"],
        m.SECONDS_VERIFY_WAIT: totals["verify_wait"],
        m.SECONDS_FILTER: totals["filter"],
    }
    if kept:
        stats[m.KEPT_REWARD_MEAN] = sum(r for g in kept for r in g.rewards) / (len(kept) * num_answers)
    return stats
