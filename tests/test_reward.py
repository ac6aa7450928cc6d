"""Verifier behaviour: extraction, equivalent forms, hang/crash recovery, the `nft-lit verify` command."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import TimeoutError as TaskTimeout

import pytest
from _data_marks import needs_data

from nft_lit.answers import extract_answer, extract_boxed
from nft_lit.data import DATASETS, load_problems
from nft_lit.reward import ExactMatchVerifier, MathVerifier, overlong_penalty
from nft_lit.verify import verify_command


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=2, timeout_s=3.0) as v:
        yield v


def test_extract_boxed_is_brace_matched_and_takes_the_last():
    assert extract_boxed(r"first \boxed{1} then \boxed{\frac{a}{b^{2}}} end") == r"\frac{a}{b^{2}}"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed(r"so \boxed 5$.") == "5"
    # A last box that never closes (truncated) falls back to the previous complete one.
    assert extract_boxed(r"\boxed{3} and \boxed{4") == "3"
    assert extract_boxed("no box here") is None
    assert extract_boxed(r"\boxedx{3}") is None


def test_extract_answer_understands_both_templates():
    assert extract_answer("work...\nAnswer: $12$.") == "12"
    assert extract_answer("**Answer:** 7") == "7"
    assert extract_answer(r"Answer: \boxed{x+1}") == "x+1"
    # Whichever comes last wins.
    assert extract_answer(r"Answer: 3 ... wait, actually \boxed{4}") == "4"
    assert extract_answer(r"\boxed{4} ... Answer: 5") == "5"
    assert extract_answer("The sum is 5") is None


def test_strict_box_only_looks_at_the_tail():
    text = r"\boxed{9}" + "x" * 400
    assert extract_answer(text) == "9"
    assert extract_answer(text, strict_box=True, strict_box_tail_chars=300) is None
    assert extract_answer(text, strict_box=True, strict_box_tail_chars=500) == "9"
    assert extract_answer("Answer: 9", strict_box=True) is None


def test_exact_match_verifier():
    result = ExactMatchVerifier().score(
        ["579", " 579 ", "578", "579", r"\boxed{12}"], ["579"] * 4 + ["12"], [False, False, False, True, False]
    )
    assert result.rewards == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert result.stats["truncated"] == 1 and result.stats["timeouts"] == 0


def test_overlong_penalty_matches_dapo_formula():
    # L_max 100, buffer 20: free up to 80 tokens, then linear to -factor at 100.
    assert overlong_penalty([10, 80, 90, 100], 100, 20, 1.0) == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty([90], 100, 20, 0.5) == [-0.25]
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty([1], 100, 0, 1.0)
    with pytest.raises(ValueError, match="factor"):
        overlong_penalty([1], 100, 10, -1.0)


EQUIVALENT = [
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12"),
    (r"\boxed{x=3}", "3"),
    (r"\boxed{3}", "x = 3"),
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{1{,}000}", "1000"),
    (r"\boxed{5\text{ cm}}", "5"),
    (r"\boxed{[1, 2)}", "[1,2)"),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)"),
    ("Answer: $27$", "27.0"),
    (r"\boxed{\text{(C)}}", r"\text{(C)}"),
]
WRONG = [
    (r"\boxed{4}", "5"),
    (r"\boxed{0.51}", r"\frac{1}{2}"),
    (r"\boxed{(1, 2]}", "[1,2)"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)"),
    ("I don't know", "7"),
]


@pytest.mark.parametrize("fast_path", [True, False])
def test_equivalent_forms_verify_and_wrong_answers_do_not(fast_path):
    with MathVerifier(num_workers=2, timeout_s=5.0, local_fast_path=fast_path) as v:
        pairs = EQUIVALENT + WRONG
        result = v.score([p for p, _ in pairs], [g for _, g in pairs], [False] * len(pairs))
    expected = [1.0] * len(EQUIVALENT) + [0.0] * len(WRONG)
    assert result.rewards == expected, [p for p, r, e in zip(pairs, result.rewards, expected, strict=True) if r != e]
    assert result.stats["timeouts"] == 0 and result.stats["errors"] == 0


def test_truncated_scores_zero_even_when_right(verifier):
    result = verifier.score([r"\boxed{2}", r"\boxed{2}"], ["2", "2"], [True, False])
    assert result.rewards == [0.0, 1.0]
    assert result.stats["truncated"] == 1


def test_bomb_and_huge_response_time_out_and_the_pool_recovers(verifier):
    bomb = r"\boxed{9^{9^{9^{9^{9^{9}}}}}}"
    huge = r"\boxed{" + "+".join(["1"] * 70_000) + "}"  # ~200k characters
    start = time.monotonic()
    result = verifier.score([bomb, huge, "x" * 200_000], ["1", "5", "5"], [False] * 3)
    elapsed = time.monotonic() - start
    assert result.rewards == [0.0, 0.0, 0.0]
    assert result.stats["timeouts"] >= 1
    # Two workers, three pairs, 3 s each at most (plus a restart): bounded, not hung.
    assert elapsed < 3 * verifier.timeout_s + 5
    after = verifier.score([r"\boxed{\frac{2}{4}}", r"\boxed{7}"], ["0.5", "8"], [False, False])
    assert after.rewards == [1.0, 0.0]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _worker_pids(v: MathVerifier, deadline_s: float = 60.0) -> set[int]:
    """The pids of v's own workers, asked of the workers: children counted by the parent would also take in the
    replacements that the module's shared verifier starts in the background after an earlier test's timeouts."""
    pids: set[int] = set()
    deadline = time.monotonic() + deadline_s
    while len(pids) < v.num_workers and time.monotonic() < deadline:
        # tasks that overlap in time land on different workers once all have started
        futures = [v._start().schedule(_pid_after, (0.5,)) for _ in range(v.num_workers)]
        pids |= {f.result() for f in futures}
    return pids


def test_close_leaves_no_processes():
    v = MathVerifier(num_workers=2, timeout_s=2.0)
    assert v.score([r"\boxed{\sqrt{4}}"], ["2"], [False]).rewards == [1.0]
    workers = _worker_pids(v)
    assert len(workers) == 2
    v.close()
    assert all(_gone(pid) for pid in workers)
    with pytest.raises(RuntimeError, match="after close"):
        v.score([r"\boxed{\sqrt{4}}"], ["2"], [False])


def test_a_worker_stuck_in_c_code_is_killed_at_the_deadline():
    # sum() over a range loops in C without checking signals: neither math-verify's alarm nor pebble's Python-level
    # SIGTERM handler (which would add pebble's 3 s grace before SIGKILL) can end it; the default action can.
    with MathVerifier(num_workers=1, timeout_s=1.0) as v:
        assert v.score([r"\boxed{\sqrt{4}}"], ["2"], [False]).rewards == [1.0]  # the worker is up
        start = time.monotonic()
        with pytest.raises(TaskTimeout):
            v._start().schedule(sum, (range(10**11),), timeout=v.timeout_s).result()
        assert time.monotonic() - start < 2.5
        assert v.score([r"\boxed{\sqrt{4}}"], ["2"], [False]).rewards == [1.0]  # on the replacement


def test_a_worker_that_dies_scores_zero_and_is_replaced():
    with MathVerifier(num_workers=1, timeout_s=30.0) as v:
        assert v.score([r"\boxed{\sqrt{4}}"], ["2"], [False]).rewards == [1.0]
        (worker,) = _worker_pids(v)
        killer = threading.Timer(1.0, os.kill, (worker, signal.SIGKILL))  # mid-check: the bomb takes minutes
        killer.start()
        result = v.score([r"\boxed{9^{9^{9^{9^{9^{9}}}}}}"], ["1"], [False])
        killer.join()
        assert result.rewards == [0.0] and result.stats["errors"] == 1 and result.stats["timeouts"] == 0
        (replacement,) = _worker_pids(v)  # pebble starts it in the background; the task waits for it
        assert replacement != worker
        os.kill(replacement, signal.SIGKILL)  # while idle: pebble gives up on that pool and a new one is built
        assert v.score([r"\boxed{\sqrt{4}}"], ["2"], [False]).rewards == [1.0]


def test_workers_that_cannot_start_fail_loudly(tmp_path, monkeypatch):
    (tmp_path / "math_verify.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get the parent's sys.path
    with MathVerifier(num_workers=1, timeout_s=2.0) as v, pytest.raises(RuntimeError, match="import math_verify"):
        v.score([r"\boxed{x^2}"], ["y"], [False])
    (tmp_path / "math_verify.py").write_text("import time\ntime.sleep(60)\n")
    with (
        MathVerifier(num_workers=1, timeout_s=2.0, start_timeout_s=2.0) as v,
        pytest.raises(RuntimeError, match="start_timeout_s"),
    ):
        v.score([r"\boxed{x^2}"], ["y"], [False])


def test_score_rejects_bad_arguments(verifier):
    with pytest.raises(ValueError, match="same length"):
        verifier.score(["a"], ["a", "b"], [False])
    with pytest.raises(TypeError, match=r"golds\[0\] must be str"):
        verifier.score(["a"], [3], [False])
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)


@needs_data
def test_every_benchmark_gold_verifies_against_itself_through_math_verify():
    names = ["math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench"]
    golds = [p.answer for name in names for p in load_problems(name)]
    with MathVerifier(num_workers=2, timeout_s=10.0, local_fast_path=False) as v:
        result = v.score([f"The answer is $\\boxed{{{g}}}$." for g in golds], golds, [False] * len(golds))
    failed = [g for g, r in zip(golds, result.rewards, strict=True) if r != 1.0]
    assert not failed, failed[:10]


@needs_data
def test_every_training_gold_verifies_against_itself(verifier):
    for name, split in [
        ("gsm8k", "train"),
        ("gsm8k", "test"),
        ("math", "train"),
        ("math", "test"),
        ("dapo_math_17k", "train"),
    ]:
        golds = [p.answer for p in load_problems(name, split)]
        result = verifier.score([f"Answer: {g}" for g in golds], golds, [False] * len(golds))
        failed = [g for g, r in zip(golds, result.rewards, strict=True) if r != 1.0]
        assert not failed, (name, split, failed[:10])
    assert set(DATASETS) == {
        "gsm8k",
        "math",
        "math500",
        "aime24",
        "aime25",
        "amc23",
        "minerva_math",
        "olympiadbench",
        "dapo_math_17k",
    }


# ---- nft-lit verify -----------------------------------------------------------------------------------


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_verify_command_writes_rewards_in_input_order(tmp_path, capsys):
    rows = [
        {"response": r"\boxed{\frac{1}{2}}", "gold": "0.5", "id": "a"},
        {"response": "Answer: 4", "gold": "5", "id": "b"},
        {"response": r"\boxed{5}", "gold": "5", "truncated": True, "id": "c"},
        {"response": r"\boxed{x=2}", "gold": "2", "id": "d"},
    ]
    src = _write(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    out = tmp_path / "out.jsonl"
    assert verify_command([src, str(out), "--workers", "1", "--timeout", "5"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["id"] for w in written] == ["a", "b", "c", "d"]
    assert [w["reward"] for w in written] == [1, 0, 0, 1]
    assert written[0]["response"] == rows[0]["response"] and written[0]["gold"] == "0.5"
    assert "mean reward 0.5000" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"response": "a", "gold": "1"}', '{"response": "a", "gold": '], r"in\.jsonl:2: malformed JSON"),
        (['{"response": "a"}'], r"in\.jsonl:1: missing field 'gold'"),
        (['{"response": "a", "gold": 3}'], r"in\.jsonl:1: field 'gold' must be a string, got int"),
        (['{"response": ["a"], "gold": "3"}'], r"in\.jsonl:1: field 'response' must be a string"),
        (["[1, 2]"], r"in\.jsonl:1: expected a JSON object"),
        ([], r"in\.jsonl: empty file"),
    ],
)
def test_verify_command_bad_input_names_file_line_and_field(tmp_path, capsys, lines, message):
    src = _write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert verify_command([src, str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_verify_checks_the_output_folder_before_grading(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"response": "\\\\boxed{2}", "gold": "2"}\n')
    assert verify_command([str(src), str(tmp_path / "missing" / "out.jsonl"), "--exact"]) == 2
    err = capsys.readouterr().err
    assert f"the output folder {tmp_path / 'missing'} does not exist" in err
