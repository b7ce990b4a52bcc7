"""Model registry: presets by name, created with overrides."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str = "") -> Callable:
  """Decorator: register ``factory(**overrides) -> flax Module`` under ``name``.

  The zoo registers its presets this way (``register("resnet20", "...")(factory)``);
  users may add their own.  :func:`create` then builds them with overrides.

  Args:
    name: the model name (must not be registered yet).
    description: one line for :func:`describe`; default the factory's first docstring
      line.

  Returns:
    A decorator that records the factory and returns it unchanged.

  Raises:
    ValueError: ``name`` is already registered (at decoration).
  """
  def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if name in _REGISTRY:
      raise ValueError(f"model name {name!r} is registered twice.")
    _REGISTRY[name] = factory
    doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
    _DESCRIPTIONS[name] = doc
    return factory
  return deco


def names() -> list[str]:
  """Sorted names of every registered model (the ResNet zoo, EnResNet presets, DiffAI nets).

  Returns:
    A new list of strings, each valid for :func:`create` and :func:`describe`.
  """
  return sorted(_REGISTRY)


def describe(name: str) -> str:
  """One-line description of a registered model.

  Args:
    name: a name from :func:`names`.

  Returns:
    The description given at registration.

  Raises:
    ValueError: unknown ``name`` (close matches listed).
  """
  _check_name(name)
  return _DESCRIPTIONS[name]


def _check_name(name: Any) -> None:
  if name not in _REGISTRY:
    close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown model name={name!r}; expected one of {names()}.{hint}")


def create(name: str, **overrides: Any) -> nn.Module:
  """Create a registered model (a ``flax.linen.Module``) with field overrides.

  Args:
    name: a name from :func:`names`, e.g. ``"resnet20"``, ``"preact_resnet20"``,
      ``"wrn34_10"``, ``"conv_small"``.
    **overrides: module fields, e.g. ``num_classes=100``,
      ``step=jaxdefense.dynamics.EulerMaruyama(coef=0.1)`` (or a rule name,
      ``step="euler_maruyama"``, or a config dict ``{"name": ..., **fields}``),
      ``normalize=(mean, std)``.  The zoo's modules check their fields when they are
      constructed, i.e. here.

  Returns:
    An unbound Flax module: ``variables = model.init(key, x)``, then
    ``model.apply(variables, x, train=False, rngs={"noise": key})``.

  Raises:
    ValueError: unknown ``name``, an override that the model does not have, or a bad
      field value (``num_classes`` or a width below 1, a ``normalize`` std that is not
      finite and positive, an unknown step rule name...; the message names the field
      and the value).
    TypeError: a non-integer size field.
  """
  _check_name(name)
  factory = _REGISTRY[name]
  try:
    return factory(**overrides)
  except TypeError as e:
    if "unexpected keyword" in str(e):
      raise ValueError(f"model {name!r} does not take override(s) {sorted(overrides)}: {e}"
                       ) from None
    raise


def count_params(variables: Any) -> int:
  """Number of trainable parameters (the ``params`` collection) in ``variables``.

  Args:
    variables: ``model.init(...)``'s mapping (its ``"params"`` are counted) or a bare
      parameter pytree.

  Returns:
    The total number of scalars, an ``int`` (an ensemble counts every member).
  """
  params = variables.get("params", variables) if hasattr(variables, "get") else variables
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
