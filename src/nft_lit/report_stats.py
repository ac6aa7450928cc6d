"""The seed statistics of ``nft-lit report`` (``nft_lit.stats``) as a table, JSON for scripts and a PNG of the
intervals: per group the mean final held-out avg@k with its 95% bootstrap interval over seeds, per pair of groups
P(X > Y) with its interval and a verdict, and the seeds still needed where there are too few."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from nft_lit.stats import CONFIDENCE, METHOD, METHOD_RECORD, MIN_SEEDS, RULES, SeedStatistics


def _interval(low: float | None, high: float | None, scale: float, digits: int) -> str:
    return "–" if low is None or high is None else f"[{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def stats_table(stats: SeedStatistics) -> str:
    """Markdown: the group table (mean and interval, %), the pair table (P(X > Y), interval, verdict, seeds per
    group to resolve), then notes, the method and the seed rule."""
    lines = [
        f"Seed statistics: {stats.metric} (one value per seed).",
        "",
        f"| run | seeds | mean (%) | {CONFIDENCE:.0%} CI (%) | note |",
        "|---|---|---|---|---|",
    ]
    for g in stats.groups:
        lines.append(
            f"| {g.label} | {len(g.values)} | {100 * g.mean:.1f} | {_interval(g.low, g.high, 100, 1)} | {g.note} |"
        )
    if stats.pairs:
        lines += [
            "",
            f"| X vs Y | seeds | P(X > Y) | {CONFIDENCE:.0%} CI | verdict | seeds per group to resolve |",
            "|---|---|---|---|---|---|",
        ]
        for p in stats.pairs:
            if p.resolved:
                need = "–"
            elif p.seeds_to_resolve is None:
                need = "– (no difference seen)"
            else:
                need = f"≈ {p.seeds_to_resolve} (projected)"
            lines.append(
                f"| {p.x} vs {p.y} | {p.n_x} vs {p.n_y} | {p.prob:.2f} | {_interval(p.low, p.high, 1, 2)} | "
                f"{p.verdict} | {need} |"
            )
    elif len(stats.groups) == 1:
        lines += ["", "One group: no pair to compare."]
    notes = [f"{p.x} vs {p.y}: {p.note}" for p in stats.pairs if p.note]
    notes += [f"{label}: no held-out evaluation after training, left out" for label in stats.skipped]
    lines += [""] + [f"Note: {n}" for n in notes] + [f"Method: {METHOD}.", f"Seeds needed: {RULES}."]
    return "\n".join(lines).replace("\n\n\n", "\n\n")


JSON_KEYS = {"low": "ci", "prob": "p_x_better", "seeds_to_resolve": "seeds_per_group_to_resolve"}


def _json_record(fields: dict) -> dict:
    """A GroupStats or PairStats (``asdict``) for stats.json: renamed by ``JSON_KEYS``, "ci" [low, high] or null."""
    record = {JSON_KEYS.get(name, name): value for name, value in fields.items() if name != "high"}
    record["ci"] = None if fields["low"] is None or fields["high"] is None else [fields["low"], fields["high"]]
    return record


def stats_json(stats: SeedStatistics) -> dict:
    """What ``stats.json`` holds: values as fractions, the groups and the pairs as ``_json_record``s."""
    return {
        "metric": stats.metric,
        "confidence": CONFIDENCE,
        "method": METHOD_RECORD,
        "min_seeds_per_group": MIN_SEEDS,
        "rules": RULES,
        "groups": [_json_record(asdict(g)) for g in stats.groups],
        "pairs": [_json_record(asdict(p)) for p in stats.pairs],
        "skipped": stats.skipped,
    }


def plot_intervals(stats: SeedStatistics, out_dir: Path) -> Path | None:
    """``seed_intervals.png``: one horizontal bar per group (mean and interval) over its seeds' values; None
    (no file) when no group has the 2 seeds an interval needs."""
    if not any(g.low is not None for g in stats.groups):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.5 * len(stats.groups)))
    for i, g in enumerate(stats.groups):
        ax.scatter([100 * v for v in g.values], [i] * len(g.values), color="grey", s=12, alpha=0.6, zorder=2)
        if g.low is None or g.high is None:
            ax.plot([100 * g.mean], [i], "o", mfc="none", color="C0", zorder=3)
            continue
        err = [[100 * (g.mean - g.low)], [100 * (g.high - g.mean)]]
        ax.errorbar([100 * g.mean], [i], xerr=err, fmt="o", color="C0", capsize=4, zorder=3)
    ax.set_yticks(range(len(stats.groups)), [f"{g.label} (n={len(g.values)})" for g in stats.groups], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{stats.metric} (%)")
    ax.set_title(f"mean and {CONFIDENCE:.0%} percentile-bootstrap interval over seeds (grey: the seeds)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "seed_intervals.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
