"""How a step rule is written in a config: ``{"name": ..., **fields}``, both ways.

The dynamics layer owns this encoding, so the defaults live in one place: the rule's
own dataclass fields.  A config's ``model.step`` group is such a dict; an empty dict
(or ``name`` left ``None``) means "the model's own step rule".
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

from jaxdefense._checks import plain_value
from jaxdefense.dynamics._steps import Damped, Euler, EulerMaruyama

__all__ = ["STEP_RULES", "step_name", "step_to_dict", "step_from_dict"]

#: Config name -> step-rule class.
STEP_RULES: dict[str, type] = {
    "euler": Euler,
    "euler_maruyama": EulerMaruyama,
    "damped": Damped,
}


#: Defaults a field had before (config name, field) -> former defaults.  An older,
#: complete config that carries another rule's field at one of these values is accepted
#: like one at the current default (``Damped.init_range`` was ``(0.2, 0.25)`` before it
#: became ``None``, "the kind's default", which is the same range for every kind).
_FORMER_DEFAULTS: dict[tuple[str, str], tuple[Any, ...]] = {
    ("damped", "init_range"): ((0.2, 0.25),),
}


def _at_default(owner: str, key: str, value: Any) -> bool:
  value = plain_value(value)
  return (plain_value(_fields(STEP_RULES[owner])[key]) == value
          or value in _FORMER_DEFAULTS.get((owner, key), ()))


def _fields(cls: type) -> dict[str, Any]:
  return {f.name: f.default for f in dataclasses.fields(cls) if f.init}


def step_name(step: Any) -> str:
  """The config name of a step rule (``"euler"``, ``"euler_maruyama"``, ``"damped"``).

  Raises:
    TypeError: ``step`` is not an instance of a rule of :data:`STEP_RULES`.
  """
  for name, cls in STEP_RULES.items():
    if type(step) is cls:
      return name
  raise TypeError(f"not a registered step rule: {step!r}; expected an instance of "
                  f"{[c.__name__ for c in STEP_RULES.values()]}.")


def step_to_dict(step: Any) -> dict[str, Any]:
  """A step rule as a config dict ``{"name": ..., **every field}``.

  ``step_from_dict(step_to_dict(s)) == s`` for every rule.  For example
  ``step_to_dict(Damped("sig"))`` is ``{"name": "damped", "kind": "sig", "init_range":
  None, "skip_first": True, "skip_transitions": True, "storage": "authors"}``
  (``init_range=None``: the kind's default, :data:`~jaxdefense.dynamics.DAMPED_INIT_RANGES`).

  Raises:
    TypeError: ``step`` is not a registered step rule.
  """
  name = step_name(step)
  return {"name": name, **{k: getattr(step, k) for k in _fields(type(step))}}


def step_from_dict(spec: Mapping[str, Any] | Any, base: Any = None) -> Any:
  """A step rule from a config dict ``{"name": ..., **fields}``.

  Fields not given take the rule's own defaults, or, when ``base`` is a rule of the same
  name, the values of ``base`` (so ``{"coef": 0.2}`` changes only the noise of an
  EnResNet preset).  ``name`` may be omitted (or ``None``) when ``base`` is given: the
  spec then completes ``base``.

  For configs written before this encoding (which carried every rule's fields), a field
  of *another* rule is accepted when it holds that rule's default value (current, or a
  former default such as ``Damped.init_range = (0.2, 0.25)``); any other field raises.

  Args:
    spec: a mapping or ``ml_collections.ConfigDict``.
    base: an optional step rule that ``spec`` completes.

  Returns:
    A step rule of :mod:`jaxdefense.dynamics`.

  Raises:
    ValueError: unknown ``name`` (close matches listed), no name and no ``base``, a field
      the rule does not have, or a bad field value (the rule's own checks).
    TypeError: ``spec`` is not a mapping.
  """
  spec = plain_value(spec)
  if spec is None:
    spec = {}
  if not isinstance(spec, Mapping):
    raise TypeError(f"a step spec must be a mapping {{'name': ..., **fields}}; got {spec!r}.")
  spec = dict(spec)
  name = spec.pop("name", None)
  if name is None:
    if base is None:
      raise ValueError(f"model.step needs a name (one of {sorted(STEP_RULES)}); got "
                       f"fields {sorted(spec)} without one.")
    name = step_name(base)
  if name not in STEP_RULES:
    close = difflib.get_close_matches(str(name), STEP_RULES, n=2)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown model.step.name={name!r}; expected one of "
                     f"{sorted(STEP_RULES)}.{hint}")
  cls = STEP_RULES[name]
  own = _fields(cls)
  values = dict(own)
  if base is not None and type(base) is cls:
    values.update({k: getattr(base, k) for k in own})
  for key, value in spec.items():
    if key in own:
      values[key] = value
      continue
    owners = [n for n, c in STEP_RULES.items() if key in _fields(c)]
    if owners and all(_at_default(o, key, value) for o in owners):
      continue  # another rule's field at its default (an older, complete config)
    where = f" (a field of {', '.join(owners)})" if owners else ""
    raise ValueError(f"model.step field {key!r}{where} does not apply to step {name!r}, "
                     f"which takes {sorted(own) or 'no fields'}; got {key}={value!r}.")
  return cls(**values)
