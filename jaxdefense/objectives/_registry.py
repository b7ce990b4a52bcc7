"""Objectives by name and from configs (``{"name": "pgd", "eps": 0.031, ...}``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from jaxdefense.objectives import _adversarial
from jaxdefense.objectives import _certified
from jaxdefense.objectives import _lad
from jaxdefense.objectives import _parser


def diffai(text: str = "Baseline", eps: float | None = None) -> Any:
  """The objective of a DiffAI language string (``jaxdefense.objectives.parse``).

  Config form: ``{"name": "diffai", "text": "Mix(Point, Sub(Lin(0, 1, 2, 3), Box),
  Lin(0, 0.5, 2, 3))", "eps": 0.1}``; ``text`` may be a preset name (``"InSamp"``).

  Raises:
    ValueError: text outside the language (with its position), a bad ``eps``.
    TypeError: ``text`` is not a string.
  """
  return _parser.parse(text, eps=eps)

_REGISTRY: dict[str, Callable[..., Any]] = {
    "natural": _adversarial.Natural,
    "pgd": _adversarial.PGDAdversarial,
    "trades": _adversarial.TRADES,
    "certified": _certified.CertifiedObjective,
    "lad": _lad.LAD,
    "diffai": diffai,
}
_ALIASES: dict[str, str] = {
    "clean": "natural", "standard": "natural", "ce": "natural",
    "pgd_at": "pgd", "madry": "pgd", "adversarial": "pgd",
    "ibp": "certified", "diffai_language": "diffai", "dsl": "diffai",
    "layerwise": "lad",
}


def names() -> list[str]:
  """Registered objective names (aliases not included), sorted."""
  return sorted(_REGISTRY)


def register(name: str, factory: Callable[..., Any], *, overwrite: bool = False) -> None:
  """Add an objective class (a frozen dataclass) under ``name``.

  Raises:
    TypeError: ``name`` is not a string or ``factory`` is not callable.
    ValueError: ``name`` is taken and ``overwrite`` is False.
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"name must be a non-empty string; got {name!r}.")
  if not callable(factory):
    raise TypeError(f"factory must be callable; got {factory!r}.")
  key = _normalise(name)
  if key in _ALIASES:
    raise ValueError(f"objective name {name!r} is an alias of {_ALIASES[key]!r}; register "
                     f"under another name or overwrite {_ALIASES[key]!r}.")
  if key in _REGISTRY and not overwrite:
    raise ValueError(f"objective {name!r} is already registered; pass overwrite=True.")
  _REGISTRY[key] = factory


def _normalise(name: str) -> str:
  """Lookup form of a name: case-insensitive, ``-`` and ``_`` alike."""
  return name.lower().replace("-", "_")


def _resolve(name: Any) -> Callable[..., Any]:
  if not isinstance(name, str):
    raise TypeError(f"objective name must be a string; got {name!r}.")
  key = _normalise(name)
  key = _ALIASES.get(key, key)
  if key not in _REGISTRY:
    raise ValueError(f"unknown objective {name!r}; expected one of {names()} "
                     f"(aliases: {sorted(_ALIASES)}).")
  return _REGISTRY[key]


def get(name: str, **kwargs: Any) -> Any:
  """Build an objective by name, e.g. ``get("pgd", eps=8/255, steps=7)``.

  Names: ``natural`` (aliases ``clean``, ``standard``, ``ce``), ``pgd`` (``pgd_at``,
  ``madry``, ``adversarial``), ``trades``, ``certified``, ``lad`` (``layerwise``; e.g.
  ``get("lad", base="trades", eta=0.05, splitting="strang_marchuk", beta=6.0)``),
  ``diffai`` (``diffai_language``, ``dsl``; DiffAI's training language, e.g.
  ``get("diffai", text="InSamp", eps=0.1)``), plus any :func:`register`-ed ones.

  Raises:
    ValueError: unknown name, unknown keyword (the message lists the valid fields), or
      a field value out of range.
    TypeError: a field of the wrong type.
  """
  factory = _resolve(name)
  fields = None
  if dataclasses.is_dataclass(factory):
    fields = [f.name for f in dataclasses.fields(factory) if f.init]
  elif factory is diffai:
    fields = ["text", "eps"]
  if fields is not None:
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
      raise ValueError(f"unknown option(s) {unknown} for objective {name!r}; valid "
                       f"options: {fields or 'none'}.")
  return factory(**kwargs)


def from_config(cfg: Any) -> Any:
  """Build an objective from a config: a mapping or ``ml_collections.ConfigDict`` with a
  ``"name"`` key and the objective's fields, e.g. ``{"name": "trades", "beta": 6.0}``.

  A string is taken as a name with default options.

  Raises:
    ValueError: missing ``name``, unknown name or option, or a bad value.
    TypeError: ``cfg`` is neither a mapping, a ConfigDict nor a string.
  """
  if isinstance(cfg, str):
    return get(cfg)
  if hasattr(cfg, "to_dict") and callable(cfg.to_dict):
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise TypeError("objective config must be a dict or ml_collections.ConfigDict with a "
                    f"'name' key; got {cfg!r}.")
  options = dict(cfg)
  if "name" not in options:
    raise ValueError(f"objective config needs a 'name' key (one of {names()}); got keys "
                     f"{sorted(options)}.")
  name = options.pop("name")
  return get(name, **options)
