"""Tables and PNG curves from `nft-lit fit` run folders (one run, or a Hydra multirun sweep).

A run folder is what `nft-lit fit` writes: ``.hydra/{config,overrides}.yaml`` and ``csv/metrics.csv``.
Runs that differ only by ``seed`` form one group; the table gives mean ± std over seeds of the held-out
avg@k (``val/heldout/avg@k``, whatever k the run sampled) before RL (the base policy) and after the last
iteration, like the paper's Table 1, and the curves show held-out accuracy and entropy per iteration like its
Figures 6 and 8, with the train reward, the response length, the share of answers cut at the token limit and
the rollout engine's log-prob gap (entropy: also on the fixed probe, ``val/probe/entropy``, when measured).

Seed statistics (``seed_statistics``, computed by ``nft_lit.stats``) then say which differences the seeds
resolve: per group the mean final held-out avg@k with a 95% bootstrap interval over seeds, and per pair of groups
P(X > Y) with a 95% stratified bootstrap interval and a verdict (``stats.json``, ``seed_intervals.png``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nft_lit.metrics import PROBE_ENTROPY
from nft_lit.report_stats import plot_intervals, stats_json, stats_table
from nft_lit.stats import SeedStatistics, compare_groups

METRICS_CSV = Path("csv") / "metrics.csv"
HELDOUT = re.compile(r"^val/heldout/avg@(\d+)$")
HELDOUT_CURVE = "heldout"  # key of the held-out avg@k curve in Run.curves, whatever k
GAP = "rollout/logprob_gap"
CURVES = {
    "heldout_accuracy": (HELDOUT_CURVE, "held-out accuracy (avg@k)"),
    "train_reward": ("rollout/reward_mean", "train reward (mean over sampled answers)"),
    "entropy": ("train/entropy", "entropy (nats/token)"),
    "response_length": ("rollout/response_length_mean", "response length (tokens)"),
    "truncation": ("rollout/truncation_rate", "answers cut at max_new_tokens (share)"),
    "logprob_gap": (GAP, "log-prob gap, rollout engine vs trainer (nats/token)"),
}
_IGNORED_OVERRIDES = ("seed", "hydra.", "experiment", "iterations")
# The time table: seconds of each phase of an iteration, then throughput (medians over iterations).
PHASES = ("sync", "generate", "verify", "verify_wait", "filter", "plan", "old_logprobs", "train", "eval", "iteration")
THROUGHPUT = {
    "rollout/gen_tokens_per_second": "gen tok/s",
    "train/tokens_per_second": "train tok/s",
    "rollout/padding_fraction": "padding",
}


@dataclass
class Run:
    """One run's curves: ``{metric: [(iteration, value), ...]}``; iteration 0 = before any update."""

    path: Path
    label: str
    seed: int
    heldout_k: int = 1
    overrides: list[str] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # median over iterations of each seconds/* and throughput metric the run logged
    timings: dict[str, float] = field(default_factory=dict)

    def first(self, metric: str) -> float:
        return self.curves[metric][0][1]

    def last(self, metric: str) -> float:
        return self.curves[metric][-1][1]


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders at or below ``paths`` (a run folder, a sweep folder, or a folder of sweeps)."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"report: {path} does not exist")
        # validate/export pointed at a fit run write into <run>/validate|export/<time>/: not runs of their own
        runs = (p.parent.parent for p in path.rglob(str(METRICS_CSV)))
        found += sorted(r for r in runs if r.parent.name not in ("validate", "export"))
    if not found:
        raise FileNotFoundError(f"report: no run folder (with {METRICS_CSV}) under {[str(p) for p in paths]}")
    return found


def _overrides(run_dir: Path) -> list[str]:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return [o for o in overrides or [] if not o.lstrip("+~").startswith(_IGNORED_OVERRIDES)]


