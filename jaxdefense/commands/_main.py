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

The subcommands are the modules listed in :data:`SUBCOMMAND_MODULES`, each defining
``COMMAND``; there is no registry.  This package (with ``python -m jaxdefense``) is the
only place that touches environment variables and JAX flags; no library package
imports it.
"""

from __future__ import annotations

import argparse
import os
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
from jaxdefense.commands._base import Command

__all__ = ["SUBCOMMAND_MODULES", "COMMANDS", "build_parser", "install_xla_flags", "main"]

#: The modules that define the subcommands, in ``jaxdefense --help`` order.
SUBCOMMAND_MODULES: tuple[ModuleType, ...] = (train, eval_, config, demo, attack, certify,
                                               report)

#: The subcommands (each module's ``COMMAND``), in the same order.
COMMANDS: tuple[Command, ...] = tuple(m.COMMAND for m in SUBCOMMAND_MODULES)

_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError)


# ------------------------------------------------------------------- common flags
def _add_common(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("runtime")
  g.add_argument("--host_devices", type=int, default=None, metavar="N",
                 help="split the CPU into N devices (XLA_FLAGS="
                      "--xla_force_host_platform_device_count=N)")
  g.add_argument("--compile_cache", default=None, metavar="DIR",
                 help="persistent XLA compilation cache folder (default "
                      "$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/jaxdefense/xla "
                      "or ~/.cache/jaxdefense/xla; 'none' disables it)")
  g.add_argument("--coordinator_address", default=None,
                 help="multi-host: address of process 0, host:port")
  g.add_argument("--num_processes", type=int, default=None, help="multi-host: process count")
  g.add_argument("--process_id", type=int, default=None, help="multi-host: this process")


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
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  distributed = (args.coordinator_address, args.num_processes, args.process_id)
  if any(v is not None for v in distributed):
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes,
                               process_id=args.process_id)


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
  parser = argparse.ArgumentParser(
      prog="jaxdefense", description="Robust deep learning as dynamics, in JAX/Flax.",
      epilog="Config fields are overridden with --config.key=value (nested keys with "
             "dots, typed by the field), e.g. --config.model.name=resnet8.")
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
  """Run the command line; returns the exit status.

  Sets up the runtime (XLA flags, host devices, compilation cache, ``jax.distributed``)
  from the common flags before JAX starts, parses the subcommand and its
  ``--config.key=value`` overrides, and runs it.

  Args:
    argv: arguments without the program name (default ``sys.argv[1:]``).

  Returns:
    0 on success (or the subcommand's own code), 1 on a clear error (a ``ValueError``,
    ``TypeError``, ``FileNotFoundError`` or ``FloatingPointError``, printed as
    ``jaxdefense NAME: error: ...`` on stderr), 130 on Ctrl-C.

  Raises:
    SystemExit: from argparse on a usage error (code 2; also for ``--config.*`` flags
      given to a subcommand that takes none) and for ``--help`` (code 0).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  pre = argparse.ArgumentParser(add_help=False)
  _add_common(pre)
  early, _ = pre.parse_known_args(argv)
  _setup_runtime(early)
  commands = {cmd.name: cmd for cmd in COMMANDS}
  parser = build_parser(tuple(commands.values()))
  args, rest = parser.parse_known_args(argv)
  cmd = commands[args.command]
  overrides, unknown = _split_overrides(rest)
  if unknown or (overrides and not cmd.config_overrides):
    parser.error(f"unrecognized arguments for {cmd.name!r}: {' '.join(unknown or rest)}")
  try:
    return int(cmd.run(args, overrides) or 0)
  except _ERRORS as e:
    print(f"jaxdefense {cmd.name}: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"jaxdefense {cmd.name}: interrupted", file=sys.stderr)
    return 130
