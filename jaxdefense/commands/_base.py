"""What every subcommand is made of: the :class:`Command` record, the :class:`UserError`
of command-level checks, and shared flag types (``argparse`` ``type=`` helpers that
reject bad values at parse time, naming the flag)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

__all__ = ["Command", "UserError", "int_at_least", "non_negative_int", "parse_eps",
           "positive_int"]


class UserError(ValueError):
  """A bad input caught by a subcommand's own checks (not by the library).

  The command line prints it as one line, ``jaxdefense NAME: error: MESSAGE``, and exits
  with status 2, as it does for the library's ``ValueError``/``TypeError`` (see
  :func:`jaxdefense.commands.main`).  A ``ValueError`` subclass, so that code calling a
  subcommand in-process can catch it as one.  The message should name the flag, the
  value and what was expected.
  """


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


def int_at_least(minimum: int, note: str = "") -> Callable[[str], int]:
  """An integer flag type (``argparse`` ``type=``) that rejects values below ``minimum``.

  Args:
    minimum: the smallest accepted value (e.g. 1 for sizes and counts that must not be
      zero, 0 for counts where 0 has a meaning).
    note: optional words appended to the error, e.g. ``"0: all"``.

  Returns:
    ``parse(text) -> int``; it raises ``argparse.ArgumentTypeError`` for text that is
    not an integer or is below ``minimum``, which argparse reports as a usage error
    naming the flag: ``argument --batch_size: expected an integer >= 1; got '0'``.

  Raises:
    TypeError: ``minimum`` is not an int (or is a bool).
  """
  if isinstance(minimum, bool) or not isinstance(minimum, int):
    raise TypeError(f"minimum must be an int; got {minimum!r}.")
  expected = f"an integer >= {minimum}" + (f" ({note})" if note else "")

  def parse(text: str) -> int:
    try:
      value = int(text)
    except (TypeError, ValueError):
      raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return value

  parse.__name__ = f"int>={minimum}"
  return parse


#: ``type=`` for sizes and counts that must be at least 1 (batch sizes, epochs, devices).
positive_int = int_at_least(1)
#: ``type=`` for counts that may be 0 (steps that can be skipped, process ids).
non_negative_int = int_at_least(0)
