"""Loaders for ../shared/data: counts, answer normalisation, decontamination, clear errors, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _data_marks import needs_data
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nft_lit.data import Problem, ProblemSet, load_problems, resolve_data_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


@needs_data
@pytest.mark.parametrize(
    ("name", "split", "count"),
    [
        ("math500", "test", 500),
        ("aime24", "test", 30),
        ("aime25", "test", 30),
        ("amc23", "test", 40),
        ("minerva_math", "test", 272),
        ("olympiadbench", "test", 675),
        ("gsm8k", "test", 1319),
        ("gsm8k", "train", 7473),
        ("math", "test", 5000),
        ("math", "train", 7498),  # 7,500 minus two records whose answer is an empty \boxed{}
        ("dapo_math_17k", "train", 17917),
    ],
)
def test_every_set_loads_with_unique_ids_and_answers(name, split, count):
    problems = load_problems(name, split)
    assert isinstance(problems, ProblemSet) and problems.name == f"{name}/{split}"
    assert len(problems) == count
    assert len({p.id for p in problems}) == count
    assert all(p.question and p.answer and p.source == name for p in problems)


@needs_data
def test_answers_are_normalised_per_format():
    amc = load_problems("amc23")
    assert amc[0].answer == "27"  # stored as the float 27.0
    assert all(not a.endswith(".0") for a in (p.answer for p in amc))
    gsm = load_problems("gsm8k", "train")
    assert all(p.answer.lstrip("-").replace(".", "").isdigit() for p in gsm)
    olympiad = load_problems("olympiadbench")
    assert olympiad[0].answer == "2" and not any("$" in p.answer for p in olympiad)
    minerva = load_problems("minerva_math")
    assert all("\\boxed" not in p.answer for p in minerva)
    dapo = load_problems("dapo_math_17k", "train", limit=5)
    assert len(dapo) == 5 and dapo[0].answer == "34" and dapo[0].question.startswith("In triangle $ABC$")
    math500 = load_problems("math500")
    assert math500[0].id == "test/precalculus/807.json"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _math_row(uid: str, problem: str, answer: str = "1") -> dict:
    return {"problem": problem, "solution": "s", "answer": answer, "unique_id": uid}


def test_math500_is_removed_from_math_train_by_id_and_by_text(tmp_path):
    _jsonl(tmp_path / "math500" / "test.jsonl", [_math_row("test/algebra/1.json", "What is  1+0?")])
    _jsonl(
        tmp_path / "math" / "train.jsonl",
        [
            _math_row("test/algebra/1.json", "same id"),
            _math_row("train/algebra/2.json", "What is 1+0?"),  # same text up to spacing
            _math_row("train/algebra/3.json", "What is 2+0?", "2"),
        ],
    )
    kept = load_problems("math", "train", data_dir=str(tmp_path))
    assert [p.id for p in kept] == ["train/algebra/3.json"]
    assert len(load_problems("math", "train", data_dir=str(tmp_path), decontaminate=False)) == 3


def test_bad_records_name_file_line_and_field(tmp_path):
    _jsonl(tmp_path / "aime24" / "test.jsonl", [{"problem": "q", "answer": "1"}, {"problem": "q"}])
    with pytest.raises(ValueError, match=r"aime24/test\.jsonl:2: field 'answer'.*missing"):
        load_problems("aime24", data_dir=str(tmp_path))
    _jsonl(tmp_path / "amc23" / "test.jsonl", [{"problem": "q", "answer": [1]}])
    with pytest.raises(ValueError, match=r"amc23/test\.jsonl:1: field 'answer': expected a number"):
        load_problems("amc23", data_dir=str(tmp_path))
    (tmp_path / "aime25").mkdir()
    (tmp_path / "aime25" / "test.jsonl").write_text('{"problem": "q", "answer": "1"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"aime25/test\.jsonl:2: malformed JSON"):
        load_problems("aime25", data_dir=str(tmp_path))
    _jsonl(tmp_path / "math500" / "test.jsonl", [])
    with pytest.raises(ValueError, match="holds no problems"):
        load_problems("math500", data_dir=str(tmp_path))


def test_names_splits_and_limits_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown data set name 'math501'"):
        load_problems("math501", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="has no split 'train'"):
        load_problems("aime24", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"aime24/test\.jsonl not found"):
        load_problems("aime24", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="limit"):
        load_problems("aime24", limit=0, data_dir=str(tmp_path))


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("NFT_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    other = tmp_path / "x"
    other.mkdir()
    assert resolve_data_dir(str(other)) == other
    monkeypatch.setenv("NFT_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"data\.data_dir=.*NFT_DATA_DIR"):
        resolve_data_dir(None)


def test_hf_dataset_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises((ImportError, RuntimeError), match=r"datasets|Hugging Face dataset"):
        load_problems("math500", hf_dataset="HuggingFaceH4/MATH-500")


def test_problem_set_is_a_sequence():
    problems = ProblemSet("t", tuple(Problem(str(i), f"q{i}", str(i), "t") for i in range(4)))
    assert len(problems) == 4 and problems[1].id == "1"
    assert isinstance(problems[1:3], ProblemSet) and [p.id for p in problems[1:3]] == ["1", "2"]
    assert [p.answer for p in problems] == ["0", "1", "2", "3"]


# the synthetic task's configs (generated problems, greedy evaluation) are tested in test_synthetic.py
BENCHMARK_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("synthetic"))


@needs_data
@pytest.mark.parametrize("path", BENCHMARK_CONFIGS, ids=lambda p: p.stem)
def test_data_configs_instantiate(path):
    cfg = OmegaConf.load(path)
    cfg.problems.limit = 3
    problems = instantiate(cfg.problems)
    assert isinstance(problems, ProblemSet) and len(problems) == 3
    assert cfg.name == path.stem
    expected_k = 32 if cfg.name in {"aime24", "aime25", "amc23"} else 1
    assert cfg.eval_samples == expected_k
    assert cfg.eval_top_p == 0.7 and cfg.eval_temperature == 1.0


def test_data_config_data_dir_override_reaches_the_loader(tmp_path):
    _jsonl(tmp_path / "aime24" / "test.jsonl", [{"problem": "q", "answer": "5", "id": 9}])
    cfg = OmegaConf.load(CONFIGS / "aime24.yaml")
    cfg.data_dir = str(tmp_path)
    problems = instantiate(cfg.problems)
    assert [(p.id, p.answer) for p in problems] == [("9", "5")]