def load_run(run_dir: Path) -> Run:
    """Read one run; held-out accuracy at iteration 0 is the base policy (needs ``eval.at_start``)."""
    import pandas as pd

    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"report: {config_file} missing (not an `nft-lit fit` run folder)")
    try:
        config = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"report: {config_file} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    try:
        frame = pd.read_csv(run_dir / METRICS_CSV)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise ValueError(f"report: {run_dir / METRICS_CSV} cannot be read ({str(exc).splitlines()[0]})") from exc
    if "epoch" not in frame:
        raise ValueError(f"report: {run_dir / METRICS_CSV} has no 'epoch' column")
    name = str(config.get("algorithm", {}).get("name", run_dir.name))
    run = Run(path=run_dir, label=name, seed=int(config.get("seed", 0)), overrides=_overrides(run_dir))
    at_start = bool(config.get("eval", {}).get("at_start", False))
    heldout = sorted((int(m[1]), c) for c in frame.columns if (m := HELDOUT.match(str(c))))
    if not heldout:
        raise ValueError(f"report: {run_dir} logged no 'val/heldout/avg@k' (set eval.heldout in the experiment)")
    run.heldout_k, heldout_column = heldout[-1]
    for metric in [*(m for m, _ in CURVES.values()), PROBE_ENTROPY]:
        column = heldout_column if metric == HELDOUT_CURVE else metric
        if column not in frame:
            continue
        rows = frame[frame[column].notna()]
        if rows.empty:
            if metric == HELDOUT_CURVE:
                raise ValueError(f"report: {run_dir / METRICS_CSV} has no value in its '{column}' column")
            continue
        if metric in (HELDOUT_CURVE, PROBE_ENTROPY):
            # Evaluations log after iteration `epoch` (so x = epoch + 1), except the one before training.
            xs = [int(e) + 1 for e in rows["epoch"]]
            if at_start and xs:
                xs[0] = 0
            points = list(zip(xs, rows[column].astype(float), strict=True))
        else:
            # Per-optimizer-step metrics (entropy) are averaged over the iteration's steps.
            per_iter = rows.groupby(rows["epoch"].astype(int))[column].mean()
            points = [(int(e) + 1, float(v)) for e, v in per_iter.items()]
        run.curves[metric] = points
    for metric in [f"seconds/{p}" for p in PHASES] + list(THROUGHPUT):
        if metric in frame and frame[metric].notna().any():
            run.timings[metric] = float(frame[metric].dropna().median())
    return run


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], scale: float = 100.0) -> str:
    mean, std = _mean_std([v * scale for v in values])
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Group by the overrides that differ between runs (seed aside); the algorithm name when none do."""
    varying = set().union(*(r.overrides for r in runs)) - set.intersection(*(set(r.overrides) for r in runs))
    for run in runs:
        label = ",".join(o for o in run.overrides if o in varying)
        run.label = label or run.label
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return groups


def results_table(groups: dict[str, list[Run]]) -> str:
    """Markdown table: held-out avg@k (%) of the base and after RL, mean ± std over seeds; entropy first → last
    (the probe's if measured); the largest log-prob gap between rollout engine and trainer (all iterations, seeds)."""
    ks = sorted({r.heldout_k for runs in groups.values() for r in runs})
    k = str(ks[0]) if len(ks) == 1 else "k"
    with_gap = any(GAP in r.curves for runs in groups.values() for r in runs)
    with_probe = any(PROBE_ENTROPY in r.curves for runs in groups.values() for r in runs)
    lines = [
        f"| run | seeds | held-out avg@{k} before (%) | after (%) | gain (points) | train reward after (%) "
        "| entropy first → last iteration |"
        + " probe entropy first → last evaluation |" * with_probe
        + " max log-prob gap |" * with_gap,
        "|---|---|---|---|---|---|---|" + "---|" * (with_probe + with_gap),
    ]
    notes = []
    for label, runs in groups.items():
        before = [r.first(HELDOUT_CURVE) for r in runs]
        # "after" needs an evaluation after some training: a run whose only point is the base has none
        trained = [r for r in runs if r.curves[HELDOUT_CURVE][-1][0] > 0]
        after = [r.last(HELDOUT_CURVE) for r in trained]
        gain = [r.last(HELDOUT_CURVE) - r.first(HELDOUT_CURVE) for r in trained]
        if len(trained) < len(runs):
            notes.append(
                f"{label}: {len(runs) - len(trained)} of {len(runs)} runs have no held-out evaluation after"
                " training (eval.every_n_iterations > iterations?): not in 'after' and 'gain'"
            )
        reward = [r.last("rollout/reward_mean") for r in runs if "rollout/reward_mean" in r.curves]
        ent_txt = _first_to_last(runs, "train/entropy")
        probe_txt = f" {_first_to_last(runs, PROBE_ENTROPY)} |" if with_probe else ""
        gaps = [y for r in runs for _, y in r.curves.get(GAP, [])]
        gap_txt = (f" {max(gaps):.1e} |" if gaps else " – |") if with_gap else ""
        lines.append(
            f"| {label} | {len(runs)} | {_fmt(before)} | {_fmt(after) if after else '–'} | "
            f"{_fmt(gain) if gain else '–'} | {_fmt(reward) if reward else '–'} | {ent_txt} |{probe_txt}{gap_txt}"
        )
    return "\n".join(lines + [f"\nNote: {n}" for n in notes])


def _first_to_last(runs: list[Run], metric: str) -> str:
    """The first → last point of a curve, each the mean over the runs that logged it; "–" when none did."""
    ends = [(r.first(metric), r.last(metric)) for r in runs if metric in r.curves]
    return f"{statistics.fmean(e[0] for e in ends):.3f} → {statistics.fmean(e[1] for e in ends):.3f}" if ends else "–"


def time_table(groups: dict[str, list[Run]]) -> str:
    """Markdown table: where an iteration's time goes, median seconds per phase (``seconds/*``; eval: per
    evaluation), and generation/training throughput, averaged over seeds; "–" where a run logged none."""
    phases = [p for p in PHASES if any(f"seconds/{p}" in r.timings for runs in groups.values() for r in runs)]
    extra = [m for m in THROUGHPUT if any(m in r.timings for runs in groups.values() for r in runs)]
    if not phases and not extra:
        return ""
    lines = [
        "| run | " + " | ".join([f"{p} (s)" for p in phases] + [THROUGHPUT[m] for m in extra]) + " |",
        "|---" * (1 + len(phases) + len(extra)) + "|",
    ]
    for label, runs in groups.items():
        cells = []
        for metric in [f"seconds/{p}" for p in phases] + extra:
            values = [r.timings[metric] for r in runs if metric in r.timings]
            if not values:
                cells.append("–")
            elif metric == "rollout/padding_fraction":
                cells.append(f"{100 * statistics.fmean(values):.1f}%")
            elif metric.endswith("per_second"):
                cells.append(f"{statistics.fmean(values):.0f}")
            else:
                cells.append(f"{statistics.fmean(values):.3g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


EDGE = 3  # iterations averaged at each end of a curve in the per-run table


def _ends(run: Run, metric: str, scale: float = 1.0) -> str:
    """Mean over the first and over the last ``EDGE`` iterations of a curve, "first → last"."""
    values = [y * scale for _, y in run.curves.get(metric, [])]
    if not values:
        return "–"
    k = min(EDGE, len(values))
    return f"{statistics.fmean(values[:k]):.1f} → {statistics.fmean(values[-k:]):.1f}"


def per_run_table(runs: list[Run]) -> str:
    """Markdown table, one row per run: every held-out evaluation (``iteration: avg@k %``), then the train
    reward, the response length and the share of answers cut at the token limit, each as the mean of the
    first ``EDGE`` iterations → the mean of the last ``EDGE``."""
    lines = [
        f"| run | seed | held-out avg@k (%) by iteration | train reward (%), first {EDGE} → last {EDGE} iterations "
        "| response length (tokens) | cut at the limit (%) |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        heldout = ", ".join(f"{x}: {100 * y:.1f}" for x, y in run.curves[HELDOUT_CURVE])
        lines.append(
            f"| {run.label} | {run.seed} | {heldout} | {_ends(run, 'rollout/reward_mean', 100)} | "
            f"{_ends(run, 'rollout/response_length_mean')} | {_ends(run, 'rollout/truncation_rate', 100)} |"
        )
    return "\n".join(lines)


def plot_curves(groups: dict[str, list[Run]], out_dir: Path) -> list[Path]:
    """One PNG per curve: mean over seeds per iteration, shaded ± std; entropy.png adds the probe's, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (metric, ylabel) in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for shown in [metric, PROBE_ENTROPY] if name == "entropy" else [metric]:
            for i, (label, runs) in enumerate(groups.items()):  # one colour per group, the probe's dashed
                by_x: dict[int, list[float]] = {}
                for run in runs:
                    for x, y in run.curves.get(shown, []):
                        by_x.setdefault(x, []).append(y)
                if not by_x:
                    continue
                xs = sorted(by_x)
                stats = [_mean_std(by_x[x]) for x in xs]
                means = [m for m, _ in stats]
                probe = dict(ls="--", label=f"{label}, fixed probe") if shown == PROBE_ENTROPY else dict(label=label)
                ax.plot(xs, means, color=f"C{i}", marker="o" if len(xs) < 20 else None, markersize=3, **probe)
                ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], color=f"C{i}", alpha=0.2)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        if metric == GAP:
            ax.set_yscale("log", nonpositive="mask")  # float precision is ~1e-7..1e-5, a broken sync 1e-2 and up
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ------------- Seed statistics (computed by nft_lit.stats): which differences between groups do the seeds resolve?
def seed_statistics(groups: dict[str, list[Run]]) -> SeedStatistics:
    """Per group the mean final held-out avg@k over seeds with its interval; per pair of groups (in table
    order) P(X > Y) with its interval and verdict. Method: ``METHOD``; when seeds are too few: ``RULES``.
    Only runs evaluated after training count (as in 'after' of the results table); a group with none is skipped."""
    ks = sorted({r.heldout_k for runs in groups.values() for r in runs})
    metric = f"held-out avg@{ks[0] if len(ks) == 1 else 'k'} after the last iteration"
    finals, skipped = {}, []
    for label, runs in groups.items():
        trained = [r for r in runs if r.curves[HELDOUT_CURVE][-1][0] > 0]
        if trained:
            finals[label] = ([r.seed for r in trained], [r.last(HELDOUT_CURVE) for r in trained])
        else:
            skipped.append(label)
    return compare_groups(metric, finals, skipped)


def report(paths: list[Path], out_dir: Path) -> tuple[str, list[Path]]:
    """Write ``report.md``, the PNGs and ``stats.json`` (seed statistics) into ``out_dir``; returns the tables
    and the PNG paths (``seed_intervals.png`` last, when some group has >= 2 seeds)."""
    runs = [load_run(p) for p in find_runs(paths)]
    groups = group_runs(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = results_table(groups)
    seed_stats = seed_statistics(groups)
    if seed_stats.groups:
        table += "\n\n" + stats_table(seed_stats)
        (out_dir / "stats.json").write_text(json.dumps(stats_json(seed_stats), indent=2) + "\n")
    times = time_table(groups)
    if times:
        table += "\n\nTime per iteration (median over iterations, mean over seeds):\n\n" + times
    table += "\n\nPer run:\n\n" + per_run_table(runs)
    pngs = plot_curves(groups, out_dir)
    intervals = plot_intervals(seed_stats, out_dir)
    if intervals is not None:
        pngs.append(intervals)
    sources = "\n".join(f"- {r.label} seed {r.seed}: `{r.path}`" for r in runs)
    (out_dir / "report.md").write_text(f"{table}\n\nRuns:\n{sources}\n")
    return table, pngs


def report_command(argv: list[str]) -> int:
    """`nft-lit report RUN_OR_SWEEP_DIR... [--out DIR]`: print the tables, write report.md, stats.json and PNGs.

    A missing path, a folder without runs or a run without a required column exits 2 with one line naming it.
    """
    parser = argparse.ArgumentParser(prog="nft-lit report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="run folders or sweep folders")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first path)")
    args = parser.parse_args(argv)
    try:
        table, pngs = report(args.paths, args.out or args.paths[0])
    except (FileNotFoundError, ValueError) as exc:  # the messages start "report: " and name the path
        print(f"nft-lit {exc}", file=sys.stderr)
        return 2
    print(table)
    for png in pngs:
        print(png)
    return 0
