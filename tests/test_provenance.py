"""Each `fit` launch records the code it imported and the numeric pins it ran under (provenance.jsonl)."""

import json
import subprocess
from pathlib import Path

import pytest
from test_runs import SMOKE, _nft_lit

from nft_lit.provenance import describe, source_state

REPO = Path(__file__).parents[1]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_the_source_state_names_the_commit_and_hashes_uncommitted_changes(tmp_path):
    package = tmp_path / "src" / "pkg"
    package.mkdir(parents=True)
    (package / "x.py").write_text("A = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    clean = source_state(package)
    assert clean["git_commit"] == _git(tmp_path, "rev-parse", "HEAD")
    assert clean["changed_files"] == 0 and clean["diff_sha256"] is None
    (package / "x.py").write_text("A = 2\n")
    edited = source_state(package)
    assert edited["changed_files"] == 1 and edited["diff_sha256"]
    assert source_state(package)["diff_sha256"] == edited["diff_sha256"]  # the same edit, the same hash
    (package / "x.py").write_text("A = 3\n")
    assert source_state(package)["diff_sha256"] != edited["diff_sha256"]
    assert "1 files changed" in describe({**edited, "package": str(package)})


def test_outside_a_git_checkout_the_installed_version_is_the_identity(tmp_path):
    state = source_state(tmp_path)
    assert "git_commit" not in state and "version" in state


@pytest.mark.slow
def test_every_fit_launch_appends_its_code_and_pins_and_a_resume_says_where_it_resumed(tmp_path):
    run = tmp_path / "run"
    _nft_lit("fit", *SMOKE, "iterations=1", f"hydra.run.dir={run}")
    _nft_lit("fit", *SMOKE, "iterations=2", "ckpt_path=last", f"hydra.run.dir={run}")
    first, resumed = [json.loads(line) for line in (run / "provenance.jsonl").read_text().splitlines()]
    assert first["resumed_at_step"] is None and resumed["resumed_at_step"] == 2  # smoke: 2 optimizer steps
    assert Path(first["package"]) == REPO / "src" / "nft_lit"
    if (REPO / ".git").exists():
        assert first["git_commit"] == _git(REPO, "rev-parse", "HEAD")
    assert first["env"]["OMP_NUM_THREADS"] == "1"  # what the test's environment pins (test_runs._env)
    assert first["cpu_capability"] and first["torch"]
    assert "code: nft_lit from" in (run / "cli.log").read_text()
