"""``jaxdefense eval --workdir DIR [--which latest|best] [--split S ...]``.

Prints the loss and clean accuracy of a run's latest or best checkpoint as a table.
"""

from __future__ import annotations

import argparse

from jaxdefense import training
from jaxdefense._table import format_table
from jaxdefense.commands._base import Command, positive_int

__all__ = ["COMMAND"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="a training run's folder")
  p.add_argument("--which", choices=("latest", "best"), default="latest",
                 help="checkpoint to evaluate (default latest)")
  p.add_argument("--split", action="append", choices=("train", "validation", "test"),
                 help="split(s) to evaluate (repeatable; default test)")
  p.add_argument("--data_dir", default=None, help="data folder (default: the run's)")
  p.add_argument("--batch_size", type=positive_int, default=None,
                 help="evaluation batch size, >= 1 (default: the run's eval_batch_size)")


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  del overrides  # not accepted (config_overrides=False)
  rows = training.evaluate_checkpoint(args.workdir, which=args.which,
                                      splits=tuple(args.split or ("test",)),
                                      data_dir=args.data_dir, batch_size=args.batch_size)
  title = f"{rows[0]['run']}: {args.which} checkpoint, step {rows[0]['step']}"
  print(format_table(rows, ["split", "loss", "accuracy", "examples"], title=title))
  return 0


#: The ``eval`` subcommand.
COMMAND = Command("eval", "clean accuracy of a run's latest or best checkpoint",
                  _add_arguments, _run)
