"""The ``jaxdefense`` command line: runtime set-up, the parser, and dispatch.

Usage::

  jaxdefense train   --config NAME|PATH --workdir DIR [--config.key=value ...]
  jaxdefense eval    --workdir DIR [--which latest|best] [--split test ...]
  jaxdefense config  --config NAME|PATH [--config.key=value ...]   # print a resolved config
  jaxdefense config  --list
  jaxdefense demo    [--quick] [--epochs N] [--workdir DIR]
  jaxdefense attack  --workdir DIR [--suite quick] [--eps 8/255] ...
  jaxdefense certify --workdir DIR [--eps 0.1] [--domain box,zonotope] ...
  jaxdefense report  STUDY_DIR

Common flags (any subcommand): ``--host_devices N`` (N CPU devices, for data
parallelism tests), ``--compile_cache DIR|none`` (persistent XLA cache), and
``--coordinator_address``, ``--num_processes``, ``--process_id`` (multi-host runs:
``jax.distributed.initialize`` is called only when one of them is given).

Errors: a bad input (a usage error, a :class:`~jaxdefense.commands._base.UserError` of a
subcommand's own checks, or a ``ValueError``, ``TypeError`` or missing / misplaced path
raised by the library's argument checks) prints ONE line, ``jaxdefense NAME: error:
MESSAGE``, on stderr and exits with status 2, as argparse does; a run that stops on a
non-finite loss prints one line and exits with status 1; Ctrl-C prints one line and
exits with status 130.  Any other exception is an internal error and shows its
traceback.  ``--traceback`` (any subcommand) or ``JAXDEFENSE_TRACEBACK=1`` re-raises
every error with its full traceback, for debugging.

The subcommands are the modules listed in :data:`SUBCOMMAND_MODULES`, each defining
``COMMAND``; there is no registry.  This package (with ``python -m jaxdefense``) is the
only place that touches environment variables and JAX flags; no library package
imports it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from types import ModuleType
from typing import Sequence

from jaxdefense import _xla_flags
from jaxdefense.commands import attack
from jaxdefense.commands import certify
from jaxdefense.commands import config
from jaxdefense.commands import demo
from jaxdefense.commands import eval as eval_
from jaxdefense.commands import report
from jaxdefense.commands import train
from jaxdefense.commands._base import Command, UserError, non_negative_int, positive_int

__all__ = ["SUBCOMMAND_MODULES", "COMMANDS", "USER_ERRORS", "TRACEBACK_ENV", "build_parser",
           "install_xla_flags", "main"]

#: The modules that define the subcommands, in ``jaxdefense --help`` order.
SUBCOMMAND_MODULES: tuple[ModuleType, ...] = (train, eval_, config, demo, attack, certify,
                                               report)

#: The subcommands (each module's ``COMMAND``), in the same order.
COMMANDS: tuple[Command, ...] = tuple(m.COMMAND for m in SUBCOMMAND_MODULES)

#: Exceptions that mean "the input is wrong" (flags, config, paths, data, checkpoint):
#: one line on stderr and exit status 2.  ``UserError`` is a ``ValueError``; the path
#: errors are the ``OSError`` kinds a user's path causes (missing, a file where a folder
#: is expected and the reverse, no permission).
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
    IsADirectoryError, FileExistsError, PermissionError)

#: Exceptions that mean "the run failed cleanly" (a non-finite loss stops training):
#: one line on stderr and exit status 1.
_RUN_FAILURES: tuple[type[BaseException], ...] = (FloatingPointError,)


def _run_failures() -> tuple[type[BaseException], ...]:
  # DistributedError lives in jaxdefense.training (imports JAX): looked up when needed
  from jaxdefense.training._distributed import DistributedError  # noqa: PLC0415
  return _RUN_FAILURES + (DistributedError,)

#: Environment variable that, set to a non-empty value other than 0/false/no/off, makes
#: the command line re-raise errors with their full traceback (as ``--traceback`` does).
TRACEBACK_ENV = "JAXDEFENSE_TRACEBACK"


class _Parser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose usage errors are one line (``PROG: error: ...``)
  with a pointer to ``--help`` instead of the multi-line usage; exit status 2 as usual.
  Sub-parsers inherit the class."""

  def error(self, message: str):  # noqa: D102 (argparse API)
    _fail(self.prog, f"{message} (see '{self.prog} --help')")


