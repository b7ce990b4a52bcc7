"""The notebooks of ``notebooks/`` run top to bottom and are all documented.

Each ``notebooks/*.py`` (jupytext percent format) is converted to a notebook in memory
and executed with nbclient on the ``python3`` kernel in a temporary folder, with
``JAXDEFENSE_NOTEBOOK_QUICK=1`` (small sizes, few epochs and steps); any cell error
fails the test.  A notebook that no test runs is a defect: the parametrisation is the
folder's listing, and a second test checks that the README lists every notebook.

The executions are marked ``slow``: in quick mode they take several minutes together on a
2-core machine (JAX compilation dominates), more than the default run can spend; run them
with ``python -m pytest -q -n 0 -m slow tests/test_notebooks.py``.  The default run still
converts every notebook and checks that its code compiles and follows the conventions
(an install cell first, a ``QUICK`` switch, the inline backend).
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.py"))
#: seconds a quick-mode notebook may take before nbclient gives up on a cell.
CELL_TIMEOUT = 900


def test_notebooks_exist_and_are_listed_in_readme():
  assert NOTEBOOKS, "no notebooks/*.py found"
  readme = (NOTEBOOK_DIR / "README.md").read_text()
  missing = [name for name in NOTEBOOKS if not re.search(rf"\b{re.escape(name)}\b", readme)]
  assert not missing, f"notebooks not listed in notebooks/README.md: {missing}"
  # Every notebook the README names exists (no stale entries).
  named = set(re.findall(r"`([a-z0-9_]+\.py)`", readme))
  stale = sorted(named - set(NOTEBOOKS))
  assert not stale, f"notebooks/README.md names notebooks that do not exist: {stale}"


def test_every_notebook_is_executed():
  # The execution test is parametrised over the same listing, so no file escapes it;
  # guard against a listing that silently ignores files (e.g. a stray .ipynb without
  # its .py text form).
  ipynbs = {p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")}
  assert ipynbs <= {pathlib.Path(n).stem for n in NOTEBOOKS}, (
      f"notebooks without a .py text form are never executed: {sorted(ipynbs)}")
  assert set(NOTEBOOKS) == {p.name for p in NOTEBOOK_DIR.glob("*.py")}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_converts_and_compiles(name):
  jupytext = pytest.importorskip("jupytext")
  notebook = jupytext.read(NOTEBOOK_DIR / name)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert notebook.cells[0].cell_type == "markdown", "a notebook opens with its idea"
  assert "JAXDEFENSE_PIP_SPEC" in code[0].source, "the first code cell installs the package"
  source = "\n".join(c.source for c in code)
  assert 'QUICK = os.environ.get("JAXDEFENSE_NOTEBOOK_QUICK") == "1"' in source
  assert "%matplotlib inline" in source
  assert "jax.devices()" in source
  assert "experiments/" in notebook.cells[-1].source, "a notebook ends with the full experiment"
  for i, cell in enumerate(code):
    # IPython magics are not Python; blank them before compiling.
    text = "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in cell.source.splitlines())
    compile(text, f"{name}[cell {i}]", "exec")


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  jupytext = pytest.importorskip("jupytext")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  notebook = jupytext.read(NOTEBOOK_DIR / name)
  monkeypatch.setenv("JAXDEFENSE_NOTEBOOK_QUICK", "1")
  monkeypatch.delenv("MPLBACKEND", raising=False)   # the notebooks use the inline backend
  client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT,
                                   resources={"metadata": {"path": str(tmp_path)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as err:
    pytest.fail(f"{name} failed:\n{err}", pytrace=False)
  # No cell may print a traceback to stderr without raising either.
  for cell in notebook.cells:
    for out in cell.get("outputs", []):
      assert out.get("output_type") != "error", (name, out)
