import re
import string

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nft_lit.data import ProblemSet
from nft_lit.word_problems import ITEMS, NAMES, TEMPLATES, word_problems

CONFIG = OmegaConf.load("configs/data/synthetic_words.yaml")


def _template_regex(template: str) -> re.Pattern[str]:
    """The template as a regex: names/pronouns/items as alternatives, numbers as groups a and b."""
    fields = {
        "name": "(?:" + "|".join(n for n, _ in NAMES) + ")",
        "pronoun": "(?:She|He)",
        "item": "(?:" + "|".join(ITEMS) + ")",
        "a": r"(?P<a>\d+)",
        "b": r"(?P<b>\d+)",
    }
    pattern = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal) + (fields[field] if field is not None else "")
    return re.compile(pattern + "$")


def _operation_and_operands(question: str) -> tuple[str, int, int]:
    matches = [
        (op, m) for op, templates in TEMPLATES.items() for t in templates if (m := _template_regex(t).match(question))
    ]
    assert len(matches) == 1, f"question matches {len(matches)} templates: {question}"
    op, m = matches[0]
    return op, int(m["a"]), int(m["b"])


@pytest.mark.parametrize("operations", [("+",), ("-",), ("+", "-")])
def test_every_question_is_one_template_with_its_exact_answer(operations):
    problems = word_problems(size=400, seed=3, operations=operations, max_operand=12)
    assert isinstance(problems, ProblemSet) and len(problems) == 400
    seen_ops = set()
    for p in problems:
        op, a, b = _operation_and_operands(p.question)
        seen_ops.add(op)
        assert 1 <= b <= 12 and 1 <= a <= 12
        assert p.answer == str(a + b if op == "+" else a - b)
        assert int(p.answer) >= 0
    assert seen_ops == set(operations)


def test_deterministic_distinct_and_ids_stable_across_sizes():
    small, large = word_problems(size=50, seed=1), word_problems(size=500, seed=1)
    assert list(small) == list(large[:50])  # a selection made on a small set names the same problems later
    assert len({p.question for p in large}) == 500 and len({p.id for p in large}) == 500
    assert [p.question for p in word_problems(size=50, seed=2)] != [p.question for p in small]


def test_heldout_never_overlaps_train_whatever_the_seed():
    held = {p.question for p in word_problems(split="heldout", size=300, seed=0)}
    for seed in (0, 1, 2):
        assert not held & {p.question for p in word_problems(split="train", size=1500, seed=seed)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "test"}, r"split must be one of \('train', 'heldout'\), got 'test'"),
        ({"operations": ["*"]}, r"operations must be a non-empty subset"),
        ({"max_operand": 1}, r"max_operand must be >= 2, got 1"),
        ({"heldout_fraction": 1.0}, r"heldout_fraction must be in \(0, 1\)"),
        ({"size": 0}, r"size must be >= 1"),
        ({"size": 5000, "operations": ["-"], "max_operand": 2}, r"fewer than 5000 distinct train questions"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        word_problems(**kwargs)


def test_data_config_instantiates_the_generator():
    problems = instantiate(CONFIG.problems)
    assert len(problems) == CONFIG.problems.size and problems.name == "synthetic/words_addsub10/train"
    assert CONFIG.name == "synthetic_words"  # the config's file name, as every data config
