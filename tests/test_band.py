"""In-band selection (nft_lit.band): r̂ per question from a sampler, the 0 < r̂ < 1 filter, the seeded disjoint
train/held-out split, the data config that loads only the selected ids, errors; `experiment=smollm2_math`
composes (nothing loaded)."""

import json
from dataclasses import dataclass

import pytest
from _rollout_fakes import FakeSampling, make_sampler
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nft_lit import band
from nft_lit.band import QuestionRate, assign_part, screen
from nft_lit.compose import CONFIG_DIR, check_config
from nft_lit.data import Problem, ProblemSet
from nft_lit.reward import VerifyResult
from nft_lit.selection import SelectionError, read_selection, selected_problems


class TableVerifier:
    """The first ``table[gold]`` answers of each question are right: the Sampler passes each gold K times in a
    row, so the occurrence index of a gold within one call is the answer's index j."""

    def __init__(self, table: dict[str, int]) -> None:
        self.table = table

    def score(self, responses, golds, truncated):
        seen: dict[str, int] = {}
        rewards = []
        for gold in golds:
            j = seen.get(gold, 0)
            seen[gold] = j + 1
            rewards.append(float(j < self.table[gold]))
        return VerifyResult(rewards, {"seconds": 0.0})


def _problems(n: int) -> ProblemSet:
    return ProblemSet("toy/train", tuple(Problem(f"toy/{i}", f"{i}+0=", f"g{i}", "toy") for i in range(n)))


def _rates(correct: list[int], k: int = 4) -> list[QuestionRate]:
    return [QuestionRate(f"toy/{i}", c, k) for i, c in enumerate(correct)]


def test_screen_counts_correct_answers_per_question_and_syncs_the_policy():
    problems = _problems(6)
    table = {f"g{i}": c for i, c in enumerate([0, 1, 2, 3, 4, 2])}
    sampler = make_sampler(verifier=TableVerifier(table))
    seen = []
    rates = screen(
        problems,
        sampler,
        FakeSampling(seed=0),
        num_samples=4,
        policy=object(),
        batch_prompts=4,
        progress=lambda done, total, s: seen.append((done, total)),
    )
    assert [r.id for r in rates] == [p.id for p in problems]
    assert [r.correct for r in rates] == [0, 1, 2, 3, 4, 2]
    assert [r.r_hat for r in rates] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.5]
    assert all(r.samples == 4 and r.tokens > 0 for r in rates)
    assert sampler.engine.syncs == 1 and seen == [(4, 6), (6, 6)]
    # no policy: the engine already holds the weights, nothing is synced
    screen(problems[:1], sampler, FakeSampling(), num_samples=4)
    assert sampler.engine.syncs == 1


def test_screen_rejects_repeated_ids_and_bad_k():
    sampler = make_sampler()
    twice = [Problem("a", "1+1=", "2", "t"), Problem("a", "1+2=", "3", "t")]
    with pytest.raises(ValueError, match=r"unique.*'a'"):
        screen(twice, sampler, FakeSampling(), 2)
    with pytest.raises(ValueError, match="num_samples"):
        screen(twice[:1], sampler, FakeSampling(), 0)


def test_select_keeps_only_mixed_groups_and_summarizes():
    rates = _rates([0, 1, 2, 3, 4, 0, 4, 2])
    selection = band.select(rates, heldout_fraction=0.5, seed=0)
    assert [s["id"] for s in selection] == ["toy/1", "toy/2", "toy/3", "toy/7"]
    assert all(0 < s["r_hat"] < 1 for s in selection)
    summary = band.summarize(rates, selection)
    assert summary["questions"] == 8 and summary["in_band"] == 4 and summary["in_band_fraction"] == 0.5
    assert summary["pass_rate"] == pytest.approx(16 / 32)
    assert summary["pass_rate_selected"] == pytest.approx(8 / 16)
    assert summary["histogram"] == {"0/4": 2, "1/4": 1, "2/4": 2, "3/4": 1, "4/4": 2}
    assert summary["all_wrong"] == 2 and summary["all_right"] == 2
    assert summary["train_questions"] + summary["heldout_questions"] == 4


