"""The ``jaxdefense`` command line: parses flags and calls the library (kept thin).

Usage::

  jaxdefense train --config NAME|PATH --workdir DIR [--config.key=value ...]
  jaxdefense eval  --workdir DIR [--which latest|best] [--split test ...]
  jaxdefense demo  [--quick] [--epochs N] [--workdir DIR]
  jaxdefense config --config NAME|PATH [--config.key=value ...]   # print a resolved config
  jaxdefense config --list

Common flags (any subcommand): ``--host_devices N`` (N CPU devices, for data
parallelism tests), ``--compile_cache DIR|none`` (persistent XLA cache), and
``--coordinator_address``, ``--num_processes``, ``--process_id`` (multi-host runs:
``jax.distributed.initialize`` is called only when one of them is given).

More subcommands plug in through :func:`register`: a module listed in
:data:`EXTENSION_MODULES` (or imported before :func:`main` runs) calls
``register(Command(...))`` at import time; a missing extension module is skipped.
This module and ``python -m jaxdefense`` are the only places that touch environment
variables and JAX flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Callable, Sequence

from jaxdefense import _xla_flags

__all__ = ["Command", "parse_eps", "register", "commands", "build_parser", "main", "EXTENSION_MODULES"]

#: Modules that may register more subcommands (``attack``, ``certify``, ``report``).
EXTENSION_MODULES = (
    "jaxdefense.attacks._cli",
    "jaxdefense.certify._cli",
    "jaxdefense.evaluation._cli",
)

_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError)


@dataclasses.dataclass(frozen=True)
class Command:
  """A subcommand.

  Attributes:
    name: the subcommand word (``jaxdefense NAME``).
    help: one line for ``jaxdefense --help``.
    add_arguments: ``fn(parser)`` adding the subcommand's flags.
    run: ``fn(args, overrides) -> exit code``; ``overrides`` are the
      ``key=value`` strings of the ``--config.key=value`` flags.
    config_overrides: whether ``--config.key=value`` flags are accepted.
  """
  name: str
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, list[str]], int]
  config_overrides: bool = False


_COMMANDS: dict[str, Command] = {}


def parse_eps(text: str) -> float:
  """A radius flag: ``0.1`` or a fraction such as ``8/255`` (for argparse ``type=``)."""
  try:
    if "/" in text:
      num, den = text.split("/", 1)
      return float(num) / float(den)
    return float(text)
  except (ValueError, ZeroDivisionError):
    raise argparse.ArgumentTypeError(
        f"expected a number or a fraction like 8/255; got {text!r}") from None


def register(command: Command) -> Command:
  """Add a subcommand (a later registration of the same name replaces it)."""
  _COMMANDS[command.name] = command
  return command


def commands() -> dict[str, Command]:
  """The registered subcommands by name."""
  return dict(_COMMANDS)


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


# ---------------------------------------------------------------- subcommands
def _train_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True,
                 help="preset name (jaxdefense config --list), NAME:arg, or a .py file")
  p.add_argument("--workdir", required=True, help="folder for checkpoints and metrics "
                 "(an existing run there is resumed)")


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
  from jaxdefense import configs, training  # pylint: disable=import-outside-toplevel
  config = configs.get(args.config, overrides)
  training.train_and_evaluate(config, args.workdir)
  return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="a training run's folder")
  p.add_argument("--which", choices=("latest", "best"), default="latest",
                 help="checkpoint to evaluate (default latest)")
  p.add_argument("--split", action="append", choices=("train", "validation", "test"),
                 help="split(s) to evaluate (repeatable; default test)")
  p.add_argument("--data_dir", default=None, help="data folder (default: the run's)")
  p.add_argument("--batch_size", type=int, default=None, help="evaluation batch size")


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
  from jaxdefense import training  # pylint: disable=import-outside-toplevel
  rows = training.evaluate_checkpoint(args.workdir, which=args.which,
                                      splits=tuple(args.split or ("test",)),
                                      data_dir=args.data_dir, batch_size=args.batch_size)
  title = f"{rows[0]['run']}: {args.which} checkpoint, step {rows[0]['step']}"
  print(training.format_table(rows, ["split", "loss", "accuracy", "examples"], title=title))
  return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--quick", action="store_true", help="one epoch only (smoke test)")
  p.add_argument("--epochs", type=int, default=None, help="epochs per network")
  p.add_argument("--workdir", default=None,
                 help="keep the runs here (default: a temporary folder)")


def _demo(args: argparse.Namespace, overrides: list[str]) -> int:
  from jaxdefense._demo import run_demo  # pylint: disable=import-outside-toplevel
  run_demo(args.workdir, quick=args.quick, epochs=args.epochs, overrides=overrides)
  return 0


def _config_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default=None, help="preset name or .py file to print")
  p.add_argument("--list", action="store_true", help="list the known config names")


def _config(args: argparse.Namespace, overrides: list[str]) -> int:
  from jaxdefense import configs  # pylint: disable=import-outside-toplevel
  if args.list or args.config is None:
    print("\n".join(configs.names()))
    return 0
  print(configs.get(args.config, overrides))
  return 0


register(Command("train", "train a model from a config (resumes an existing run)",
                 _train_args, _train, config_overrides=True))
register(Command("eval", "clean accuracy of a run's latest or best checkpoint",
                 _eval_args, _eval))
register(Command("demo", "train a ResNet and an EnResNet on digits, attack both, compare them",
                 _demo_args, _demo, config_overrides=True))
register(Command("config", "print a resolved config, or list the config names",
                 _config_args, _config, config_overrides=True))


# ----------------------------------------------------------------------- main
def _load_extensions() -> None:
  for name in EXTENSION_MODULES:
    try:
      importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name is None or not name.startswith(e.name):
        raise


def build_parser() -> argparse.ArgumentParser:
  """The argument parser with every registered subcommand."""
  parser = argparse.ArgumentParser(
      prog="jaxdefense", description="Robust deep learning as dynamics, in JAX/Flax.",
      epilog="Config fields are overridden with --config.key=value (nested keys with "
             "dots, typed by the field), e.g. --config.model.name=resnet8.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  for cmd in _COMMANDS.values():
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


def main(argv: Sequence[str] | None = None) -> int:
  """Run the command line; returns the exit status (0 on success, 1 on a clear error).

  Args:
    argv: arguments without the program name (default ``sys.argv[1:]``).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  pre = argparse.ArgumentParser(add_help=False)
  _add_common(pre)
  early, _ = pre.parse_known_args(argv)
  _setup_runtime(early)
  _load_extensions()
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  cmd = _COMMANDS[args.command]
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
