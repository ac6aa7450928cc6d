"""Question sets: one ``Problem`` record type and loaders for the offline files in ``../shared/data``.

Each set stores its gold answer differently (see ``shared/data/README.md``); the loaders turn all of them into
a plain answer string that ``nft_lit.reward`` verifiers compare against. A data config
(``configs/data/<name>.yaml``) instantiates ``load_problems`` under its ``problems:`` key.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from nft_lit.answers import extract_boxed

__all__ = ["DATASETS", "Problem", "ProblemSet", "load_problems", "resolve_data_dir"]

_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer (a LaTeX/plain string) and where it came from."""

    id: str
    question: str
    answer: str
    source: str


@dataclass(frozen=True)
class ProblemSet(Sequence[Problem]):
    """An ordered, named collection of problems (e.g. ``math500/test``)."""

    name: str
    problems: tuple[Problem, ...]

    def __len__(self) -> int:
        return len(self.problems)

    @overload
    def __getitem__(self, index: int) -> Problem: ...
    @overload
    def __getitem__(self, index: slice) -> ProblemSet: ...
    def __getitem__(self, index: int | slice) -> Problem | ProblemSet:
        if isinstance(index, slice):
            return ProblemSet(self.name, self.problems[index])
        return self.problems[index]

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


class _FieldError(ValueError):
    """A record lacks a field or has the wrong type; the loader adds file and line."""

    def __init__(self, field: str, expected: str, record: dict[str, Any]) -> None:
        got = "missing" if field not in record else f"got {type(record[field]).__name__} {record[field]!r:.60}"
        super().__init__(f"field '{field}': expected {expected}, {got}")


class _EmptyAnswer(ValueError):
    """The record's gold answer is an empty string (two MATH train records have ``\\boxed{}``)."""


def _str_field(record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise _FieldError(field, "a non-empty string", record)
    if not value.strip():
        if field == "answer":
            raise _EmptyAnswer(field)
        raise _FieldError(field, "a non-empty string", record)
    return value.strip()


def _question(record: dict[str, Any]) -> str:
    return _str_field(record, "problem" if "problem" in record else "question")


# Each parser maps one raw record to (question, answer, id or None when the set has no ids).
def _parse_math(record: dict[str, Any]) -> tuple[str, str, str | None]:
    return _question(record), _str_field(record, "answer"), _str_field(record, "unique_id")


def _parse_plain(record: dict[str, Any]) -> tuple[str, str, str | None]:
    raw_id = record.get("id")
    return _question(record), _str_field(record, "answer"), None if raw_id is None else str(raw_id)


def _parse_amc(record: dict[str, Any]) -> tuple[str, str, str | None]:
    # amc23 stores answers as floats (27.0); every one is an integer, written without the ".0".
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int | float | str):
        raise _FieldError("answer", "a number or string", record)
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return _question(record), str(answer).strip(), str(record.get("id", "")) or None


def _parse_gsm8k(record: dict[str, Any]) -> tuple[str, str, str | None]:
    solution = _str_field(record, "answer")
    if "####" not in solution:
        raise _FieldError("answer", "a solution ending in '#### <number>'", record)
    # "1,080" -> "1080": the gold is a plain number; thousands separators are presentation.
    return _str_field(record, "question"), solution.rsplit("####", 1)[1].strip().replace(",", ""), None


def _parse_minerva(record: dict[str, Any]) -> tuple[str, str, str | None]:
    answer = extract_boxed(_str_field(record, "solution"))
    if answer is None or not answer.strip():
        raise _FieldError("solution", "a solution with a final \\boxed{...}", record)
    return _question(record), answer.strip(), str(record["idx"]) if "idx" in record else None


def _parse_olympiad(record: dict[str, Any]) -> tuple[str, str, str | None]:
    final = record.get("final_answer")
    if not isinstance(final, list) or not final or not all(isinstance(a, str) for a in final):
        raise _FieldError("final_answer", "a non-empty list of strings", record)
    # "$69$,$84$" -> "69,84": the math delimiters are not part of the answer.
    answer = ",".join(a.replace("$", "").strip() for a in final)
    question = _str_field(record, "question")
    context = record.get("context")
    if isinstance(context, str) and context.strip():
        question = f"{context.strip()}\n\n{question}"
    return question, answer, str(record.get("id", "")) or None