def test_split_is_deterministic_disjoint_seeded_and_near_the_fraction():
    ids = [f"gsm8k/train/{i}" for i in range(4000)]
    parts = [assign_part(i, 0, 0.25) for i in ids]
    assert parts == [assign_part(i, 0, 0.25) for i in ids]  # deterministic
    assert set(parts) == {"train", "heldout"}
    assert 0.22 < parts.count("heldout") / len(ids) < 0.28
    # the part of a question does not depend on what else is screened (order, subset)
    assert [assign_part(i, 0, 0.25) for i in reversed(ids[:50])] == list(reversed(parts[:50]))
    # another seed gives another split
    assert [assign_part(i, 1, 0.25) for i in ids] != parts
    with pytest.raises(ValueError, match="heldout_fraction"):
        assign_part("x", 0, 1.0)


def test_written_selection_loads_disjoint_parts_of_only_the_selected_ids(tmp_path):
    problems = _problems(40)
    rates = _rates([i % 5 for i in range(40)])  # 0..4 of 4 correct: 3 of every 5 in band
    summary = band.write_selection(tmp_path, rates, heldout_fraction=0.3, seed=0, facts={"data": "toy"})
    assert summary["data"] == "toy" and summary["in_band"] == 24
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["in_band"] == 24 and on_disk["pass_rate"] == pytest.approx(0.5)
    assert len((tmp_path / "screen.jsonl").read_text().splitlines()) == 40

    train = selected_problems(problems, tmp_path / "selection.jsonl", "train")
    heldout = selected_problems(problems, tmp_path, "heldout")  # a folder means its selection.jsonl
    assert len(train) + len(heldout) == 24 and len(heldout) > 0 and len(train) > len(heldout)
    assert not {p.id for p in train} & {p.id for p in heldout}
    in_band_ids = {r.id for r in rates if 0 < r.correct < 4}
    assert {p.id for p in train} | {p.id for p in heldout} == in_band_ids
    assert train.name == "toy/train[band:train]" and isinstance(train[0], Problem)
    assert len(selected_problems(problems, tmp_path, "train", limit=2)) == 2


def test_the_data_config_node_instantiates_to_the_selected_part(tmp_path):
    band.write_selection(tmp_path, _rates([1, 0, 2, 4, 3]), heldout_fraction=0.4, seed=0)
    node = {
        "_target_": "nft_lit.selection.selected_problems",
        "problems": {"_target_": "test_band._problems", "n": 5},
        "selection": str(tmp_path / "selection.jsonl"),
        "part": "train",
    }
    got = instantiate(node, _convert_="object")
    expected = [r["id"] for r in read_selection(tmp_path) if r["part"] == "train"]
    assert [p.id for p in got] == expected and set(expected) <= {"toy/0", "toy/2", "toy/4"}


@dataclass
class _Case:
    line: str
    match: str


@pytest.mark.parametrize(
    "case",
    [
        _Case("not json", r"selection.jsonl:2: malformed JSON"),
        _Case("[1, 2]", r"selection.jsonl:2: expected a JSON object"),
        _Case('{"part": "train", "r_hat": 0.5}', r"selection.jsonl:2: field 'id'"),
        _Case('{"id": "toy/2", "part": "test", "r_hat": 0.5}', r"selection.jsonl:2: field 'part'"),
        _Case('{"id": "toy/2", "part": "train", "r_hat": 2}', r"selection.jsonl:2: field 'r_hat'"),
        _Case('{"id": "toy/1", "part": "train", "r_hat": 0.5}', r"selection.jsonl:2: field 'id'.*twice.*line 1"),
        _Case('{"id": "other/9", "part": "train", "r_hat": 0.5}', r"selection.jsonl:2: field 'id'.*not in the base"),
    ],
    ids=lambda c: c.match.split(": ", 1)[1][:20],
)
def test_bad_selection_files_fail_naming_file_line_and_field(tmp_path, case):
    path = tmp_path / "selection.jsonl"
    path.write_text('{"id": "toy/1", "part": "train", "r_hat": 0.25}\n' + case.line + "\n")
    with pytest.raises(SelectionError, match=case.match):
        selected_problems(_problems(5), path, "train")


