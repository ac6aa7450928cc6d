"""The notebooks: committed without outputs, and each one executes headless and writes its figures.

Execution runs every notebook top to bottom with nbclient on the ``python3`` kernel; jupyter_client starts a
kernel spec whose command is ``python`` with ``sys.executable``, so the kernel is this interpreter (.venv's)
and imports the same editable ``nft_lit``. Each notebook asserts its own numbers (measured vs closed-form
gradient weights, the on-policy equivalences), so a failing assert cell fails the test.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"gradient_weights", "prompt_weighting", "training_curves"}
SLOW = {"training_curves"}  # runs a small smoke sweep itself


def test_expected_notebooks_present():
    assert {p.stem for p in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_stripped(path: Path):
    """Outputs stay out of git: run `.venv/bin/nbstripout notebooks/*.ipynb` before committing."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; run nbstripout on it"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"


def _execute(path: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    return nb


@pytest.mark.notebooks
@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in NOTEBOOKS],
    ids=lambda p: p.stem,
)
def test_notebook_executes_and_saves_figures(path: Path):
    started = time.time()
    nb = _execute(path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    figures = list((NOTEBOOK_DIR / "figures" / path.stem).glob("*.png"))
    fresh = [f for f in figures if f.stat().st_mtime >= started - 1 and f.stat().st_size > 10_000]
    assert fresh, f"{path.name} wrote no PNG under notebooks/figures/{path.stem}/"


@pytest.mark.notebooks
def test_kernel_is_this_interpreter():
    """The executed notebooks import the package of this environment, not another Python's."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys, nft_lit; print(sys.executable)")])
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    printed = nb.cells[0].outputs[0].text.strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve()
