"""Verifications per second of MathVerifier on real MATH500 answers (target >= 300/s on 2 CPU cores).

Builds N (response, gold) pairs from MATH500: each response is the problem's reference solution with its
final \\boxed{} replaced by either the gold answer in another form (decimal for a fraction, thousands
separators, "x = ...", \\dfrac, units text) or a wrong answer (another problem's answer, or the number +1).
Prints verifications/s and the accuracy on each half (correct forms should score 1, wrong ones 0).

    .venv/bin/python bench/verify_throughput.py [--pairs 2000] [--workers 2] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import time
from pathlib import Path

from common import meta, write_json

from nft_lit.answers import extract_boxed
from nft_lit.data import load_problems
from nft_lit.reward import MathVerifier

_INT = re.compile(r"-?\d+")
_FRAC = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}")


def other_form(answer: str, rng: random.Random) -> str:
    """The same value written differently; falls back to an assignment "x = answer"."""
    forms = []
    if _INT.fullmatch(answer):
        value = int(answer)
        forms += [f"{value}.0", f"{answer}\\text{{ units}}", f"x = {answer}"]
        if abs(value) >= 1000:
            forms.append(f"{value:,}".replace(",", "{,}"))
    match = _FRAC.fullmatch(answer)
    if match:
        sign, num, den = match.groups()
        forms += [f"{sign}\\dfrac{{{num}}}{{{den}}}", f"{sign}{num}/{den}"]
        if 10**6 % int(den) == 0:
            forms.append(f"{int(sign + num) / int(den):g}")
    if "\\frac" in answer:
        forms.append(answer.replace("\\frac", "\\dfrac"))
    if not forms:
        forms.append(f"x = {answer}" if "=" not in answer and "," not in answer else answer.replace(" ", ""))
    return rng.choice(forms)


def wrong_answer(answer: str, others: list[str], rng: random.Random) -> str:
    if _INT.fullmatch(answer) and rng.random() < 0.5:
        return str(int(answer) + 1)
    while True:
        other = rng.choice(others)
        if other.replace(" ", "") != answer.replace(" ", ""):
            return other


def build_pairs(num_pairs: int, data_dir: str | None, seed: int = 0) -> tuple[list[str], list[str], list[int]]:
    """(responses, golds, expected rewards); half correct in another form, half wrong."""
    import json
    from pathlib import Path

    from nft_lit.data import resolve_data_dir

    rng = random.Random(seed)
    problems = load_problems("math500", data_dir=data_dir)
    path = Path(resolve_data_dir(data_dir)) / "math500" / "test.jsonl"
    solutions = [json.loads(line)["solution"] for line in path.read_text().splitlines() if line.strip()]
    answers = [p.answer for p in problems]
    responses, golds, expected = [], [], []
    for k in range(num_pairs):
        i = k % len(problems)
        correct = k % 2 == 0
        pred = other_form(answers[i], rng) if correct else wrong_answer(answers[i], answers, rng)
        solution = solutions[i]
        # The solution's own final box is replaced, so the verifier sees only the constructed answer.
        body = solution[: solution.rfind("\\boxed")] if extract_boxed(solution) else solution
        responses.append(f"{body}\n\nThe final answer is $\\boxed{{{pred}}}$.")
        golds.append(answers[i])
        expected.append(int(correct))
    return responses, golds, expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-fast-path", action="store_true", help="send every pair to math-verify")
    parser.add_argument("--quick", action="store_true", help="200 pairs (harness check)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/verify_throughput.json"))
    args = parser.parse_args()
    if args.quick:
        args.pairs = 200
    responses, golds, expected = build_pairs(args.pairs, args.data_dir)
    with MathVerifier(args.workers, args.timeout, local_fast_path=not args.no_fast_path) as verifier:
        verifier.score(responses[:8], golds[:8], [False] * 8)  # workers started and warm
        start = time.perf_counter()
        result = verifier.score(responses, golds, [False] * len(responses))
        seconds = time.perf_counter() - start
    # CPU seconds of the (now reaped) workers: a throughput figure that other load on the machine does not skew.
    worker_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu_s = worker_cpu.ru_utime + worker_cpu.ru_stime
    hits = [r == e for r, e in zip(result.rewards, expected, strict=True)]
    correct_acc = sum(h for h, e in zip(hits, expected, strict=True) if e) / max(1, sum(expected))
    wrong_acc = sum(h for h, e in zip(hits, expected, strict=True) if not e) / max(1, len(expected) - sum(expected))
    print(f"pairs {len(responses)}  workers {args.workers}  seconds {seconds:.2f}")
    print(f"verifications/s {len(responses) / seconds:.1f}  (target >= 300)")
    print(f"other-form answers scored 1: {correct_acc:.3f}   wrong answers scored 0: {wrong_acc:.3f}")
    sent = len(responses) - result.stats["fast_path"]
    print(f"sent to math-verify {sent:g}; worker CPU {worker_cpu_s:.2f} s (incl. start-up and warm-up batch)")
    per_cpu_s = len(responses) / worker_cpu_s
    print(f"verifications per worker CPU-second {per_cpu_s:.1f}; load average {os.getloadavg()[0]:.2f}")
    print("stats " + ", ".join(f"{k} {v:g}" for k, v in result.stats.items()))
    write_json(
        args.out,
        {
            "meta": meta(workers=args.workers, pairs=len(responses), load_average=os.getloadavg()[0]),
            "verifications_per_s": len(responses) / seconds,
            "verifications_per_worker_cpu_s": per_cpu_s,
            "other_form_scored_1": correct_acc,
            "wrong_scored_0": wrong_acc,
            "sent_to_math_verify": sent,
            "stats": result.stats,
        },
    )


if __name__ == "__main__":
    main()
