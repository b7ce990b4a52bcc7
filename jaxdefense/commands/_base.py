"""What every subcommand is made of: the :class:`Command` record and shared flag types."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

__all__ = ["Command", "parse_eps"]


@dataclasses.dataclass(frozen=True)
class Command:
  """One subcommand of the ``jaxdefense`` command line.

  Each module of :mod:`jaxdefense.commands` that defines a subcommand holds one
  ``COMMAND = Command(...)``; :mod:`jaxdefense.commands._main` lists those modules
  explicitly.

  Attributes:
    name: the subcommand word (``jaxdefense NAME``): a non-empty string without spaces.
    help: one line shown by ``jaxdefense --help``.
    add_arguments: ``fn(parser)`` adding the subcommand's flags to an
      ``argparse.ArgumentParser``.
    run: ``fn(args, overrides) -> exit code`` (``None`` counts as 0); ``args`` is the
      parsed ``argparse.Namespace`` and ``overrides`` the ``key=value`` strings of the
      ``--config.key=value`` flags (empty unless ``config_overrides``).
    config_overrides: whether ``--config.key=value`` flags are accepted (default False:
      they are reported as unrecognized arguments).

  Raises:
    TypeError: a field of the wrong type (``add_arguments`` or ``run`` not callable).
    ValueError: an empty ``name`` or one with white space.
  """
  name: str
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, list[str]], int | None]
  config_overrides: bool = False

  def __post_init__(self):
    if not isinstance(self.name, str):
      raise TypeError(f"Command name must be a str; got {self.name!r}.")
    if not self.name or any(c.isspace() for c in self.name):
      raise ValueError(f"Command name must be one non-empty word; got {self.name!r}.")
    if not isinstance(self.help, str):
      raise TypeError(f"Command {self.name!r}: help must be a str; got {self.help!r}.")
    for field in ("add_arguments", "run"):
      if not callable(getattr(self, field)):
        raise TypeError(f"Command {self.name!r}: {field} must be callable; "
                        f"got {getattr(self, field)!r}.")
    if not isinstance(self.config_overrides, bool):
      raise TypeError(f"Command {self.name!r}: config_overrides must be a bool; "
                      f"got {self.config_overrides!r}.")


def parse_eps(text: str) -> float:
  """A radius flag (``argparse`` ``type=``): ``0.1`` or a fraction such as ``8/255``.

  Args:
    text: the flag's value.

  Returns:
    The number as a float (not range-checked here; the library checks it).

  Raises:
    argparse.ArgumentTypeError: ``text`` is neither a number nor a fraction of two
      numbers (or divides by zero); argparse turns it into a usage error naming the flag.
  """
  try:
    if "/" in text:
      num, den = text.split("/", 1)
      return float(num) / float(den)
    return float(text)
  except (ValueError, ZeroDivisionError):
    raise argparse.ArgumentTypeError(
        f"expected a number or a fraction like 8/255; got {text!r}") from None
