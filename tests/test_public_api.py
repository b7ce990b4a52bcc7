"""The curated public surface: ``__all__`` everywhere, a real docstring for every name."""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = ("jaxdefense.data", "jaxdefense.dynamics", "jaxdefense.nn", "jaxdefense.models",
            "jaxdefense.attacks", "jaxdefense.certify", "jaxdefense.objectives",
            "jaxdefense.training", "jaxdefense.analysis", "jaxdefense.evaluation",
            "jaxdefense.configs", "jaxdefense.commands")

#: Internals that once leaked into the public namespaces (issue: "a curated public surface").
INTERNALS = ("split_output", "frozen", "CompiledStep", "STEP_FIELDS", "read_idx",
             "EXTENSION_MODULES", "register_command", "apply_fn_of")


def _public(package: str) -> list[tuple[str, object]]:
  mod = importlib.import_module(package)
  return [(name, getattr(mod, name)) for name in mod.__all__]


def _auto_doc(obj: object) -> bool:
  """The docstring Python writes itself for a dataclass / NamedTuple without one."""
  doc = obj.__doc__ or ""
  name = getattr(obj, "__name__", "")
  return doc.startswith(f"{name}(") or doc.startswith("Create new instance of")


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_declared_and_resolves(package):
  mod = importlib.import_module(package)
  assert isinstance(getattr(mod, "__all__", None), (list, tuple)), f"{package} has no __all__"
  missing = [n for n in mod.__all__ if not hasattr(mod, n)]
  assert not missing, f"{package}.__all__ names missing attributes: {missing}"
  assert len(set(mod.__all__)) == len(mod.__all__), f"duplicates in {package}.__all__"
  assert mod.__doc__ and mod.__doc__.strip(), f"{package} has no module docstring"


@pytest.mark.parametrize("package", PACKAGES)
def test_internals_are_not_public(package):
  mod = importlib.import_module(package)
  leaked = sorted(set(mod.__all__) & set(INTERNALS))
  assert not leaked, f"{package} exports internals {leaked}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_callable_has_a_docstring(package):
  undocumented = []
  for name, obj in _public(package):
    if inspect.ismodule(obj) or not callable(obj):
      continue  # constants are documented with #: comments next to them
    doc = inspect.getdoc(obj)
    if not doc or not doc.strip() or (inspect.isclass(obj) and _auto_doc(obj)):
      undocumented.append(name)
      continue
    # a function or class that takes arguments documents more than one line
    try:
      params = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
    except (TypeError, ValueError):
      params = []
    if params and len(doc.strip().splitlines()) < 2:
      undocumented.append(f"{name} (one line for {len(params)} arguments)")
  assert not undocumented, f"{package}: public names without a proper docstring: " \
                           f"{undocumented}"
