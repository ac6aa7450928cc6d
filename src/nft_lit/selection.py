"""In-band selection files (``selection.jsonl``, written by ``python -m nft_lit.band``) and the data loader
that trains or evaluates on one part of them.

A data config's ``problems`` node: ``_target_: nft_lit.selection.selected_problems`` with the base set's node as
``problems``, the selection file (or its folder) and the ``part`` (``train`` | ``heldout``). Every error names
the file, the line and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nft_lit.data import Problem, ProblemSet, read_records

PARTS = ("train", "heldout")
SELECTION_FILE = "selection.jsonl"
SUMMARY_FILE = "summary.json"
_REPO_ROOT = Path(__file__).resolve().parents[2]


class SelectionError(ValueError):
    """A selection file (or its use) is wrong; the message names the file, line and field."""


def _resolve(path: str | os.PathLike[str]) -> Path:
    """``path`` as given when it exists (absolute, or relative to the working directory), else relative to
    the repository root (configs name ``.cache/nft-lit/band/...`` whatever directory a run starts in)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    in_repo = _REPO_ROOT / given
    return in_repo if in_repo.exists() else given


def read_selection(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``selection.jsonl``; a bad file fails naming the file, the line and the field."""
    file = _resolve(path)
    if file.is_dir():
        file = file / SELECTION_FILE
    if not file.is_file():
        raise SelectionError(
            f"selection file {file} does not exist; write it with `python -m nft_lit.band --out {file.parent}` "
            f"(the base model's in-band screen), or point the data config's `selection` at it"
        )
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    try:
        lines = list(read_records(file))  # malformed JSON and non-objects fail naming the file and line
    except ValueError as err:
        raise SelectionError(str(err)) from None
    for line_no, record in lines:
        where = f"{file}:{line_no}"
        qid = record.get("id")
        if not isinstance(qid, str) or not qid:
            raise SelectionError(f"{where}: field 'id': expected a non-empty string, got {qid!r}")
        part = record.get("part")
        if part not in PARTS:
            raise SelectionError(f"{where}: field 'part': expected one of {list(PARTS)}, got {part!r}")
        r_hat = record.get("r_hat")
        if isinstance(r_hat, bool) or not isinstance(r_hat, int | float) or not 0 <= r_hat <= 1:
            raise SelectionError(f"{where}: field 'r_hat': expected a number in [0, 1], got {r_hat!r}")
        if qid in seen:
            raise SelectionError(f"{where}: field 'id': {qid!r} is listed twice (first on line {seen[qid]})")
        seen[qid] = line_no
        records.append({**record, "_line": line_no})
    if not records:
        summary = file.with_name(SUMMARY_FILE)
        why = ""
        if summary.is_file():
            facts = json.loads(summary.read_text(encoding="utf-8"))
            why = (
                f": its screen found no question with 0 < r̂ < 1 ({facts.get('questions')} questions x "
                f"{facts.get('samples')}, pass rate {facts.get('pass_rate')}; {summary}), the set is out of the "
                f"model's band"
            )
        raise SelectionError(f"selection file {file} holds no questions{why}")
    return records


def selected_problems(
    problems: Sequence[Problem],
    selection: str | os.PathLike[str],
    part: str = "train",
    limit: int | None = None,
) -> ProblemSet:
    """The problems of ``problems`` whose ids ``selection`` lists under ``part``, in the selection's order.

    A data config's ``problems`` node: ``_target_: nft_lit.selection.selected_problems`` with the base set's node
    as ``problems`` (instantiated first by Hydra), the ``selection.jsonl`` file (or its folder) and ``part``
    (``train`` | ``heldout``). Fails, naming the file and line, on an id the base set does not hold (the
    selection was made on another set or split).
    """
    if part not in PARTS:
        raise ValueError(f"selected_problems: part must be one of {list(PARTS)}, got {part!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"selected_problems: limit must be a positive integer or null, got {limit}")
    base: dict[str, Problem] = {}
    for p in problems:
        if str(p.id) in base:
            raise SelectionError(f"selected_problems: the base problem set repeats id {p.id!r}; ids must be unique")
        base[str(p.id)] = p
    name = getattr(problems, "name", "problems")
    file = _resolve(selection)
    chosen: list[Problem] = []
    for record in read_selection(selection):
        if record["part"] != part:
            continue
        problem = base.get(record["id"])
        if problem is None:
            raise SelectionError(
                f"{file}:{record['_line']}: field 'id': {record['id']!r} is not in the base problem set {name} "
                f"({len(base)} problems); the selection was made on another data set or split"
            )
        chosen.append(problem)
        if limit is not None and len(chosen) >= limit:
            break
    if not chosen:
        raise SelectionError(f"selection file {file} has no question in part {part!r}")
    return ProblemSet(f"{name}[band:{part}]", tuple(chosen))
