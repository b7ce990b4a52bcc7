"""Finding configs: built-in presets, ``experiments/configs/`` of a checkout, ``.py`` paths."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import pathlib
import pkgutil
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from jaxdefense.configs import presets as _presets
from jaxdefense.configs._base import validate
from jaxdefense.configs._overrides import override

__all__ = ["get", "names", "search_dirs", "load_file"]


def search_dirs(extra: Sequence[str | os.PathLike] = ()) -> list[pathlib.Path]:
  """Folders searched for ``NAME.py`` config files after the built-in presets.

  In order: ``extra``; ``./experiments/configs`` under the current directory; the
  ``experiments/configs`` folder of the source checkout that holds this package (when
  the package is installed editable or run from the tree).  Only existing folders are
  returned.
  """
  candidates = [pathlib.Path(p) for p in extra]
  candidates.append(pathlib.Path.cwd() / "experiments" / "configs")
  candidates.append(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs")
  out: list[pathlib.Path] = []
  for c in candidates:
    c = c.resolve()
    if c.is_dir() and c not in out:
      out.append(c)
  return out


def _preset_names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(_presets.__path__)
                if not m.name.startswith("_"))


def _file_names(dirs: Iterable[pathlib.Path]) -> list[str]:
  out = []
  for d in dirs:
    out.extend(p.stem for p in d.glob("*.py") if not p.stem.startswith("_"))
  return sorted(set(out))


def names(extra_dirs: Sequence[str | os.PathLike] = ()) -> list[str]:
  """Names accepted by :func:`get`: built-in presets, then configs found in
  :func:`search_dirs` (a checkout's ``experiments/configs``)."""
  return sorted(set(_preset_names()) | set(_file_names(search_dirs(extra_dirs))))


def _call_get_config(module: Any, arg: str | None, where: str) -> ml_collections.ConfigDict:
  fn = getattr(module, "get_config", None)
  if not callable(fn):
    raise ValueError(f"config file {where} has no get_config() function.")
  takes_arg = bool(inspect.signature(fn).parameters)
  if arg is not None and not takes_arg:
    raise ValueError(f"config {where} takes no argument; got ':{arg}'.")
  config = fn(arg) if (takes_arg and arg is not None) else fn()
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise TypeError(f"get_config() of {where} must return an ml_collections.ConfigDict; "
                    f"got {type(config).__name__}.")
  return config


def load_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
  """Run ``get_config()`` (or ``get_config(arg)``) of a Python config file.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file defines no ``get_config``.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
  name = f"_jaxdefense_config_{abs(hash(str(path.resolve())))}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return _call_get_config(module, arg, repr(str(path)))


def get(name: str | os.PathLike, overrides: Iterable[str] | Mapping[str, Any] = (),
        *, extra_dirs: Sequence[str | os.PathLike] = ()) -> ml_collections.ConfigDict:
  """Load a config by preset name or file path, apply overrides and validate it.

  Lookup order for ``name``:

  1. a path to a ``.py`` file that defines ``get_config()`` (``path.py:arg`` calls
     ``get_config(arg)``);
  2. a built-in preset in ``jaxdefense.configs.presets`` (``demo``, ``digits_resnet``,
     ``fashion_mnist_resnet``, ``cifar10_resnet20``...), available wherever the
     package is installed;
  3. ``NAME.py`` in :func:`search_dirs` (``extra_dirs``, ``./experiments/configs``,
     the source checkout's ``experiments/configs``).

  Args:
    name: preset name, ``NAME:arg``, or a file path.
    overrides: ``["key.sub=value", ...]`` strings typed by the existing field, or a
      mapping of Python values (see :func:`jaxdefense.configs.override`).
    extra_dirs: more folders to search for ``NAME.py``.

  Returns:
    A validated, locked ``ConfigDict`` (all schema fields present; see
    :func:`jaxdefense.configs.base_config`).

  Raises:
    ValueError: unknown name (the message lists the known names and close matches),
      unknown override key, or a bad value.
    FileNotFoundError: a path that does not exist.
  """
  text = os.fspath(name)
  arg = None
  base, colon, rest = text.rpartition(":")
  if colon and base and not rest.startswith(("/", "\\")):
    text, arg = base, rest
  if text.endswith(".py") or os.sep in text or "/" in text:
    config = load_file(text, arg)
  elif text in _preset_names():
    module = importlib.import_module(f"{_presets.__name__}.{text}")
    config = _call_get_config(module, arg, f"preset {text!r}")
  else:
    found = [d / f"{text}.py" for d in search_dirs(extra_dirs) if (d / f"{text}.py").is_file()]
    if not found:
      known = names(extra_dirs)
      close = difflib.get_close_matches(text, known, n=3)
      hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
      raise ValueError(f"unknown config {text!r}: not a built-in preset, not a file, and "
                       f"not in {[str(d) for d in search_dirs(extra_dirs)]}.{hint} Known "
                       f"configs: {', '.join(known)}.")
    config = load_file(found[0], arg)
  config = validate(config)
  if overrides:
    config = validate(override(config, overrides))
  return config
