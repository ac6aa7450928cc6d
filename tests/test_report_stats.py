"""Seed statistics of `nft-lit report`: bootstrap intervals over seeds, P(X > Y), verdicts, too-few-seeds rules."""

import csv
import json
import math

import numpy as np
import pytest

from nft_lit.cli import main
from nft_lit.report import report
from nft_lit.stats import (
    MIN_SEEDS,
    compare_groups,
    mean_interval_informative,
    pair_resolvable,
    probability_of_improvement,
    projected_seeds,
    separation_p_value,
)


def _write_run(root, algorithm, seed, after, before=0.1, k=4):
    """A minimal `nft-lit fit` run folder: held-out avg@k before RL and after iteration 1."""
    run = root / f"algorithm={algorithm},seed={seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / "csv").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\nalgorithm: {{name: {algorithm}}}\neval: {{at_start: true}}\n"
    )
    (run / ".hydra" / "overrides.yaml").write_text(f"- algorithm={algorithm}\n- seed={seed}\n")
    with open(run / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", f"val/heldout/avg@{k}"])
        w.writerow([0, 0, before])
        w.writerow([0, 1, after])
    return run


def _sweep(root, finals: dict[str, list[float]]):
    for algorithm, values in finals.items():
        for seed, value in enumerate(values):
            _write_run(root, algorithm, seed, value)
    return root


def _row(table: str, start: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(start))


def test_probability_of_improvement_counts_ties_as_half():
    # pairs (x, y): (1, 2) loses, (1, 0) wins, (2, 2) ties, (2, 0) wins -> (0 + 1 + 0.5 + 1) / 4
    assert probability_of_improvement([1.0, 2.0], [2.0, 0.0]) == 0.625
    assert probability_of_improvement([3.0, 4.0], [1.0, 2.0, 2.5]) == 1.0
    assert probability_of_improvement([0.2, 0.4], [0.2, 0.4]) == 0.5
    # vectorised over leading axes, as scipy.stats.bootstrap calls it
    batched = probability_of_improvement(np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([[2.0, 0.0], [1.0, 1.0]]))
    assert batched.tolist() == [0.625, 0.0]


def test_the_seed_rules():
    assert separation_p_value(4, 4) == pytest.approx(2 / 70)  # complete separation, exact two-sided test
    assert separation_p_value(3, 3) == pytest.approx(0.1)
    assert separation_p_value(1, 1) == 1.0
    assert MIN_SEEDS == 4
    assert [pair_resolvable(n, n) for n in (2, 3, 4, 5)] == [False, False, True, True]
    assert pair_resolvable(3, 5) and not pair_resolvable(3, 4)  # 2/56 = 0.036, 2/35 = 0.057
    assert [mean_interval_informative(n) for n in (1, 2, 3, 4)] == [False, False, False, True]  # (1/3)^3 = 0.037
    # the observed P kept, the half-width toward 0.5 (0.3) shrinking as 1/sqrt(n): 4 * (0.3 / 0.25)^2 = 5.76
    assert projected_seeds(0.75, 0.45, 1.0, 4, 4) == 6
    assert projected_seeds(0.25, 0.0, 0.55, 4, 4) == 6  # the mirror image
    assert projected_seeds(1.0, 1.0, 1.0, 3, 3) == MIN_SEEDS  # separated, but 3 vs 3 cannot resolve
    assert projected_seeds(0.5, 0.2, 0.8, 4, 4) is None  # no difference to resolve


def test_compare_groups_takes_plain_numbers():
    stats = compare_groups(
        "m",
        {
            "a": ([0, 1, 2, 3], [0.60, 0.62, 0.65, 0.70]),
            "b": ([0, 1, 2, 3], [0.30, 0.35, 0.40, 0.45]),
            "c": ([7], [0.5]),
        },
        skipped=["d"],
    )
    assert [g.label for g in stats.groups] == ["a", "b", "c"] and stats.skipped == ["d"]
    assert [(p.x, p.y) for p in stats.pairs] == [("a", "b"), ("a", "c"), ("b", "c")]  # X before Y as given
    ab = stats.pairs[0]
    assert (ab.prob, ab.low, ab.high, ab.resolved) == (1.0, 1.0, 1.0, True)
    assert ab.verdict == "resolved at 95% (a better)" and ab.seeds_to_resolve is None
    c = stats.groups[2]
    assert (c.seeds, c.mean, c.low, c.high) == ([7], 0.5, None, None)
    assert c.note == "1 seed: no interval (need >= 4 seeds)"


def test_stats_is_a_leaf_of_numpy_scipy_and_the_standard_library():
    import ast
    import sys
    from pathlib import Path

    import nft_lit.stats

    tree = ast.parse(Path(nft_lit.stats.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    roots = {name.split(".")[0] for name in imported}
    assert roots <= {"numpy", "scipy", "__future__"} | set(sys.stdlib_module_names), roots


def test_a_group_beating_every_seed_of_another_resolves_with_four_seeds(tmp_path):
    nft = [0.60, 0.62, 0.65, 0.70]
    grpo = [0.30, 0.35, 0.40, 0.45]
    table, pngs = report([_sweep(tmp_path / "sweep", {"nft": nft, "grpo": grpo})], tmp_path / "out")

    pair = _row(table, "| algorithm=grpo vs algorithm=nft |")
    assert pair == (
        "| algorithm=grpo vs algorithm=nft | 4 vs 4 | 0.00 | [0.00, 0.00] "
        "| resolved at 95% (algorithm=nft better) | – |"
    )
    assert "percentile bootstrap" in table and "n_resamples=10000" in table and "default_rng(0)" in table

    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["method"]["name"] == "percentile bootstrap" and stats["method"]["n_resamples"] == 10_000
    assert stats["min_seeds_per_group"] == 4
    by_label = {g["label"]: g for g in stats["groups"]}
    for label, values in (("algorithm=nft", nft), ("algorithm=grpo", grpo)):
        g = by_label[label]
        assert g["values"] == values and g["seeds"] == [0, 1, 2, 3]
        assert g["mean"] == pytest.approx(sum(values) / 4)
        low, high = g["ci"]
        # 4 seeds: a resample of one seed repeated has mass 1/256 < 2.5%, so the ends lie inside the range
        assert min(values) < low < g["mean"] < high < max(values)
        assert g["note"] == ""
    (p,) = stats["pairs"]
    assert (p["x"], p["y"], p["p_x_better"], p["ci"]) == ("algorithm=grpo", "algorithm=nft", 0.0, [0.0, 0.0])
    assert p["resolved"] is True and p["seeds_per_group_to_resolve"] is None

    png = tmp_path / "out" / "seed_intervals.png"
    assert pngs[-1] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    # fixed seed: the same runs give the same report
    again, _ = report([tmp_path / "sweep"], tmp_path / "out2")
    assert again == table
    assert (tmp_path / "out2" / "stats.json").read_text() == (tmp_path / "out" / "stats.json").read_text()


def test_identical_groups_give_one_half_and_are_not_resolved(tmp_path):
    values = [0.2, 0.4, 0.6, 0.8]
    table, _ = report([_sweep(tmp_path / "sweep", {"nft": values, "rft": values})], tmp_path / "out")
    (p,) = json.loads((tmp_path / "out" / "stats.json").read_text())["pairs"]
    assert p["p_x_better"] == 0.5 and not p["resolved"] and p["verdict"] == "not resolved"
    low, high = p["ci"]
    assert low < 0.5 < high
    assert p["seeds_per_group_to_resolve"] is None
    assert _row(table, "| algorithm=nft vs algorithm=rft |").endswith("| not resolved | – (no difference seen) |")


def test_overlapping_groups_are_not_resolved_and_get_a_projection(tmp_path):
    a, b = [0.5, 0.6, 0.7, 0.8], [0.55, 0.65, 0.75, 0.85]
    report([_sweep(tmp_path / "sweep", {"nft": a, "rft": b})], tmp_path / "out")
    (p,) = json.loads((tmp_path / "out" / "stats.json").read_text())["pairs"]
    assert p["p_x_better"] == 6 / 16  # a beats b in 0 + 1 + 2 + 3 of the 16 pairs
    low, high = p["ci"]
    assert low < 0.5 < high and p["verdict"] == "not resolved"
    # the half-width toward 0.5 is high - P; 4 seeds x (that / |P - 0.5|)^2, and more than the 4 there are
    assert p["seeds_per_group_to_resolve"] == max(5, math.ceil(4 * ((high - 0.375) / 0.125) ** 2 - 1e-9))
    assert p["seeds_per_group_to_resolve"] > 4


def test_too_few_seeds_are_said_even_when_the_bootstrap_interval_excludes_one_half(tmp_path):
    nft, grpo = [0.6, 0.7, 0.8], [0.1, 0.2, 0.3]
    table, pngs = report([_sweep(tmp_path / "sweep", {"nft": nft, "grpo": grpo})], tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    (p,) = stats["pairs"]
    # every resample separates the groups: [0, 0] excludes 0.5, but 3 vs 3 seeds cannot resolve (p = 0.1)
    assert p["ci"] == [0.0, 0.0] and not p["resolved"] and p["verdict"] == "not resolved (too few seeds)"
    assert p["seeds_per_group_to_resolve"] == 4
    assert "even if every seed of one beat every seed of the other, an exact test gives p = 0.1" in p["note"]
    assert "(need >= 4 seeds per group)" in table
    for g in stats["groups"]:
        # 3 seeds: the interval is the range (up to the rounding of a mean of three equal values)
        assert g["ci"] == pytest.approx([min(g["values"]), max(g["values"])], abs=1e-15)
        assert g["note"] == "3 seeds: the interval is just the seeds' range (need >= 4 seeds)"
    assert "Seeds needed: at least 4 seeds per group" in table
    assert pngs[-1].name == "seed_intervals.png"


def test_one_seed_per_group_has_no_interval_and_no_interval_plot(tmp_path):
    table, pngs = report([_sweep(tmp_path / "sweep", {"nft": [0.9], "grpo": [0.1]})], tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert [(g["ci"], g["note"]) for g in stats["groups"]] == [(None, "1 seed: no interval (need >= 4 seeds)")] * 2
    (p,) = stats["pairs"]
    assert (p["p_x_better"], p["ci"], p["verdict"]) == (0.0, None, "not resolved (too few seeds)")
    assert _row(table, "| algorithm=nft | 1 | 90.0 | – |")
    assert "seed_intervals.png" not in {png.name for png in pngs}


def test_a_group_whose_seeds_all_agree_is_flagged(tmp_path):
    report([_sweep(tmp_path / "sweep", {"nft": [0.5] * 4, "grpo": [0.1, 0.2, 0.3, 0.4]})], tmp_path / "out")
    groups = {g["label"]: g for g in json.loads((tmp_path / "out" / "stats.json").read_text())["groups"]}
    assert groups["algorithm=nft"]["ci"] == [0.5, 0.5]
    assert groups["algorithm=nft"]["note"] == "all 4 seeds equal: the interval has width 0, the spread is unknown"


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (["step", "val/heldout/avg@4"], "has no 'epoch' column"),
        (["epoch", "step", "train/loss"], "logged no 'val/heldout/avg@k'"),
    ],
)
def test_report_command_names_a_missing_column_in_one_line(tmp_path, capsys, columns, message):
    run = _write_run(tmp_path, "nft", 0, 0.5)
    with open(run / "csv" / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([columns, [0] * len(columns)])
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nft-lit report: ") and message in err and str(run) in err


def test_report_command_names_a_missing_path_in_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"nft-lit report: {tmp_path / 'nowhere'} does not exist\n"