def _one_line(text: str) -> str:
  return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _fail(prog: str, message: str, code: int = 2):
  """Print ``PROG: error: MESSAGE`` as one line on stderr and exit with ``code``."""
  sys.stderr.write(f"{prog}: error: {_one_line(message)}\n")
  sys.stderr.flush()
  raise SystemExit(code)


def _traceback_wanted(args: argparse.Namespace | None) -> bool:
  if args is not None and getattr(args, "traceback", False):
    return True
  value = os.environ.get(TRACEBACK_ENV, "").strip().lower()
  return value not in ("", "0", "false", "no", "off")


def _message(error: BaseException) -> str:
  return _one_line(str(error)) or type(error).__name__


#: Programs that compile faster than this are not written to the persistent cache
#: (``jax_persistent_cache_min_compile_time_secs``).  0: every program, because a warm
#: start otherwise recompiles dozens of small ones (the demo: 19 of 33 at 0.5 s), see
#: ``benchmarks/compile_time.py``.
CACHE_MIN_COMPILE_S = 0.0


# ------------------------------------------------------------------- common flags
def _add_common(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("runtime")
  g.add_argument("--host_devices", type=positive_int, default=None, metavar="N",
                 help="split the CPU into N devices (XLA_FLAGS="
                      "--xla_force_host_platform_device_count=N)")
  g.add_argument("--compile_cache", default=None, metavar="DIR",
                 help="persistent XLA compilation cache folder (default "
                      "$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/jaxdefense/xla "
                      "or ~/.cache/jaxdefense/xla; 'none' disables it)")
  g.add_argument("--coordinator_address", default=None,
                 help="multi-host: address of process 0, host:port")
  g.add_argument("--num_processes", type=positive_int, default=None,
                 help="multi-host: process count")
  g.add_argument("--process_id", type=non_negative_int, default=None,
                 help="multi-host: this process")
  g.add_argument("--init_timeout", type=positive_int, default=300, metavar="S",
                 help="multi-host: seconds to wait for every process to join (default 300)")
  g.add_argument("--heartbeat_timeout", type=positive_int, default=100, metavar="S",
                 help="multi-host: seconds without a heartbeat after which a process counts "
                      "as dead and the others stop with an error (default 100)")
  g.add_argument("--traceback", action="store_true",
                 help=f"show the full Python traceback of an error instead of one line "
                      f"(also {TRACEBACK_ENV}=1)")


def install_xla_flags() -> bool:
  """Add the recommended XLA:CPU flags to ``XLA_FLAGS`` unless JAX has already started.

  A flag the user already set in ``XLA_FLAGS`` wins (see
  :func:`jaxdefense._xla_flags.with_recommended_cpu_flags`).

  Returns:
    Whether ``XLA_FLAGS`` was updated (False once JAX's backend exists: XLA reads the
    variable only when it starts).
  """
  if _xla_flags.backend_started():
    return False
  os.environ["XLA_FLAGS"] = _xla_flags.with_recommended_cpu_flags(os.environ.get("XLA_FLAGS"))
  return True


def _setup_runtime(args: argparse.Namespace) -> None:
  """Environment and JAX flags; must run before JAX creates its backend.

  Adds the XLA:CPU flags of :mod:`jaxdefense._xla_flags` (measured in
  ``benchmarks/TRAIN_STEP.md``) to ``XLA_FLAGS``; a flag the user already set there wins.
  """
  install_xla_flags()
  if args.host_devices:
    flag = f"--xla_force_host_platform_device_count={int(args.host_devices)}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
  import jax  # pylint: disable=import-outside-toplevel
  cache = args.compile_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if not cache:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cache = os.path.join(base, "jaxdefense", "xla")
  if cache.lower() != "none":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
  distributed = (args.coordinator_address, args.num_processes, args.process_id)
  if any(v is not None for v in distributed):
    from jaxdefense.training._distributed import initialize_distributed  # noqa: PLC0415
    try:
      initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                             timeout_s=args.init_timeout,
                             heartbeat_timeout_s=args.heartbeat_timeout)
    except ValueError as e:   # name the flags, not the Python arguments
      raise ValueError(re.sub(r"\b(coordinator_address|num_processes|process_id)\b",
                              r"--\1", str(e))) from e


