"""Generated one-step arithmetic word problems in natural language.

The fallback base set for a small pretrained model that is out of band on every shipped data set
(``experiment=smollm2_math``: SmolLM2-135M-Instruct answers almost no GSM8K question right, see that config's
header): short stories such as *"Mia has 7 marbles. She finds 5 more marbles. How many marbles does Mia have
now?"* with an integer answer that math-verify scores like any other data set's.

Each question is one addition or subtraction (the larger operand first, so answers are non-negative), in one of a
few story templates with a name and an object, so the model must read the story to find the operation.
Numbers are small by default (operands ``1..max_operand``): the point is a task inside the band of a 135M
model, where learning is visible in 20 iterations, not a benchmark.

Splits follow :mod:`nft_lit.synthetic`: a question is held out iff a fixed hash of its text falls below
``heldout_fraction``, so no seed or size makes the splits overlap. Ids are content hashes, so a selection file
made from one ``size`` still names the same problems when the set is regenerated with another.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from nft_lit.data import Problem, ProblemSet
from nft_lit.synthetic import draw_split

OPERATIONS = ("+", "-")

# (name, subject pronoun): the stories refer back to the person.
NAMES = (
    ("Mia", "She"), ("Liam", "He"), ("Ava", "She"), ("Noah", "He"), ("Zoe", "She"), ("Omar", "He"),
    ("Sara", "She"), ("Ben", "He"), ("Lena", "She"), ("Kai", "He"), ("Rosa", "She"), ("Tom", "He"),
)  # fmt: skip
ITEMS = (
    "apples", "marbles", "stickers", "pencils", "books", "cookies", "shells", "coins", "cards", "balloons",
    "stamps", "crayons",
)  # fmt: skip

# Templates by operation; fields: name, pronoun, item, a, b. Each asks one question whose answer is a + b or a - b.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "{name} has {a} {item}. {pronoun} finds {b} more {item}. How many {item} does {name} have now?",
        "{name} had {a} {item}. A friend gave {name} {b} {item}. How many {item} does {name} have now?",
        "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in all?",
        "{name} bought {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {name} buy?",
    ),
    "-": (
        "{name} has {a} {item}. {pronoun} gives away {b} of them. How many {item} does {name} have left?",
        "{name} had {a} {item} and lost {b} of them. How many {item} does {name} have now?",
        "There were {a} {item} in a jar. {name} took {b} of them. How many {item} are left in the jar?",
        "{name} needs {a} {item} and already has {b}. How many more {item} does {name} need?",
    ),
}


@dataclass(frozen=True)
class WordProblemTask:
    """One distribution of word problems.

    Attributes:
        operations: which operations to draw from (uniformly), a subset of ``("+", "-")``.
        max_operand: operands are uniform in ``[1, max_operand]``; for ``-`` the larger comes first.
        heldout_fraction: share of the question space reserved for held-out evaluation.
    """

    operations: tuple[str, ...] = OPERATIONS
    max_operand: int = 10
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not self.operations or any(op not in OPERATIONS for op in self.operations):
            raise ValueError(
                f"word problems: operations must be a non-empty subset of {OPERATIONS}, got {self.operations!r}"
            )
        if self.max_operand < 2:
            raise ValueError(f"word problems: max_operand must be >= 2, got {self.max_operand}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"word problems: heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    @property
    def name(self) -> str:
        ops = "".join({"+": "add", "-": "sub"}[op] for op in self.operations)
        return f"words_{ops}{self.max_operand}"

    def draw(self, rng: random.Random) -> tuple[str, str]:
        """One (question, answer) pair."""
        operation = rng.choice(self.operations)
        a, b = rng.randint(1, self.max_operand), rng.randint(1, self.max_operand)
        if operation == "-":
            a, b = max(a, b), min(a, b)
        name, pronoun = rng.choice(NAMES)
        question = rng.choice(TEMPLATES[operation]).format(name=name, pronoun=pronoun, item=rng.choice(ITEMS), a=a, b=b)
        return question, str(a + b if operation == "+" else a - b)


def word_problems(
    split: str = "train",
    size: int = 1000,
    seed: int = 0,
    operations: tuple[str, ...] | list[str] = OPERATIONS,
    max_operand: int = 10,
    heldout_fraction: float = 0.1,
) -> ProblemSet:
    """Hydra/Python entry point: ``size`` distinct word problems of ``split``, deterministic in the arguments."""
    task = WordProblemTask(tuple(operations), max_operand, heldout_fraction)
    rng_key, what = f"{task.name}/{split}/{seed}", f"word problems {task.name}"
    pairs = draw_split(task.draw, split, size, rng_key, heldout_fraction, what, "raise max_operand")
    problems = tuple(
        Problem(id=f"{task.name}/{_digest(q)}", question=q, answer=a, source=f"synthetic/{task.name}") for q, a in pairs
    )
    return ProblemSet(f"synthetic/{task.name}/{split}", problems)


def _digest(question: str) -> str:
    return hashlib.blake2b(question.encode(), digest_size=6).hexdigest()