def test_missing_or_empty_selection_and_bad_part_fail_clearly(tmp_path):
    with pytest.raises(SelectionError, match=r"does not exist.*python -m nft_lit.band"):
        selected_problems(_problems(3), tmp_path / "nope.jsonl")
    (tmp_path / "selection.jsonl").write_text('{"id": "toy/1", "part": "train", "r_hat": 0.5}\n')
    with pytest.raises(SelectionError, match="no question in part 'heldout'"):
        selected_problems(_problems(3), tmp_path, "heldout")
    with pytest.raises(ValueError, match="part must be one of"):
        selected_problems(_problems(3), tmp_path, "test")
    (tmp_path / "selection.jsonl").write_text("\n")
    with pytest.raises(SelectionError, match="holds no questions"):
        read_selection(tmp_path)


def _toy_set(n: int, split: str = "train") -> ProblemSet:
    return _problems(n)


def test_command_line_screens_selects_and_writes_the_files(tmp_path, monkeypatch, capsys):
    data = tmp_path / "toy.yaml"
    data.write_text("name: toy\nproblems:\n  _target_: test_band._toy_set\n  n: 12\n  split: train\n")
    table = {f"g{i}": i % 5 for i in range(12)}
    monkeypatch.setattr(
        band, "_build_sampler", lambda args, problems: (make_sampler(verifier=TableVerifier(table)), object())
    )
    out = tmp_path / "screen"
    argv = ["--data", str(data), "--questions", "10", "--samples", "4", "--max-new-tokens", "6", "--out", str(out)]
    assert band.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["questions"] == 10 and summary["base_questions"] == 12 and summary["samples"] == 4
    screened = [json.loads(line) for line in (out / "screen.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in screened] == [int(r["id"].split("/")[1]) % 5 for r in screened]
    assert summary["in_band"] == sum(0 < r["correct"] < 4 for r in screened) == len(read_selection(out))
    assert "questions x 4: pass rate" in capsys.readouterr().out


def test_an_out_of_band_screen_says_so_when_its_selection_is_loaded(tmp_path):
    band.write_selection(tmp_path, _rates([0, 0, 4]), heldout_fraction=0.25, seed=0)
    with pytest.raises(SelectionError, match=r"holds no questions: its screen found no question.*out of the"):
        selected_problems(_problems(3), tmp_path)


def test_command_line_names_a_bad_data_config(capsys):
    assert band.main(["--data", "no_such_set", "--questions", "1"]) == 2
    assert "--data: 'no_such_set'" in capsys.readouterr().err


def _compose(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["run_dir=/tmp/nft-lit-test-band", "experiment=smollm2_math", *overrides])


@pytest.mark.parametrize("algorithm", ["nft", "rft"])
def test_smollm2_math_composes_with_vllm_math_verify_and_the_band_parts(algorithm):
    cfg = _compose(f"algorithm={algorithm}")
    check_config(cfg)
    assert cfg.algorithm.name == algorithm
    assert cfg.rollout._target_ == "nft_lit.rollout.VLLMEngine"
    assert cfg.reward.verifier._target_ == "nft_lit.reward.MathVerifier"
    assert cfg.model.pretrained.endswith("smollm2-135m-instruct")
    assert "boxed" in cfg.prompt.system and cfg.prompt.use_chat_template
    assert cfg.iterations >= 20 and cfg.algorithm.num_answers == cfg.datamodule.num_answers
    train, heldout = cfg.data.problems, cfg.eval.heldout
    assert train._target_ == heldout._target_ == "nft_lit.selection.selected_problems"
    assert (train.part, heldout.part) == ("train", "heldout")
    assert train.selection == heldout.selection
    assert train.problems._target_ == heldout.problems._target_ == "nft_lit.word_problems.word_problems"
    assert cfg.eval.num_samples >= 4 and cfg.eval.temperature == cfg.sampling.temperature == 0.8
    assert cfg.eval.top_p == 1.0 and cfg.sampling.top_p == 1.0  # vLLM log-probs are exact only untruncated
    assert 1e-6 <= cfg.module.lr <= 1e-5
    instantiate(cfg.algorithm.loss)
    instantiate(cfg.sampling)


def test_smollm2_math_data_parts_load_from_a_selection_file(tmp_path):
    """The composed nodes load only the selected ids of the generated word problems, train and held-out apart."""
    from nft_lit.word_problems import word_problems

    ids = [p.id for p in word_problems(size=40)]
    rates = [QuestionRate(i, c, 4) for i, c in zip(ids, [1, 2, 3, 0] * 10, strict=True)]
    band.write_selection(tmp_path, rates, heldout_fraction=0.25, seed=0)
    cfg = _compose(f"data.selection={tmp_path}")
    train = instantiate(cfg.data.problems, _convert_="object")
    heldout = instantiate(cfg.eval.heldout, _convert_="object")
    assert len(train) + len(heldout) == 30 and not {p.id for p in train} & {p.id for p in heldout}
    assert train[0].source == "synthetic/words_addsub10" and train.name == "synthetic/words_addsub10/train[band:train]"


def test_smollm2_math_takes_another_base_set_by_one_override(tmp_path):
    """`data@data.source=gsm8k` trains on a GSM8K screen's selection (skipped without the data directory)."""
    from _data_marks import _has_data

    if not _has_data():
        pytest.skip("no data directory (set NFT_DATA_DIR)")
    rates = [QuestionRate(f"gsm8k/train/{i}", c, 4) for i, c in zip(range(1, 41), [1, 2, 3, 0] * 10, strict=True)]
    band.write_selection(tmp_path, rates, heldout_fraction=0.25, seed=0)
    cfg = _compose("data@data.source=gsm8k", f"data.selection={tmp_path}")
    train = instantiate(cfg.data.problems, _convert_="object")
    assert train[0].source == "gsm8k" and train.name == "gsm8k/train[band:train]"


def test_the_committed_smollm2_selection_is_valid_and_names_questions_of_the_base_set(monkeypatch):
    """`experiment=smollm2_math` trains by default on the committed screen (data/selections/smollm2_words,
    docs/RESULTS.md): a valid selection whose every id is a question of the experiment's base set, whose parts
    are the hash split its summary.json records, and whose screen settings are the experiment's."""
    from pathlib import Path

    from nft_lit.selection import _REPO_ROOT

    monkeypatch.delenv("NFT_LIT_BAND_SELECTION", raising=False)
    cfg = _compose()
    folder = _REPO_ROOT / cfg.data.selection
    assert not Path(cfg.data.selection).is_absolute() and folder.parent == _REPO_ROOT / "data" / "selections"
    records = read_selection(folder)
    base = instantiate(cfg.data.source.problems, _convert_="object")
    ids = {str(p.id) for p in base}
    assert [r["id"] for r in records if r["id"] not in ids] == []
    assert all(0 < r["correct"] < r["samples"] == cfg.algorithm.num_answers for r in records)
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert all(r["part"] == assign_part(r["id"], summary["split_seed"], summary["heldout_fraction"]) for r in records)
    assert (summary["data"], summary["base_questions"]) == ("synthetic_words", len(base))
    assert (summary["samples"], summary["temperature"], summary["top_p"], summary["max_new_tokens"]) == (
        cfg.algorithm.num_answers,
        cfg.sampling.temperature,
        cfg.sampling.top_p,
        cfg.sampling.max_new_tokens,
    )
    train = instantiate(cfg.data.problems, _convert_="object")
    heldout = instantiate(cfg.eval.heldout, _convert_="object")
    assert (len(records), len(train), len(heldout)) == (
        summary["in_band"],
        summary["train_questions"],
        summary["heldout_questions"],
    )