# ----------------------------------------------------------------------- parser
def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
  """The argument parser: one sub-parser per subcommand, each with the runtime flags.

  Args:
    commands: the subcommands (default :data:`COMMANDS`).

  Returns:
    An ``argparse.ArgumentParser`` whose parsed namespace has ``command`` set to the
    chosen subcommand's name (a subcommand is required).

  Raises:
    TypeError: an entry of ``commands`` is not a :class:`Command`.
    ValueError: two subcommands share a name.
  """
  commands = COMMANDS if commands is None else tuple(commands)
  parser = _Parser(
      prog="jaxdefense", description="Robust deep learning as dynamics, in JAX/Flax.",
      epilog="Config fields are overridden with --config.key=value (nested keys with "
             "dots, typed by the field), e.g. --config.model.name=resnet8. A bad input "
             "prints one line, 'jaxdefense COMMAND: error: ...', and exits with status 2; "
             f"--traceback or {TRACEBACK_ENV}=1 shows the full traceback instead.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  seen = set()
  for cmd in commands:
    if not isinstance(cmd, Command):
      raise TypeError(f"commands must hold Command objects; got {cmd!r}.")
    if cmd.name in seen:
      raise ValueError(f"commands: the subcommand name {cmd.name!r} appears twice.")
    seen.add(cmd.name)
    p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
    cmd.add_arguments(p)
    _add_common(p)
  return parser


def _split_overrides(rest: Sequence[str]) -> tuple[list[str], list[str]]:
  overrides, unknown = [], []
  i = 0
  while i < len(rest):
    token = rest[i]
    if token.startswith("--config."):
      if "=" in token:
        overrides.append(token[len("--config."):])
      elif i + 1 < len(rest):
        overrides.append(f"{token[len('--config.'):]}={rest[i + 1]}")
        i += 1
      else:
        unknown.append(token)
    else:
      unknown.append(token)
    i += 1
  return overrides, unknown


# ------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
  """Run the command line; returns the exit status of a successful run.

  Parses the subcommand, its flags and its ``--config.key=value`` overrides, sets up
  the runtime (XLA flags, host devices, compilation cache, ``jax.distributed``) from the
  common flags before JAX starts, and runs the subcommand.

  Every failure leaves through ``SystemExit`` (as argparse's own usage errors do), so an
  in-process caller sees the same exit statuses as the shell:

  * 2: a bad input: a usage error (unknown flag, a flag value rejected at parse time,
    ``--config.*`` flags given to a subcommand that takes none), or one of
    :data:`USER_ERRORS` raised while running (``ValueError``, ``TypeError``,
    ``FileNotFoundError``... from the library's checks, ``UserError`` from the
    subcommand's).  One line on stderr: ``jaxdefense NAME: error: MESSAGE``.
  * 1: the run stopped cleanly on a non-finite loss (``FloatingPointError``); one line.
  * 130: interrupted with Ctrl-C (``KeyboardInterrupt``); one line.
  * 0: ``--help``.

  With ``--traceback`` or ``JAXDEFENSE_TRACEBACK=1`` the exceptions of a run are
  re-raised unchanged (full traceback).  Other exceptions (internal errors) always
  propagate with their traceback.

  Args:
    argv: arguments without the program name (default ``sys.argv[1:]``).

  Returns:
    0 on success, or the subcommand's own status.

  Raises:
    SystemExit: as listed above.
    Exception: an internal error (anything not listed above), unchanged.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = {cmd.name: cmd for cmd in COMMANDS}
  parser = build_parser(tuple(commands.values()))
  args, rest = parser.parse_known_args(argv)
  cmd = commands[args.command]
  prog = f"{parser.prog} {cmd.name}"
  overrides, unknown = _split_overrides(rest)
  if unknown or (overrides and not cmd.config_overrides):
    _fail(prog, f"unrecognized arguments for {cmd.name!r}: {' '.join(unknown or rest)} "
                f"(see '{prog} --help')")
  debug = _traceback_wanted(args)
  try:
    _setup_runtime(args)
    return int(cmd.run(args, overrides) or 0)
  except USER_ERRORS as e:
    if debug:
      raise
    _fail(prog, _message(e), 2)
  except _run_failures() as e:
    if debug:
      raise
    _fail(prog, _message(e), 1)
  except KeyboardInterrupt:
    if debug:
      raise
    sys.stderr.write(f"{prog}: interrupted\n")
    raise SystemExit(130) from None
