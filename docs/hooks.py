"""MkDocs hooks: pull the committed study reports, plots and CLI help into the site.

Nothing is copied into ``docs/`` by hand, so the site always shows what is committed:

* every PNG under ``experiments/*/results/`` (and ``*_results/``) is added to the build
  at its repository path (``experiments/enresnet/results/small/acc_vs_eps.png`` is
  served at that path),
  so a page embeds a plot with a relative link such as
  ``![...](experiments/enresnet/results/small/acc_vs_eps.png)``;
* a line ``<!-- include: PATH -->`` in a page is replaced by the Markdown file at
  ``PATH`` (relative to the repository root), its headings moved down two levels so that
  a report's title becomes a subsection of the page, and its images (``![...](x.png)``
  beside the report) pointed at their repository path;
* a line ``<!-- cli-help -->`` is replaced by the ``--help`` text of ``jaxdefense`` and of
  each subcommand, produced by ``jaxdefense.commands._main.build_parser()``;
* every notebook ``notebooks/NAME.py`` (jupytext percent format) becomes the page
  ``notebooks/NAME.md``: its markdown cells as text, its code cells as Python blocks
  (the notebooks are not executed at build time; they run in the tests).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLOTS = "experiments/*/*results/**/*.png"
NOTEBOOKS = "notebooks/*.py"
_INCLUDE = re.compile(r"^<!--\s*include:\s*(\S+)\s*-->\s*$", re.MULTILINE)
_CLI = re.compile(r"^<!--\s*cli-help\s*-->\s*$", re.MULTILINE)
_FENCE = re.compile(r"^\s*(```|~~~)")
_IMAGE = re.compile(r"(!\[[^\]]*\]\()([^)\s:/]+\.png)\)")


def on_files(files, config):
  for path in sorted(ROOT.glob(PLOTS)):
    uri = path.relative_to(ROOT).as_posix()
    if files.get_file_from_path(uri) is None:
      files.append(File.generated(config, uri, abs_src_path=str(path)))
  for path in sorted(ROOT.glob(NOTEBOOKS)):
    uri = f"notebooks/{path.stem}.md"
    if files.get_file_from_path(uri) is None:
      files.append(File.generated(config, uri, content=notebook_markdown(path)))
  return files


def notebook_markdown(path: pathlib.Path) -> str:
  """A jupytext percent script as a page: markdown cells as text, code as Python blocks.

  Cells start at lines ``# %%`` (code, an optional title after it is dropped) and
  ``# %% [markdown]`` (text: each line's leading ``# `` removed); the YAML header
  (``# ---`` ... ``# ---``) is skipped.
  """
  lines = path.read_text(encoding="utf-8").splitlines()
  if lines and lines[0].strip() == "# ---":
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "# ---"), 0)
    lines = lines[end + 1:]
  cells: list[tuple[str, list[str]]] = []
  for line in lines:
    if line.startswith("# %%"):
      cells.append(("markdown" if "[markdown]" in line else "code", []))
    elif cells:
      cells[-1][1].append(line)
  rel = path.relative_to(ROOT).as_posix()
  out = [f"<!-- generated from {rel} by docs/hooks.py -->", ""]
  for i, (kind, body) in enumerate(cells):
    while body and not body[-1].strip():
      body.pop()
    while body and not body[0].strip():
      body.pop(0)
    if not body:
      continue
    if kind == "markdown":
      out += [re.sub(r"^# ?", "", b) for b in body] + [""]
    else:
      out += ["```python", *body, "```", ""]
    if i == 0:
      out += ['!!! note "Run this notebook"',
              f"    This page is the text of the notebook `{rel}` (a jupytext percent "
              "script), shown without outputs. To run it: `jupytext --to ipynb "
              f"{rel}`, then open the `.ipynb` in Jupyter or upload it to Colab (the "
              "repository's `notebooks/README.md` has the details).", ""]
  return "\n".join(out)


def _shift_headings(text: str, by: int) -> str:
  out, fenced = [], False
  for line in text.splitlines():
    if _FENCE.match(line):
      fenced = not fenced
    elif not fenced and re.match(r"#{1,6} ", line):
      hashes = len(line) - len(line.lstrip("#"))
      line = "#" * min(6, hashes + by) + line[hashes:]
    out.append(line)
  return "\n".join(out)


def _include(match: re.Match) -> str:
  path = ROOT / match.group(1)
  if not path.is_file():
    raise FileNotFoundError(f"docs: '<!-- include: {match.group(1)} -->' names no file.")
  text = _shift_headings(path.read_text(encoding="utf-8"), 2)
  # a report's own plots are linked relative to it: point them at their repository path
  folder = path.parent.relative_to(ROOT).as_posix()
  return _IMAGE.sub(lambda m: f"{m.group(1)}{folder}/{m.group(2)})", text)


def _cli_help() -> str:
  from jaxdefense.commands._main import build_parser  # imports jax: only when asked

  old = os.environ.get("COLUMNS")
  os.environ["COLUMNS"] = "92"
  try:
    parser = build_parser()
    parts = ["## `jaxdefense`", "", "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
      parts += [f"## `jaxdefense {name}`", "", "```text",
                subparser.format_help().rstrip(), "```", ""]
  finally:
    if old is None:
      os.environ.pop("COLUMNS", None)
    else:
      os.environ["COLUMNS"] = old
  return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
  markdown = _INCLUDE.sub(_include, markdown)
  if _CLI.search(markdown):
    markdown = _CLI.sub(lambda m: _cli_help(), markdown)
  return markdown
