"""Checks of the zoo modules' fields, run once when a module is constructed.

Every model class of the zoo (``ResNet``, ``ResidualBlock``, ``MLP``, ``DiffAINet``,
``Ensemble``) calls :func:`check_fields` from its ``__post_init__``, so a bad size
(``num_classes=0``, a negative width...), a zero standard deviation in ``normalize`` or
an unknown step rule name fails with a clear message at ``models.create(...)`` (or at the
module's construction), not deep inside flax or XLA at ``init``.  A step rule given by
name (``step="euler_maruyama"``) or as a config dict becomes the rule object here.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import flax.linen as nn

from jaxdefense import _checks
from jaxdefense.dynamics import STEP_RULES, step_from_dict
from jaxdefense.nn import _layers as L

__all__ = ["as_step", "check_fields"]


def as_step(step: Any, name: str = "step") -> Any:
  """A step rule from a rule object, a rule name or a config dict.

  Args:
    step: a rule of :mod:`jaxdefense.dynamics` (returned unchanged, as is any other
      object: the step-rule protocol is checked where the rule is applied), a name of
      :data:`jaxdefense.dynamics.STEP_RULES` (``"euler"``, ``"euler_maruyama"``,
      ``"damped"``: the rule with its default fields) or a mapping ``{"name": ...,
      **fields}`` (:func:`jaxdefense.dynamics.step_from_dict`).
    name: the argument's name, used in the messages.

  Returns:
    The step rule.

  Raises:
    ValueError: an unknown rule name (the message lists the names), or a config dict
      that :func:`~jaxdefense.dynamics.step_from_dict` rejects.
  """
  if isinstance(step, str):
    if step not in STEP_RULES:
      close = difflib.get_close_matches(step, STEP_RULES, n=2)
      hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
      raise ValueError(f"unknown {name}={step!r}; expected a step rule of "
                       f"jaxdefense.dynamics or one of the names {sorted(STEP_RULES)}.{hint}")
    return step_from_dict({"name": step})
  if isinstance(step, Mapping) or (hasattr(step, "to_dict") and callable(step.to_dict)):
    return step_from_dict(step)
  return step


def _set(module: nn.Module, field: str, value: Any) -> None:
  object.__setattr__(module, field, value)  # in __post_init__, before flax freezes it


def check_fields(module: nn.Module, *, positive: tuple[str, ...] = (),
                 nonnegative: tuple[str, ...] = (), positive_seqs: tuple[str, ...] = (),
                 nonnegative_seqs: tuple[str, ...] = (), rates: tuple[str, ...] = ()) -> None:
  """Check (and normalise) a zoo module's fields; call it from ``__post_init__``.

  Fields the module does not have are skipped.  Besides the named integer fields, a
  ``step`` field is converted with :func:`as_step` and a ``normalize`` field
  ``(mean, std)`` is checked with :func:`jaxdefense.nn.check_mean_std`.

  Args:
    module: the module being constructed.
    positive: integer fields that must be ``>= 1`` (``num_classes``, widths...).
    nonnegative: integer fields that must be ``>= 0``.
    positive_seqs: fields holding a sequence of integers ``>= 1`` (``None`` allowed).
    nonnegative_seqs: fields holding a sequence of integers ``>= 0``.
    rates: float fields in ``[0, 1)`` (dropout).

  Raises:
    ValueError: a value out of range; the message names ``Class.field`` and the value.
    TypeError: a non-integer where an integer is expected, a non-sequence where a
      sequence is expected.
  """
  cls = type(module).__name__
  names = {f.name for f in dataclasses.fields(module)}
  for field in positive + nonnegative:
    if field in names:
      _checks.check_int(getattr(module, field), f"{cls}.{field}",
                        minimum=1 if field in positive else 0)
  for field in positive_seqs + nonnegative_seqs:
    value = getattr(module, field, None) if field in names else None
    if value is None:
      continue
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
      raise TypeError(f"{cls}.{field} must be a sequence of integers; got {value!r}.")
    for i, v in enumerate(value):
      _checks.check_int(v, f"{cls}.{field}[{i}]",
                        minimum=1 if field in positive_seqs else 0)
  for field in rates:
    if field in names:
      rate = _checks.check_float(getattr(module, field), f"{cls}.{field}", minimum=0.0)
      if rate >= 1.0:
        raise ValueError(f"{cls}.{field} must be in [0, 1); got {rate}.")
  if "step" in names:
    _set(module, "step", as_step(module.step, f"{cls}.step"))
  if "normalize" in names and module.normalize is not None:
    norm = module.normalize
    if isinstance(norm, (str, bytes)) or not hasattr(norm, "__len__") or len(norm) != 2:
      raise ValueError(f"{cls}.normalize must be a (mean, std) pair or None; got {norm!r}.")
    L.check_mean_std(norm[0], norm[1], name=f"{cls}.normalize")
