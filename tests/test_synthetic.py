import hashlib
import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nft_lit.data import ProblemSet
from nft_lit.synthetic import (
    ALPHABET,
    HELDOUT_RESERVE,
    ArithmeticTask,
    arithmetic_problems,
    count_carries,
    is_heldout,
    sample_problems,
)
from nft_lit.word_problems import word_problems


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


def _digest(problems) -> str:
    rows = [[p.id, p.question, p.answer, p.source] for p in problems]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


# Hashes of the existing splits' draws, recorded before the validation split was added: adding it must not move a
# single train or held-out problem (the behaviour fingerprints and every reported number depend on them).
@pytest.mark.parametrize(
    ("kwargs", "name", "digest"),
    [
        ({"split": "heldout", "size": 500, "seed": 0}, "synthetic/add3x2/heldout", "dbd946ce1ad429b4"),  # demo test
        ({"split": "heldout", "size": 2000, "seed": 0}, "synthetic/add3x2/heldout", "d99ba19c09c998c4"),
        ({"split": "train", "size": 20000, "seed": 0}, "synthetic/add3x2/train", "3ac672a16d73d931"),  # demo RL
        (
            {"split": "train", "size": 20000, "seed": 0, "max_carries": 1},
            "synthetic/add3x2_c-1/train",
            "3057e4deb9b83bb7",
        ),
        (
            {"split": "heldout", "size": 500, "seed": 0, "min_carries": 2},
            "synthetic/add3x2_c2-/heldout",
            "f7cb8ce593fe0a71",
        ),
        ({"split": "train", "size": 300, "seed": 1, "digits": 2}, "synthetic/add2x2/train", "8158d698b18f02c6"),
    ],
)
def test_existing_splits_unchanged(kwargs, name, digest):
    problems = arithmetic_problems(**kwargs)
    assert problems.name == name
    assert _digest(problems) == digest


def test_word_problem_splits_unchanged_and_have_no_validation_split():
    assert _digest(word_problems(split="heldout", size=100)) == "1231dce77a9eed82"
    assert _digest(word_problems(split="train", size=500)) == "776876d254bdb1c6"
    with pytest.raises(ValueError, match="split"):
        word_problems(split="validation", size=10)


def test_heldout_draws_are_prefixes_of_longer_draws():
    """What the validation split rests on: a seed's held-out draw is one sequence, a size only cuts it."""
    long = arithmetic_problems(split="heldout", size=HELDOUT_RESERVE + 500, seed=0)
    for size in (1, 500, HELDOUT_RESERVE):
        assert list(arithmetic_problems(split="heldout", size=size, seed=0)) == list(long[:size])


def test_validation_is_the_heldout_draw_after_the_reserve():
    val = arithmetic_problems(split="validation", size=500, seed=0)
    long = arithmetic_problems(split="heldout", size=HELDOUT_RESERVE + 500, seed=0)
    assert val.name == "synthetic/add3x2/validation"
    assert [(p.question, p.answer) for p in val] == [(p.question, p.answer) for p in long[HELDOUT_RESERVE:]]
    assert [p.id for p in val] == [f"add3x2/validation/{i}" for i in range(500)]
    assert len({p.question for p in val}) == 500


def test_validation_disjoint_from_demo_test_set_and_from_training():
    val = {p.question for p in arithmetic_problems(split="validation", size=500, seed=0)}
    # the demo's held-out test set (configs/experiment/demo.yaml eval.heldout) and any test set up to the reserve
    assert not val & {p.question for p in arithmetic_problems(split="heldout", size=500, seed=0)}
    assert not val & {p.question for p in arithmetic_problems(split="heldout", size=HELDOUT_RESERVE, seed=0)}
    # training draws only from the train part of the hash partition, whatever the seed, size or carry bounds
    assert all(is_heldout(q, 0.1) for q in val)
    for seed in range(3):
        assert not val & {p.question for p in arithmetic_problems(split="train", size=20000, seed=seed)}
    assert not val & {p.question for p in arithmetic_problems(split="train", size=20000, seed=0, max_carries=1)}


def test_validation_deterministic_and_follows_carry_bounds():
    a = arithmetic_problems(split="validation", size=200, seed=3, min_carries=2)
    assert list(a) == list(arithmetic_problems(split="validation", size=200, seed=3, min_carries=2))
    assert list(a) != list(arithmetic_problems(split="validation", size=200, seed=4, min_carries=2))
    assert all(count_carries(tuple(_operands(p.question, "+")), "+", 3) >= 2 for p in a)
    # a longer validation draw extends a shorter one (the same sequence, cut later)
    assert list(arithmetic_problems(split="validation", size=100, seed=3, min_carries=2)) == list(a[:100])


def test_validation_bad_size_and_too_small_space_are_clear_errors():
    with pytest.raises(ValueError, match="size"):
        arithmetic_problems(split="validation", size=0)
    with pytest.raises(ValueError, match="distinct heldout"):
        arithmetic_problems(split="validation", size=50, digits=2)
