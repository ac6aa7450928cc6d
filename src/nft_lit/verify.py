"""`nft-lit verify IN.jsonl OUT.jsonl`: re-grade (response, gold) pairs with the training verifiers.

A front end over ``reward`` (the verifiers) and ``data`` (the record reader), kept apart from both so that
neither imports the other's command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from nft_lit.data import read_records
from nft_lit.reward import ExactMatchVerifier, MathVerifier


def _read_pairs(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    records = []
    for line_no, record in read_records(Path(path)):
        for key in ("response", "gold"):
            if key not in record:
                raise ValueError(f"{path}:{line_no}: missing field '{key}'")
            if not isinstance(record[key], str):
                raise ValueError(
                    f"{path}:{line_no}: field '{key}' must be a string, got "
                    f"{type(record[key]).__name__} ({record[key]!r:.40})"
                )
        if not isinstance(record.get("truncated", False), bool):
            raise ValueError(f"{path}:{line_no}: field 'truncated' must be true or false when present")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: empty file (expected one JSON object per line with 'response' and 'gold')")
    return records


def verify_command(argv: list[str]) -> int:
    """``nft-lit verify IN.jsonl OUT.jsonl``: re-grade (response, gold) pairs, writing ``reward`` per line."""
    parser = argparse.ArgumentParser(
        prog="nft-lit verify",
        description="Score each line's 'response' against its 'gold' answer (optional 'truncated': true scores "
        "0). Writes the input lines, in order, with 'reward' (0 or 1) added.",
    )
    parser.add_argument("input", help="jsonl file, one object per line with 'response' and 'gold' strings")
    parser.add_argument("output", help="jsonl file to write")
    parser.add_argument("--workers", type=int, default=2, help="math-verify worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per answer (default 5)")
    parser.add_argument("--strict-box", action="store_true", help="only accept a \\boxed{} near the end")
    parser.add_argument("--strict-box-tail-chars", type=int, default=300, help="tail length for --strict-box")
    parser.add_argument("--exact", action="store_true", help="exact string match instead of math-verify")
    args = parser.parse_args(argv)
    try:
        out_dir = Path(args.output).resolve().parent
        if not out_dir.is_dir():  # checked before grading, which can take minutes
            raise ValueError(f"{args.output}: the output folder {out_dir} does not exist")
        records = _read_pairs(args.input)
        verifier = (
            ExactMatchVerifier()
            if args.exact
            else MathVerifier(args.workers, args.timeout, args.strict_box, args.strict_box_tail_chars)
        )
    except ValueError as exc:
        print(f"nft-lit verify: {exc}", file=sys.stderr)
        return 2
    with verifier:
        result = verifier.score(
            [r["response"] for r in records],
            [r["gold"] for r in records],
            [r.get("truncated", False) for r in records],
        )
    with open(args.output, "w", encoding="utf-8") as handle:
        for record, reward in zip(records, result.rewards, strict=True):
            handle.write(json.dumps({**record, "reward": int(reward)}, ensure_ascii=False) + "\n")
    summary = ", ".join(f"{key} {value:g}" for key, value in result.stats.items())
    mean = sum(result.rewards) / len(result.rewards)
    print(f"nft-lit verify: {len(records)} lines, mean reward {mean:.4f} ({summary})", file=sys.stderr)
    return 0
