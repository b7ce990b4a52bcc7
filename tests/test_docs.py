"""The documentation site builds strictly, documents every public name and shows the plots.

One strict ``mkdocs build`` (module-scoped fixture) into a temporary folder: any warning
(a broken link or cross-reference, a docstring griffe cannot parse) fails it.  Needs the
``docs`` extra (mkdocs-material, mkdocstrings[python]); skipped without it.
"""

import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUBPACKAGES = ("data", "nn", "dynamics", "models", "objectives", "attacks", "certify",
               "training", "evaluation", "analysis", "configs")
PAPER_PLOTS = {
    "enresnet": ["experiments/enresnet/results/fig2_convection_diffusion.png",
                 "experiments/enresnet/results/small/acc_vs_eps.png",
                 "experiments/enresnet/results/small/sigma_sweep.png",
                 "experiments/enresnet/results/small/training_curves.png"],
    "inresnet": ["experiments/inresnet/results/small/accuracy_curves.png",
                 "experiments/inresnet/results/small/damping_hist.png",
                 "experiments/inresnet/results/small/jacobian_spectra.png",
                 "experiments/inresnet/results/small/loss_landscapes.png"],
}
# A sentence of each committed report or README that the paper page must include.
PAPER_REPORTS = {
    "enresnet": "experiments/enresnet/results/small/report.md",
    "inresnet": "experiments/inresnet/results/small/report.md",
    "sonet": "experiments/sonet/results/small/report.md",
    "diffai": "experiments/diffai/results/report.md",
    "lad": "experiments/lad/README.md",
}

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")
pytest.importorskip("material")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp("site")
  proc = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
  log = proc.stdout + proc.stderr
  warnings = [line for line in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
  assert proc.returncode == 0 and not warnings, (
      f"mkdocs build --strict failed (status {proc.returncode}):\n" + "\n".join(warnings)
      + "\n" + log[-3000:])
  return out


def _page(site, name):
  return (site / name / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_api_page_documents_every_public_name(site, subpackage):
  module = importlib.import_module(f"jaxdefense.{subpackage}")
  html = _page(site, f"api/{subpackage}")
  missing = [name for name in module.__all__
             if f'id="jaxdefense.{subpackage}.{name}"' not in html]
  assert not missing, f"jaxdefense.{subpackage}: no API entry for {missing}"


def test_every_public_name_has_a_docstring():
  griffe = pytest.importorskip("griffe")
  extensions = griffe.load_extensions(str(ROOT / "docs" / "griffe_roles.py"))
  package = griffe.load("jaxdefense", search_paths=[str(ROOT)], extensions=extensions)
  undocumented = []
  for subpackage in SUBPACKAGES:
    for name in importlib.import_module(f"jaxdefense.{subpackage}").__all__:
      docstring = package[subpackage][name].docstring
      if docstring is None or not docstring.value.strip():
        undocumented.append(f"jaxdefense.{subpackage}.{name}")
  assert not undocumented, f"public names without a docstring: {undocumented}"


@pytest.mark.parametrize("paper", sorted(PAPER_PLOTS))
def test_paper_pages_show_their_plots(site, paper):
  html = _page(site, paper)
  for plot in PAPER_PLOTS[paper]:
    assert (site / plot).is_file(), f"{plot} was not copied into the site"
    assert re.search(r'<img[^>]+src="(\.\./)+' + re.escape(plot) + '"', html), (
        f"{paper} page does not embed {plot}")


@pytest.mark.parametrize("paper", sorted(PAPER_REPORTS))
def test_paper_pages_include_their_reports(site, paper):
  html = _page(site, paper)
  source = (ROOT / PAPER_REPORTS[paper]).read_text(encoding="utf-8")
  title = next(line for line in source.splitlines() if line.startswith("# "))[2:]
  first_words = re.sub(r"[`*_]", "", title).split(":")[0].strip()
  assert first_words and first_words in html, f"{paper}: report title {title!r} not on page"
  assert "arithmatex" in html, f"{paper}: no equations rendered for MathJax"


def test_cli_and_benchmarks_pages(site):
  cli = _page(site, "cli")
  for command in ("train", "eval", "attack", "certify", "report", "demo"):
    assert f"jaxdefense {command}" in cli
  assert "--workdir" in cli
  benchmarks = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
  heading = next(line for line in benchmarks.splitlines() if line.startswith("## "))
  assert heading[3:12] in _page(site, "benchmarks")


def test_every_notebook_is_rendered(site):
  """Each ``notebooks/*.py`` becomes a page (text and code, no outputs) in the nav."""
  notebooks = sorted((ROOT / "notebooks").glob("*.py"))
  assert notebooks
  for path in notebooks:
    html = _page(site, f"notebooks/{path.stem}")
    title = next(line[4:] for line in path.read_text().splitlines()
                 if line.startswith("# # "))
    assert title.split(":")[0] in html, path.name
    assert 'class="language-python' in html or "highlight" in html, path.name
    assert "jupytext --to ipynb" in html
    # in the nav, which every page carries
    assert f'href="../notebooks/{path.stem}/"' in _page(site, "getting-started"), path.name
