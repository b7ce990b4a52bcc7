"""``jaxdefense train --config NAME|PATH --workdir DIR [--config.key=value ...]``.

Trains a model from a config; an existing run in ``--workdir`` is resumed.
"""

from __future__ import annotations

import argparse

from jaxdefense import configs, training
from jaxdefense.commands._base import Command

__all__ = ["COMMAND"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True,
                 help="preset name (jaxdefense config --list), NAME:arg, or a .py file")
  p.add_argument("--workdir", required=True, help="folder for checkpoints and metrics "
                 "(an existing run there is resumed)")


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  config = configs.get(args.config, overrides)
  training.train_and_evaluate(config, args.workdir)
  return 0


#: The ``train`` subcommand.
COMMAND = Command("train", "train a model from a config (resumes an existing run)",
                  _add_arguments, _run, config_overrides=True)