def _parse_dapo(record: dict[str, Any]) -> tuple[str, str, str | None]:
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        question = prompt.strip()
    elif isinstance(prompt, list | tuple) and prompt and isinstance(prompt[-1], dict):
        question = str(prompt[-1].get("content", "")).strip()
    else:
        raise _FieldError("prompt", "a chat list [{'role', 'content'}] or a string", record)
    if not question:
        raise _FieldError("prompt", "a non-empty question", record)
    reward_model = record.get("reward_model")
    if not isinstance(reward_model, dict) or not isinstance(reward_model.get("ground_truth"), str):
        raise _FieldError("reward_model.ground_truth", "a string", record)
    extra = record.get("extra_info")
    index = extra.get("index") if isinstance(extra, dict) else None
    return question, reward_model["ground_truth"].strip(), None if index is None else str(index)


@dataclass(frozen=True)
class _Spec:
    files: dict[str, str]  # split -> path relative to the data root
    parse: Callable[[dict[str, Any]], tuple[str, str, str | None]]


DATASETS: dict[str, _Spec] = {
    "gsm8k": _Spec({"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, _parse_gsm8k),
    "math": _Spec({"train": "math/train.jsonl", "test": "math/test.jsonl"}, _parse_math),
    "math500": _Spec({"test": "math500/test.jsonl"}, _parse_math),
    "aime24": _Spec({"test": "aime24/test.jsonl"}, _parse_plain),
    "aime25": _Spec({"test": "aime25/test.jsonl"}, _parse_plain),
    "amc23": _Spec({"test": "amc23/test.jsonl"}, _parse_amc),
    "minerva_math": _Spec({"test": "minerva_math/test.jsonl"}, _parse_minerva),
    "olympiadbench": _Spec({"test": "olympiadbench/test.jsonl"}, _parse_olympiad),
    "dapo_math_17k": _Spec({"train": "dapo_math_17k/dapo_math_17k.parquet"}, _parse_dapo),
}
"""Known set names -> their files per split and record parser (the README of the data folder documents them)."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``data_dir`` if given, else env ``NFT_DATA_DIR``, else ``<repo>/../shared/data``."""
    if data_dir is not None and str(data_dir) != "":
        path, origin = Path(data_dir).expanduser(), "data.data_dir"
    elif os.environ.get("NFT_DATA_DIR"):
        path, origin = Path(os.environ["NFT_DATA_DIR"]).expanduser(), "environment variable NFT_DATA_DIR"
    else:
        path, origin = _REPO_ROOT.parent / "shared" / "data", "the default <repo>/../shared/data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {path} (from {origin}) does not exist; set it with the config key "
            f"data.data_dir=/path/to/data or the environment variable NFT_DATA_DIR"
        )
    return path


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number from 1, record) of a jsonl or parquet file; errors name the file and line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for row, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield row, record
        return
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({exc.msg}, column {exc.colno})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def _hf_records(hf_dataset: str, hf_config: str | None, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"hf_dataset={hf_dataset!r} needs the 'datasets' package (pip install datasets); "
            f"offline, leave hf_dataset unset to read the files under data.data_dir"
        ) from exc
    try:
        table = datasets.load_dataset(hf_dataset, hf_config, split=split)
    except Exception as exc:
        raise RuntimeError(
            f"could not load Hugging Face dataset {hf_dataset!r} (config {hf_config!r}, split {split!r}): {exc}. "
            f"This needs network access to the Hub; offline, leave hf_dataset unset to read the local files"
        ) from exc
    for row, record in enumerate(table, start=1):
        yield row, dict(record)


def _normalize_text(text: str) -> str:
    return " ".join(text.split())


