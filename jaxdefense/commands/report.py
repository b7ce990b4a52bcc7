"""``jaxdefense report DIR [--out DIR] [--generic]``.

Renders a study's ``DIR/results.json`` (written by
:func:`jaxdefense.evaluation.run_study`) into ``report.md`` and its plots, with the
study's own sections (loaded from the spec file the results name) or, with
``--generic``, one table of every metric.  Nothing is trained or evaluated.
"""

from __future__ import annotations

import argparse

from jaxdefense import evaluation
from jaxdefense.commands._base import Command

__all__ = ["COMMAND"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("dir", help="a study's results folder (holding results.json)")
  p.add_argument("--out", default=None, help="write the report here (default: DIR)")
  p.add_argument("--generic", action="store_true",
                 help="a table of every metric instead of the study's own report")


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  del overrides  # not accepted (config_overrides=False)
  path = evaluation.render_report(args.dir, args.out, generic=args.generic)
  print(f"wrote {path}")
  return 0


#: The ``report`` subcommand.
COMMAND = Command("report", "render a study's results.json into its markdown report and "
                  "plots", _add_arguments, _run)
