"""``jaxdefense config --config NAME|PATH [--config.key=value ...]`` or ``--list``.

Prints a resolved config (overrides applied and validated), or the known config names.
"""

from __future__ import annotations

import argparse

from jaxdefense import configs
from jaxdefense.commands._base import Command

__all__ = ["COMMAND"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default=None, help="preset name or .py file to print")
  p.add_argument("--list", action="store_true", help="list the known config names")


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  if args.list or args.config is None:
    print("\n".join(configs.names()))
    return 0
  print(configs.get(args.config, overrides))
  return 0


#: The ``config`` subcommand.
COMMAND = Command("config", "print a resolved config, or list the config names",
                  _add_arguments, _run, config_overrides=True)
