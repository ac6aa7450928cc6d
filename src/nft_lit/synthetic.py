"""Synthetic arithmetic task for the CPU demo and the tests.

Questions are column arithmetic on zero-padded operands (``"045+123="``) with exact integer answers
(``"168"``), so a character tokenizer over :data:`ALPHABET` covers every prompt and answer and an exact-match
verifier is a binary reward in the paper's sense (Sec. 2: r ∈ {0, 1} from a verifier, no labels in RL).

Difficulty is controlled by the number of digits, the operation, the number of operands and the number of
carries (borrows for subtraction) that column arithmetic needs. The carry bounds give an *easier*
distribution of the same format (for the SFT warm-up) and a *harder* one (for label-free RL), as
docs/RESULTS.md uses them.

Held-out problems never appear in a training split, whatever the seeds and sizes: a problem belongs to the
held-out part of the space iff a fixed hash of its question falls below ``heldout_fraction``; the split
argument only chooses which part is sampled.

A third split, ``validation``, is for model selection (learning rates, ...) without touching the test problems:
the held-out-part problems that the seed's held-out draw yields *after* its first :data:`HELDOUT_RESERVE`. The
held-out draw of a seed is one fixed sequence of distinct questions and a draw of ``size`` stops after its first
``size`` of them, so ``heldout`` of any size <= :data:`HELDOUT_RESERVE` is a prefix of that sequence and
``validation`` (same seed) a later, disjoint stretch of it; both lie in the held-out part, so neither meets a
training problem. The train and held-out draws are unchanged by it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from nft_lit.data import Problem, ProblemSet

ALPHABET = "0123456789+-*="
"""Every character a synthetic question or answer can contain (EOS is the tokenizer's own token)."""

OPERATIONS = ("+", "-", "*")
SPLITS = ("train", "heldout")
ARITHMETIC_SPLITS = (*SPLITS, "validation")
HELDOUT_RESERVE = 1000
"""Problems at the start of each seed's held-out draw kept for test sets: ``validation`` starts after them, so it is
disjoint from every ``heldout`` set of the same seed and at most this size (the demo's test set: seed 0, 500)."""
_HASH_BUCKETS = 1_000_000


@dataclass(frozen=True)
class ArithmeticTask:
    """One distribution of arithmetic problems.

    Attributes:
        digits: digits per operand; operands are uniform in ``[0, 10**digits)`` and written zero-padded.
        operation: ``"+"``, ``"-"`` (two operands, larger first, so answers are non-negative) or ``"*"``.
        num_operands: operands per question (>= 2).
        min_carries / max_carries: bounds on the number of column carries (``+``) or borrows (``-``) the
            problem needs; ``None`` = unbounded. Not defined for ``*``.
        heldout_fraction: share of the problem space reserved for held-out evaluation.
    """

    digits: int = 3
    operation: str = "+"
    num_operands: int = 2
    min_carries: int | None = None
    max_carries: int | None = None
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 9:
            raise ValueError(f"ArithmeticTask.digits must be in [1, 9], got {self.digits}")
        if self.operation not in OPERATIONS:
            raise ValueError(f"ArithmeticTask.operation must be one of {OPERATIONS}, got {self.operation!r}")
        if self.num_operands < 2:
            raise ValueError(f"ArithmeticTask.num_operands must be >= 2, got {self.num_operands}")
        if self.operation == "-" and self.num_operands != 2:
            raise ValueError("ArithmeticTask.operation '-' needs num_operands=2 (answers stay non-negative)")
        bounded = self.min_carries is not None or self.max_carries is not None
        if bounded and self.operation == "*":
            raise ValueError("ArithmeticTask.min_carries/max_carries are defined for '+' and '-' only")
        for name in ("min_carries", "max_carries"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"ArithmeticTask.{name} must be >= 0 or None, got {value}")
        if self.min_carries is not None and self.max_carries is not None and self.min_carries > self.max_carries:
            raise ValueError(f"ArithmeticTask.min_carries ({self.min_carries}) > max_carries ({self.max_carries})")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"ArithmeticTask.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    @property
    def name(self) -> str:
        op = {"+": "add", "-": "sub", "*": "mul"}[self.operation]
        name = f"{op}{self.digits}x{self.num_operands}"
        if self.min_carries is not None or self.max_carries is not None:
            lo = "" if self.min_carries is None else self.min_carries
            hi = "" if self.max_carries is None else self.max_carries
            name += f"_c{lo}-{hi}"
        return name

    def question(self, operands: tuple[int, ...]) -> str:
        return self.operation.join(f"{x:0{self.digits}d}" for x in operands) + "="

    def answer(self, operands: tuple[int, ...]) -> str:
        if self.operation == "+":
            return str(sum(operands))
        if self.operation == "-":
            return str(operands[0] - operands[1])
        product = 1
        for x in operands:
            product *= x
        return str(product)

    def accepts(self, operands: tuple[int, ...]) -> bool:
        if self.min_carries is None and self.max_carries is None:
            return True
        n = count_carries(operands, self.operation, self.digits)
        return (self.min_carries is None or n >= self.min_carries) and (
            self.max_carries is None or n <= self.max_carries
        )

    def draw(self, rng: random.Random) -> tuple[int, ...]:
        operands = tuple(rng.randrange(10**self.digits) for _ in range(self.num_operands))
        if self.operation == "-":
            operands = tuple(sorted(operands, reverse=True))
        return operands


def count_carries(operands: tuple[int, ...], operation: str, digits: int) -> int:
    """Columns (right to left) that produce a carry (``+``) or need a borrow (``-``)."""
    carries, carry = 0, 0
    for i in range(digits):
        column = [(x // 10**i) % 10 for x in operands]
        if operation == "+":
            carry = (sum(column) + carry) // 10
            carries += carry > 0
        elif operation == "-":
            borrow = column[0] - column[1] - carry < 0
            carry = int(borrow)
            carries += borrow
        else:
            raise ValueError(f"count_carries: operation must be '+' or '-', got {operation!r}")
    return carries


def is_heldout(question: str, heldout_fraction: float) -> bool:
    """Fixed partition of the problem space: independent of every seed, so splits never overlap."""
    digest = hashlib.blake2b(question.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _HASH_BUCKETS < heldout_fraction * _HASH_BUCKETS


def draw_split(
    draw: Callable[[random.Random], tuple[str, str] | None],
    split: str,
    size: int,
    rng_key: str,
    heldout_fraction: float,
    what: str,
    hint: str,
) -> list[tuple[str, str]]:
    """``size`` distinct (question, answer) pairs from ``draw`` whose questions lie in ``split``'s part of the
    space (:func:`is_heldout`), deterministic in ``rng_key`` (the seed string of the draws); ``draw`` returns
    None to reject a draw. ``what`` names the set in errors.

    Rejection sampling; the budget only trips when the (filtered) split has fewer distinct questions than asked
    for, which is a configuration error rather than bad luck: the error says so, with ``hint``.
    """
    if split not in SPLITS:
        raise ValueError(f"{what}: split must be one of {SPLITS}, got {split!r}")
    if size < 1:
        raise ValueError(f"{what}: size must be >= 1, got {size}")
    rng = random.Random(rng_key)
    want_heldout = split == "heldout"
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    budget = 200 * size + 10_000
    while len(pairs) < size:
        budget -= 1
        if budget < 0:
            raise ValueError(
                f"{what}: fewer than {size} distinct {split} questions (found {len(pairs)}): lower size, or {hint}"
            )
        pair = draw(rng)
        if pair is None or pair[0] in seen or is_heldout(pair[0], heldout_fraction) != want_heldout:
            continue
        seen.add(pair[0])
        pairs.append(pair)
    return pairs


def sample_problems(task: ArithmeticTask, split: str, size: int, seed: int) -> list[Problem]:
    """``size`` distinct problems of ``task`` from ``split``, deterministic in ``(task, split, size, seed)``.

    ``validation``: problems ``HELDOUT_RESERVE .. HELDOUT_RESERVE + size - 1`` of the seed's held-out draw (module
    doc), so never in a training split nor in a ``heldout`` set of the same seed of size <= ``HELDOUT_RESERVE``.
    """

    def draw(rng: random.Random) -> tuple[str, str] | None:
        operands = task.draw(rng)
        return (task.question(operands), task.answer(operands)) if task.accepts(operands) else None

    what, hint = f"synthetic task {task.name}", "raise digits/heldout_fraction"
    if split == "validation":
        if size < 1:
            raise ValueError(f"{what}: size must be >= 1, got {size}")
        rng_key = f"{task.name}/heldout/{seed}"  # the held-out draw itself, continued past the reserved prefix
        pairs = draw_split(draw, "heldout", HELDOUT_RESERVE + size, rng_key, task.heldout_fraction, what, hint)
        pairs = pairs[HELDOUT_RESERVE:]
    elif split in SPLITS:
        rng_key = f"{task.name}/{split}/{seed}"
        pairs = draw_split(draw, split, size, rng_key, task.heldout_fraction, what, hint)
    else:
        raise ValueError(f"{what}: split must be one of {ARITHMETIC_SPLITS}, got {split!r}")
    return [
        Problem(id=f"{task.name}/{split}/{i}", question=q, answer=a, source=f"synthetic/{task.name}")
        for i, (q, a) in enumerate(pairs)
    ]


def arithmetic_problems(
    split: str = "train",
    size: int = 10_000,
    seed: int = 0,
    digits: int = 3,
    operation: str = "+",
    num_operands: int = 2,
    min_carries: int | None = None,
    max_carries: int | None = None,
    heldout_fraction: float = 0.1,
) -> ProblemSet:
    """Hydra/Python entry point: a :class:`ProblemSet` of synthetic arithmetic problems (see module doc)."""
    task = ArithmeticTask(
        digits=digits,
        operation=operation,
        num_operands=num_operands,
        min_carries=min_carries,
        max_carries=max_carries,
        heldout_fraction=heldout_fraction,
    )
    return ProblemSet(f"synthetic/{task.name}/{split}", tuple(sample_problems(task, split, size, seed)))
