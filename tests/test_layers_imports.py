"""Imports flow downward only (DESIGN.md, "Layers of the code"), and nothing in the
library imports the command line.

The checks read every ``import`` statement of every module under ``jaxdefense/`` with
``ast`` (module level, inside functions and under ``if TYPE_CHECKING``), plus
``importlib.import_module("jaxdefense...")`` / ``__import__`` calls with a constant name,
without importing anything.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Iterator, Mapping

import pytest

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "jaxdefense"

#: Floors of the library, lowest first (DESIGN.md).  A module may import its own floor
#: and any floor below it.  ``_checks``, ``_table``, ``_xla_flags`` (every top-level
#: ``jaxdefense/_*.py`` module) are the ground floor, below ``nn``.  ``configs`` sits
#: just below ``training``: it may be imported by training, analysis, evaluation and
#: commands only.
#: ``data`` is an exception to the order: it may import only the ground floor
#: (DESIGN.md: "data/ depends only on the ground-floor helpers"), not ``nn``.
FLOORS = ("_ground", "nn", "data", "dynamics", "models", "attacks", "certify", "objectives",
          "configs", "training", "analysis", "evaluation", "commands")
GROUND = "_ground"
#: ``jaxdefense/__init__.py``: the package facade, above every library floor and below
#: the command line (it imports the library floors; it must not import ``commands``).
ROOT = "_root"
COMMANDS = "commands"
#: Floors that may import nothing but the ground floor (and themselves).
GROUND_ONLY = ("data",)

#: Upward imports that exist today, as ``(file relative to jaxdefense/, imported floor):
#: reason``.  Reported to the lead; the list may only shrink (a stale entry fails).
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _rank(floor: str) -> float:
  if floor == ROOT:
    return FLOORS.index(COMMANDS) - 0.5
  return FLOORS.index(floor)


def floor_of_file(rel: str) -> str:
  """The floor of a module given by its path relative to ``jaxdefense/``."""
  parts = pathlib.PurePosixPath(rel).parts
  if len(parts) == 1:
    if parts[0] == "__init__.py":
      return ROOT
    if parts[0] == "__main__.py":  # `python -m jaxdefense`: an entry point, top floor
      return COMMANDS
    if parts[0].startswith("_"):
      return GROUND
  floor = parts[0].removesuffix(".py")
  if floor not in FLOORS:
    raise AssertionError(f"jaxdefense/{rel}: floor {floor!r} is not in FLOORS {FLOORS}; "
                         "add it where DESIGN.md puts it.")
  return floor


def _module_name(rel: str) -> str:
  parts = list(pathlib.PurePosixPath(rel).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(["jaxdefense", *parts])


def imported_modules(rel: str, source: str) -> Iterator[tuple[int, str]]:
  """``(line, dotted name)`` of every ``jaxdefense`` module a source file imports.

  ``from jaxdefense import data`` yields ``jaxdefense.data``; relative imports are
  resolved against the file's package.
  """
  module = _module_name(rel)
  package = module if rel.endswith("__init__.py") else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(source, filename=rel)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      if target == "jaxdefense":
        for alias in node.names:
          yield node.lineno, f"{target}.{alias.name}"
      else:
        yield node.lineno, target
    elif isinstance(node, ast.Call) and node.args:
      fn = node.func
      name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
      arg = node.args[0]
      if (name in ("import_module", "__import__") and isinstance(arg, ast.Constant)
          and isinstance(arg.value, str)):
        yield node.lineno, arg.value


def floor_of_module(name: str) -> str | None:
  """The floor of a dotted ``jaxdefense...`` module name (None: not ``jaxdefense``)."""
  parts = name.split(".")
  if parts[0] != "jaxdefense":
    return None
  if len(parts) == 1:
    return ROOT
  top = parts[1]
  if top in FLOORS:
    return top
  if top == "__main__":
    return COMMANDS
  if top.startswith("_") and (PACKAGE_DIR / f"{top}.py").exists():
    return GROUND
  return ROOT  # a name of the package facade, e.g. `from jaxdefense import __version__`


def violations(sources: Mapping[str, str]) -> list[tuple[str, int, str, str, str]]:
  """Upward imports: ``(file, line, imported module, file's floor, imported floor)``.

  Args:
    sources: module source text by path relative to ``jaxdefense/``.
  """
  found = []
  for rel, source in sorted(sources.items()):
    floor = floor_of_file(rel)
    for line, name in imported_modules(rel, source):
      target = floor_of_module(name)
      if target is None or target == floor:
        continue
      if floor == ROOT:
        ok = target != COMMANDS
      elif floor in GROUND_ONLY:
        ok = target == GROUND
      else:
        ok = _rank(target) < _rank(floor)
      if not ok:
        found.append((rel, line, name, floor, target))
  return found


def library_sources() -> dict[str, str]:
  """Source text of every module under ``jaxdefense/`` by relative path."""
  return {p.relative_to(PACKAGE_DIR).as_posix(): p.read_text()
          for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def test_no_library_module_imports_the_command_line():
  offenders = []
  for rel, source in library_sources().items():
    if floor_of_file(rel) == COMMANDS:  # commands/ itself and __main__.py
      continue
    for line, name in imported_modules(rel, source):
      if floor_of_module(name) == COMMANDS:
        offenders.append(f"jaxdefense/{rel}:{line} imports {name}")
  assert not offenders, "the library must not import the command line:\n" + "\n".join(
      offenders)


def test_imports_follow_the_layer_order():
  found = violations(library_sources())
  new = [f"jaxdefense/{rel}:{line} ({floor}) imports {name} ({target})"
         for rel, line, name, floor, target in found
         if (rel, target) not in KNOWN_EXCEPTIONS]
  seen = {(rel, target) for rel, _, _, _, target in found}
  stale = [f"{rel} -> {target}" for rel, target in KNOWN_EXCEPTIONS if (rel, target) not in seen]
  assert not new, "imports against the layer order (DESIGN.md):\n" + "\n".join(new)
  assert not stale, "fixed, remove from KNOWN_EXCEPTIONS:\n" + "\n".join(stale)


def test_every_package_has_a_floor():
  for p in PACKAGE_DIR.iterdir():
    if (p / "__init__.py").exists():
      assert p.name in FLOORS, f"jaxdefense/{p.name}/ is not in FLOORS {FLOORS}"
    elif p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"):
      assert p.name.startswith("_"), f"jaxdefense/{p.name}: a top-level module must be a " \
                                     "ground-floor helper (_name.py) or go in a package"


@pytest.mark.parametrize("rel, source, bad", [
    ("data/_x.py", "from jaxdefense import models\n", "jaxdefense.models"),
    ("data/_x.py", "import jaxdefense.nn.layers\n", "jaxdefense.nn.layers"),
    ("dynamics/_x.py", "from jaxdefense.models import create\n", "jaxdefense.models"),
    ("data/_x.py", "from jaxdefense import configs\n", "jaxdefense.configs"),
    ("models/_x.py", "def f():\n  from ..commands import _main\n", "jaxdefense.commands"),
    ("nn/_x.py", "import importlib\nimportlib.import_module('jaxdefense.training')\n",
     "jaxdefense.training"),
    ("training/_x.py", "from jaxdefense.commands._base import Command\n",
     "jaxdefense.commands._base"),
    ("_checks.py", "from jaxdefense.nn import Dense\n", "jaxdefense.nn"),
    ("evaluation/_x.py", "from jaxdefense import __version__\n", "jaxdefense.__version__"),
    ("__init__.py", "from jaxdefense import commands\n", "jaxdefense.commands"),
])
def test_the_checker_finds_upward_imports(rel, source, bad):
  found = violations({rel: source})
  assert [name for _, _, name, _, _ in found] == [bad]


@pytest.mark.parametrize("rel, source", [
    ("data/_x.py", "from jaxdefense import _checks\nfrom jaxdefense.data import _y\n"),
    ("dynamics/_x.py", "from jaxdefense import nn, data\n"),
    ("models/_x.py", "from . import _resnet\nfrom ..dynamics import Euler\nimport numpy\n"),
    ("certify/_x.py", "from jaxdefense.attacks import pgd\nfrom jaxdefense import nn\n"),
    ("training/_x.py", "from jaxdefense import configs, objectives, _table\n"),
    ("commands/_x.py", "import jaxdefense\nfrom jaxdefense import evaluation, configs\n"),
    ("__main__.py", "from jaxdefense.commands import main\n"),
    ("__init__.py", "from jaxdefense import data, evaluation, configs\n"),
])
def test_the_checker_allows_downward_imports(rel, source):
  assert violations({rel: source}) == []
