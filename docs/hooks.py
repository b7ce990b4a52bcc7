"""MkDocs hooks: pull the committed study reports, plots and CLI help into the site.

Nothing is copied into ``docs/`` by hand, so the site always shows what is committed:

* every PNG under ``experiments/*/results/`` is added to the build at its repository
  path (``experiments/enresnet/results/small/acc_vs_eps.png`` is served at that path),
  so a page embeds a plot with a relative link such as
  ``![...](experiments/enresnet/results/small/acc_vs_eps.png)``;
* a line ``<!-- include: PATH -->`` in a page is replaced by the Markdown file at
  ``PATH`` (relative to the repository root), its headings moved down two levels so that
  a report's title becomes a subsection of the page;
* a line ``<!-- cli-help -->`` is replaced by the ``--help`` text of ``jaxdefense`` and of
  each subcommand, produced by ``jaxdefense.commands._main.build_parser()``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLOTS = "experiments/*/results/**/*.png"
_INCLUDE = re.compile(r"^<!--\s*include:\s*(\S+)\s*-->\s*$", re.MULTILINE)
_CLI = re.compile(r"^<!--\s*cli-help\s*-->\s*$", re.MULTILINE)
_FENCE = re.compile(r"^\s*(```|~~~)")


def on_files(files, config):
  for path in sorted(ROOT.glob(PLOTS)):
    uri = path.relative_to(ROOT).as_posix()
    if files.get_file_from_path(uri) is None:
      files.append(File.generated(config, uri, abs_src_path=str(path)))
  return files


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
  return _shift_headings(path.read_text(encoding="utf-8"), 2)


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
