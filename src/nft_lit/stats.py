"""Seed statistics: which differences between groups of runs do their seeds resolve? Numbers in, dataclasses out.

Per group (one final value per seed): the mean with a 95% bootstrap interval over seeds. Per pair of groups X, Y:
rliable's probability of improvement P(X > Y) (the Mann-Whitney U statistic over n_X n_Y: the share of seed
pairs where X beats Y, ties counting 1/2) with a 95% stratified bootstrap interval (the seeds of X and of Y
resampled independently), a verdict, and when unresolved a projection of the seeds per group that would resolve it.

Method: ``scipy.stats.bootstrap`` with ``method='percentile'``, 10,000 resamples and a fixed generator
(``numpy.random.default_rng(0)``, a fresh one per interval), so the same runs always give the same numbers.

Seed rules (``RULES``): with n seeds a percentile interval of the mean is just the seeds' range while
(1/n)^n >= 2.5% (n <= 3); a pair of n vs m seeds can only resolve if an exact test of complete separation,
p = 2/C(n + m, n), is below 5%. Both hold from ``MIN_SEEDS`` = 4 seeds per group.

Framework-free leaf: numpy, scipy and the standard library only (``nft_lit.report`` renders and writes them).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

CONFIDENCE = 0.95
N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # each interval draws from its own generator with this seed: the same runs, the same report
METHOD = (
    f"{CONFIDENCE:.0%} percentile bootstrap over seeds (scipy.stats.bootstrap, method='percentile', "
    f"n_resamples={N_RESAMPLES}, rng=numpy.random.default_rng({BOOTSTRAP_SEED}) per interval); P(X > Y) is "
    "rliable's probability of improvement (Mann-Whitney U / (n_X n_Y): the share of seed pairs where X beats Y, "
    "ties 1/2), its interval a stratified bootstrap (the seeds of X and of Y resampled independently)"
)
METHOD_RECORD = {  # the method as data (stats.json)
    "name": "percentile bootstrap",
    "function": "scipy.stats.bootstrap",
    "n_resamples": N_RESAMPLES,
    "rng_seed": BOOTSTRAP_SEED,
    "pairs": "stratified: the seeds of each group resampled independently",
    "text": METHOD,
}


def probability_of_improvement(x: ArrayLike, y: ArrayLike, axis: int = -1) -> Any:
    """P(X > Y) over all pairs of a seed of X and a seed of Y, ties counting 1/2 (rliable's probability of
    improvement on one task, the Mann-Whitney U statistic over n_X n_Y). Vectorised over the other axes: a
    numpy scalar for 1-D inputs, an array over the leading axes otherwise."""
    x = np.moveaxis(np.asarray(x, dtype=float), axis, -1)
    y = np.moveaxis(np.asarray(y, dtype=float), axis, -1)
    diff = x[..., :, None] - y[..., None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(-2, -1))


def bootstrap_interval(samples: Sequence[Sequence[float]], statistic: Callable[..., Any]) -> tuple[float, float]:
    """The ``CONFIDENCE`` percentile-bootstrap interval of ``statistic(*samples)``; each sample (the seeds of
    one group, >= 2) is resampled on its own, so a pair's bootstrap is stratified by group. Deterministic."""
    from scipy.stats import bootstrap

    result = bootstrap(
        tuple(np.asarray(sample, dtype=float) for sample in samples),
        statistic,
        n_resamples=N_RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        paired=False,
        vectorized=True,
        axis=-1,
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_interval_informative(n: int) -> bool:
    """Whether a percentile interval of the mean of n seeds says more than their range. A resample that repeats
    one seed n times has probability (1/n)^n; while that is >= (1 - CONFIDENCE)/2 (n <= 3 at 95%), the lowest
    and highest seeds are the interval's ends."""
    return n >= 2 and (1 / n) ** n < (1 - CONFIDENCE) / 2


def separation_p_value(n: int, m: int) -> float:
    """The smallest two-sided p-value an exact Mann-Whitney (permutation) test can give with n and m seeds,
    reached when every seed of one group beats every seed of the other: 2 / C(n + m, n)."""
    return min(1.0, 2 / math.comb(n + m, n)) if n and m else 1.0


def pair_resolvable(n: int, m: int) -> bool:
    """Whether n vs m seeds can resolve a pair at all: below this even complete separation is compatible with
    chance (exact test), although a bootstrap interval of P(X > Y) would then be [1, 1] and exclude 0.5."""
    return separation_p_value(n, m) < 1 - CONFIDENCE


# the fewest seeds per group (equal counts) meeting both rules: 4 at 95% (2/C(8,4) = 0.029; (1/4)^4 = 0.004)
MIN_SEEDS = next(n for n in range(2, 100) if mean_interval_informative(n) and pair_resolvable(n, n))
RULES = (
    f"at least {MIN_SEEDS} seeds per group: with n seeds a percentile interval of the mean is just the seeds' "
    f"range while (1/n)^n >= {(1 - CONFIDENCE) / 2:.3g} (n <= 3), and P(X > Y) of n vs m seeds can only resolve "
    f"if an exact test of complete separation, p = 2/C(n+m, n), is below {1 - CONFIDENCE:.2g} (4 vs 4: "
    f"{separation_p_value(4, 4):.3f}; 3 vs 3: {separation_p_value(3, 3):.2f}). Seeds to resolve an unresolved pair "
    "are a projection: the observed P(X > Y) kept, the interval shrinking as 1/sqrt(seeds)"
)


@dataclass
class GroupStats:
    """One group's final value per seed (fractions), its mean and interval (None below 2 seeds)."""

    label: str
    seeds: list[int]
    values: list[float]
    mean: float
    low: float | None = None
    high: float | None = None
    note: str = ""


@dataclass
class PairStats:
    """P(X > Y) of two groups, its interval (None below 2 seeds in either) and the verdict."""

    x: str
    y: str
    n_x: int
    n_y: int
    prob: float
    low: float | None
    high: float | None
    resolved: bool
    verdict: str
    seeds_to_resolve: int | None  # projected seeds per group; None when resolved or no difference was seen
    note: str = ""


@dataclass
class SeedStatistics:
    """Every group's statistics and every pair's, in the order the groups were given."""

    metric: str
    groups: list[GroupStats]
    pairs: list[PairStats]
    skipped: list[str]  # groups with no value to compare (no held-out evaluation after training)


def projected_seeds(prob: float, low: float, high: float, n: int, m: int) -> int | None:
    """Seeds per group at which the observed P(X > Y) would resolve if it stayed the same and the interval's
    half-width toward 0.5, h, shrank as 1/sqrt(seeds): max(n, m)·(h / |P − 0.5|)², at least ``MIN_SEEDS`` and
    more than now. None when P = 0.5 (no difference to resolve)."""
    gap = abs(prob - 0.5)
    if gap < 1e-12:
        return None
    half = prob - low if prob > 0.5 else high - prob
    return max(math.ceil(max(n, m) * (half / gap) ** 2 - 1e-9), MIN_SEEDS, max(n, m) + 1)


def describe_group(label: str, seeds: list[int], values: list[float]) -> GroupStats:
    """The mean of one group's values (one per seed, at least one) and its interval, with a note when the
    seeds are too few for the interval to say more than their range."""
    group = GroupStats(label, seeds, values, statistics.fmean(values))
    n = len(values)
    if n < 2:
        group.note = f"1 seed: no interval (need >= {MIN_SEEDS} seeds)"
        return group
    group.low, group.high = bootstrap_interval([values], np.mean)
    if len(set(values)) == 1:
        group.note = f"all {n} seeds equal: the interval has width 0, the spread is unknown"
    elif not mean_interval_informative(n):
        group.note = f"{n} seeds: the interval is just the seeds' range (need >= {MIN_SEEDS} seeds)"
    return group


def compare_pair(a: GroupStats, b: GroupStats) -> PairStats:
    """P(a > b), its stratified interval and the verdict: resolved when the interval excludes 0.5 and the seed
    counts can resolve a pair at all (``pair_resolvable``); otherwise the projected seeds per group."""
    n, m = len(a.values), len(b.values)
    prob = float(probability_of_improvement(a.values, b.values))
    if min(n, m) < 2:
        note = f"{n} vs {m} seeds: no interval (need >= {MIN_SEEDS} seeds per group)"
        return PairStats(a.label, b.label, n, m, prob, None, None, False, "not resolved (too few seeds)", None, note)
    low, high = bootstrap_interval([a.values, b.values], probability_of_improvement)
    excludes_half = low > 0.5 or high < 0.5
    resolvable = pair_resolvable(n, m)
    resolved = excludes_half and resolvable
    note = ""
    if not resolvable:
        note = (
            f"{n} vs {m} seeds: even if every seed of one beat every seed of the other, an exact test gives "
            f"p = {separation_p_value(n, m):.3g} (need >= {MIN_SEEDS} seeds per group)"
        )
    if resolved:
        verdict = f"resolved at {CONFIDENCE:.0%} ({a.label if low > 0.5 else b.label} better)"
    else:
        verdict = "not resolved (too few seeds)" if excludes_half else "not resolved"
    seeds = None if resolved else projected_seeds(prob, low, high, n, m)
    return PairStats(a.label, b.label, n, m, prob, low, high, resolved, verdict, seeds, note)


def compare_groups(
    metric: str, finals: dict[str, tuple[list[int], list[float]]], skipped: Sequence[str] = ()
) -> SeedStatistics:
    """``finals``: per group label, its seeds and their final values (non-empty). Every group's statistics and
    every pair's (X before Y in ``finals``' order); ``skipped`` names groups that had no value, for the record."""
    groups = [describe_group(label, seeds, values) for label, (seeds, values) in finals.items()]
    pairs = [compare_pair(a, b) for i, a in enumerate(groups) for b in groups[i + 1 :]]
    return SeedStatistics(metric, groups, pairs, list(skipped))
