"""Reading and replacing the step rule of a model (through an ensemble's member)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from jaxdefense.models._ensemble import Ensemble

__all__ = ["step_of", "with_step"]


def _has_step(module: nn.Module) -> bool:
  return "step" in {f.name for f in dataclasses.fields(module)}


def step_of(module: nn.Module) -> Any:
  """The residual step rule of ``module``, or ``None`` for a model without one (MLP).

  For an :class:`~jaxdefense.models.Ensemble` it is the member's rule.
  """
  if isinstance(module, Ensemble):
    return step_of(module.member)
  return module.step if isinstance(module, nn.Module) and _has_step(module) else None


def with_step(module: nn.Module, step: Any) -> nn.Module:
  """A copy of ``module`` whose residual step rule is ``step`` (ensembles: every member).

  Raises:
    ValueError: ``module`` has no residual step (e.g. the MLP).
  """
  if isinstance(module, Ensemble):
    return module.clone(member=with_step(module.member, step))
  if not _has_step(module):
    raise ValueError(f"{type(module).__name__} has no residual step rule to replace.")
  return module.clone(step=step)
