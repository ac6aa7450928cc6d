from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nft_lit.data import ProblemSet
from nft_lit.synthetic import ALPHABET, ArithmeticTask, arithmetic_problems, count_carries, sample_problems


def _operands(question: str, op: str) -> list[int]:
    return [int(x) for x in question.rstrip("=").split(op)]


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_answers_are_exact_and_questions_zero_padded(op):
    problems = arithmetic_problems(split="train", size=200, seed=1, digits=3, operation=op)
    assert len(problems) == 200
    for p in problems:
        xs = _operands(p.question, op)
        assert all(len(s) == 3 for s in p.question.rstrip("=").split(op))
        expected = xs[0] + xs[1] if op == "+" else xs[0] - xs[1] if op == "-" else xs[0] * xs[1]
        assert p.answer == str(expected)
        assert int(p.answer) >= 0
        assert set(p.question + p.answer) <= set(ALPHABET)
        assert p.source == "synthetic/" + ArithmeticTask(operation=op).name


def test_deterministic_by_seed_and_distinct():
    a = arithmetic_problems(size=300, seed=7)
    b = arithmetic_problems(size=300, seed=7)
    c = arithmetic_problems(size=300, seed=8)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    assert len({p.question for p in a}) == 300
    assert len({p.id for p in a}) == 300


def test_heldout_disjoint_from_train_across_seeds():
    held = {p.question for p in arithmetic_problems(split="heldout", size=500, seed=0, digits=2)}
    for seed in range(3):
        train = {p.question for p in arithmetic_problems(split="train", size=5000, seed=seed, digits=2)}
        assert not held & train


def test_carry_bounds_and_counting():
    assert count_carries((45, 123), "+", 3) == 0
    assert count_carries((999, 1), "+", 3) == 3
    assert count_carries((100, 1), "-", 3) == 2
    easy = sample_problems(ArithmeticTask(max_carries=1), "train", 300, seed=0)
    hard = sample_problems(ArithmeticTask(min_carries=2), "train", 300, seed=0)
    assert all(count_carries(tuple(_operands(p.question, "+")), "+", 3) <= 1 for p in easy)
    assert all(count_carries(tuple(_operands(p.question, "+")), "+", 3) >= 2 for p in hard)


def test_more_operands():
    problems = arithmetic_problems(size=50, digits=2, num_operands=3)
    for p in problems:
        assert sum(_operands(p.question, "+")) == int(p.answer)
        assert len(p.question) == 3 * 2 + 2 + 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"operation": "/"}, "operation"),
        ({"digits": 0}, "digits"),
        ({"num_operands": 1}, "num_operands"),
        ({"operation": "-", "num_operands": 3}, "num_operands=2"),
        ({"operation": "*", "max_carries": 1}, "carries"),
        ({"min_carries": 2, "max_carries": 1}, "min_carries"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"split": "test"}, "split"),
        ({"size": 0}, "size"),
    ],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        arithmetic_problems(**{"size": 10, **kwargs})


def test_too_small_space_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than 50 distinct heldout"):
        arithmetic_problems(split="heldout", size=50, digits=1)


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[1] / "configs" / "data").glob("synthetic_add*.yaml")),
    ids=lambda p: p.stem,
)
def test_synthetic_data_configs_instantiate(path):
    cfg = OmegaConf.load(path)
    cfg.problems.size = 50
    problems = instantiate(cfg.problems)
    assert isinstance(problems, ProblemSet) and len(problems) == 50
    assert cfg.name == path.stem
    for p in problems:  # zero-padded operands: every question of a config has the same length
        assert len(p.question) == len(problems[0].question)