def _records(
    name: str, split: str, data_dir: str | None, hf_dataset: str | None, hf_config: str | None
) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """(origin for messages, numbered records) of ``name``/``split``: ``hf_dataset`` if given, else the local file."""
    if hf_dataset is not None:
        return f"{hf_dataset}[{split}]", _hf_records(hf_dataset, hf_config, split)
    spec = DATASETS[name]
    path = resolve_data_dir(data_dir) / spec.files[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"load_problems: {path} not found for {name}/{split}; set data.data_dir or NFT_DATA_DIR to the "
            f"folder holding {spec.files[split]}"
        )
    return str(path), read_records(path)


def _math500_exclusions(data_dir: str | None) -> tuple[set[str], set[str]]:
    """The ids and normalised question texts of MATH500, which the ``math`` training split must not hold."""
    held_out = load_problems("math500", "test", data_dir=data_dir, decontaminate=False)
    return {p.id for p in held_out}, {_normalize_text(p.question) for p in held_out}


def _parse_records(
    records: Iterator[tuple[int, dict[str, Any]]],
    parse: Callable[[dict[str, Any]], tuple[str, str, str | None]],
    origin: str,
    name: str,
    split: str,
    excluded: tuple[set[str], set[str]],
    limit: int | None,
) -> tuple[list[Problem], list[int]]:
    """The problems ``parse`` reads from ``records`` (at most ``limit``; none whose id or text is ``excluded``)
    and the line numbers of the records without an answer, which are skipped."""
    excluded_ids, excluded_texts = excluded
    problems = []
    unanswerable = []
    for line_no, record in records:
        try:
            question, answer, raw_id = parse(record)
        except _FieldError as exc:
            raise ValueError(f"{origin}:{line_no}: {exc}") from None
        except _EmptyAnswer:
            # No answer means no reward signal; the source data has such defects, so skip and say so.
            unanswerable.append(line_no)
            continue
        if raw_id in excluded_ids or _normalize_text(question) in excluded_texts:
            continue
        problems.append(Problem(raw_id or f"{name}/{split}/{line_no}", question, answer, name))
        if limit is not None and len(problems) >= limit:
            break
    return problems, unanswerable


def load_problems(
    name: str,
    split: str = "test",
    data_dir: str | None = None,
    limit: int | None = None,
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    decontaminate: bool = True,
) -> ProblemSet:
    """Load ``name``/``split`` as a ``ProblemSet`` named ``"<name>/<split>"``.

    Args:
        name: one of ``DATASETS`` (gsm8k, math, math500, aime24, aime25, amc23, minerva_math, olympiadbench,
            dapo_math_17k).
        split: ``test`` for the benchmarks; ``train``/``test`` for gsm8k and math; ``train`` for dapo_math_17k.
        data_dir: data root (see ``resolve_data_dir``).
        limit: keep only the first ``limit`` problems.
        hf_dataset: load this Hugging Face dataset (``hf_config``, ``split``) instead of the local file; its
            records must have the local file's fields. Needs the ``datasets`` package and network access.
        decontaminate: for ``math``/``train``, drop problems whose unique_id or text is in MATH500.
    """
    if name not in DATASETS:
        raise ValueError(f"load_problems: unknown data set name {name!r}; expected one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    if hf_dataset is None and split not in spec.files:
        raise ValueError(
            f"load_problems: data set {name!r} has no split {split!r}; expected one of {sorted(spec.files)}"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"load_problems: limit must be a positive integer or null, got {limit}")
    origin, records = _records(name, split, data_dir, hf_dataset, hf_config)
    decontaminated = decontaminate and name == "math" and split == "train"
    excluded = _math500_exclusions(data_dir) if decontaminated else (set(), set())
    problems, unanswerable = _parse_records(records, spec.parse, origin, name, split, excluded, limit)
    if unanswerable:
        warnings.warn(
            f"load_problems: skipped {len(unanswerable)} record(s) of {origin} with an empty answer "
            f"(lines {unanswerable[:10]})",
            stacklevel=2,
        )
    if not problems:
        raise ValueError(f"load_problems: {origin} holds no problems")
    return ProblemSet(f"{name}/{split}", tuple(problems))
