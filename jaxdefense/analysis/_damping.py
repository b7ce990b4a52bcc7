"""Learned damping: the effective coefficient of every damped block of a model.

The In-ResNet paper plots the learned interpolation coefficients ``relu(lambda_n)`` of
every damped block (its Fig. 1); :func:`damping_coefficients` returns them, one row per
block, for a histogram or a table.  The coefficient of a block is computed by the step
rule itself (:meth:`jaxdefense.dynamics.Damped.coefficient`), so the reader and the
forward pass cannot disagree.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator, Mapping

import flax.linen as nn
import numpy as np

from jaxdefense import _checks
from jaxdefense import dynamics
from jaxdefense import models

__all__ = ["DampingCoefficient", "damping_coefficients"]

_INTERMEDIATES = "intermediates"


@dataclasses.dataclass(frozen=True)
class DampingCoefficient:
  """The effective damping coefficient ``lambda = act(.)`` of one damped block.

  ``x_{n+1} = (1 - lambda) x_n + f_n(x_n)`` (``(1 + lambda) f_n`` for the ``"lambda"``
  kind): 0 is the ResNet step, 1 the plain CNN step.  ``dataclasses.asdict(row)`` gives
  a table row.

  Attributes:
    block: the block's path in the variable tree joined by ``"/"``, e.g. ``"block3"``;
      ``"member1/block3"`` for member 1 of a :class:`~jaxdefense.models.Ensemble`.
    path: the same path as a tuple of names.
    kind: the :class:`~jaxdefense.dynamics.Damped` kind (``relu``, ``lambda``, ``sig``,
      ``gating``, ``gating_sig``).
    mean: the coefficient (scalar kinds), or its mean over the batch, positions and
      channels (gating kinds).
    std: the population standard deviation over the same values (0 for scalar kinds).
    min: the smallest of those values.
    max: the largest of those values.
    count: how many values were summarised: 1 for a scalar kind, ``B * H * W * C`` (or
      ``B * C`` on rank-2 features) for a gating kind.
  """
  block: str
  path: tuple[str, ...]
  kind: str
  mean: float
  std: float
  min: float
  max: float
  count: int


def _natural_key(path: tuple[str, ...]) -> tuple:
  """Sort key that puts ``block2`` before ``block10``."""
  return tuple(tuple((0, int(t)) if t.isdigit() else (1, t)
                     for t in re.split(r"(\d+)", name) if t) for name in path)


def _damped_scopes(tree: Any, names: tuple[str, ...],
                   path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping]]:
  """``(path, scope)`` of every sub-mapping of ``tree`` that holds all of ``names``."""
  if not isinstance(tree, Mapping):
    return
  if all(name in tree for name in names):
    yield path, tree
    return
  for key, value in tree.items():
    yield from _damped_scopes(value, names, path + (str(key),))


def _sown(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  """``(block path, tuple of sown values)`` of every damped block in an intermediates tree."""
  if not isinstance(tree, Mapping):
    return
  for key, value in tree.items():
    if key == dynamics.DAMPING_INTERMEDIATE:
      yield path, value
    else:
      yield from _sown(value, path + (str(key),))


def _row(path: tuple[str, ...], kind: str, values: Any) -> DampingCoefficient:
  a = np.concatenate([np.asarray(v, np.float64).ravel() for v in values])
  return DampingCoefficient(block="/".join(path), path=path, kind=kind,
                            mean=float(a.mean()), std=float(a.std()), min=float(a.min()),
                            max=float(a.max()), count=int(a.size))


def _members(model: nn.Module, variables: Mapping) -> list[tuple[tuple[str, ...], nn.Module,
                                                                   Mapping]]:
  """``(path prefix, module, variables)`` of the networks that hold the damped blocks."""
  if not isinstance(model, models.Ensemble):
    return [((), model, variables)]
  try:
    if model.shared:
      return [((), model.member, {k: v["member"] for k, v in variables.items()})]
    return [((f"member{i}",), model.member, models.member_variables(variables, i))
            for i in range(model.size)]
  except (KeyError, TypeError, IndexError) as err:
    raise ValueError(
        f"variables do not match the ensemble {type(model).__name__}(size={model.size}, "
        f"shared={model.shared}): expected every collection to hold a 'member' sub-tree"
        + ("" if model.shared else f" with a leading member axis of length {model.size}")
        + f"; got collections {sorted(variables)} ({err!r}).") from None


def damping_coefficients(model: nn.Module, variables: Mapping[str, Any],
                         x: Any = None) -> list[DampingCoefficient]:
  """The effective damping coefficient of every damped block of ``model``.

  For the scalar kinds (``relu``, ``lambda``, ``sig``) the coefficient is read straight
  from ``variables`` (``relu(1 - k)``, ``relu(lambda)``, ``sigmoid(lambda)``, whatever
  the rule's ``storage``) and ``x`` is not used.  For the gating kinds (``gating``,
  ``gating_sig``) the coefficient ``act(W_d x_n + b_d)`` depends on the input: the model
  is run once on ``x`` (evaluation mode, as one batch) with the ``"intermediates"``
  collection mutable, where :func:`jaxdefense.dynamics.apply_step` sows it, and each row
  gives its mean and standard deviation over the batch, positions and channels.  A
  :class:`~jaxdefense.models.Ensemble` gives one row per member and block (one set of
  rows for a shared-weights ensemble).

  Example (the paper's Fig. 1 and a table)::

      rows = damping_coefficients(model, variables)           # scalar kinds
      rows = damping_coefficients(gated, variables, x[:256])  # gating kinds
      plt.hist([r.mean for r in rows]); [dataclasses.asdict(r) for r in rows]

  Args:
    model: a model of :mod:`jaxdefense.models` (a ``flax.linen.Module``) whose step rule
      is :class:`~jaxdefense.dynamics.Damped`, or an ensemble of such models.
    variables: its variables (``{"params": ..., "batch_stats": ...}``), as from
      ``model.init`` or a checkpoint.
    x: images ``[B, H, W, C]`` in [0, 1]; required for the gating kinds, ignored for the
      scalar kinds.

  Returns:
    A list of :class:`DampingCoefficient`, one per damped block, in network order
    (members first, then ``block0``, ``block1``, ...).  The first block and the
    stage-transition blocks that stay plain residual have no row.

  Raises:
    TypeError: ``model`` is not a flax module; ``variables`` is not a mapping with a
      ``"params"`` mapping.
    ValueError: the model's step rule is not ``Damped`` (or it has none); ``variables``
      hold no damped block (their parameters named by ``Damped.param_names``); a gating
      kind without ``x``, or ``x`` not a batch of images in [0, 1].
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a flax.linen.Module of jaxdefense.models; got "
                    f"{type(model).__name__}: {model!r:.80}.")
  step = models.step_of(model)
  if not isinstance(step, dynamics.Damped):
    raise ValueError(f"damping_coefficients needs a model whose residual step is "
                     f"jaxdefense.dynamics.Damped; got {type(model).__name__} with step "
                     f"{step!r}.")
  if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
    raise TypeError("variables must be the model's variables, a mapping with a 'params' "
                    f"collection; got {type(variables).__name__} with keys "
                    f"{sorted(variables) if isinstance(variables, Mapping) else None}.")
  if step.gating:
    if x is None:
      raise ValueError(f"x is required for a model with Damped(kind={step.kind!r}): its "
                       "coefficient act(W_d x_n + b_d) depends on the input; pass a batch "
                       "of images x [B, H, W, C].")
    _checks.check_images(x, "x")
  names = step.param_names()
  rows = []
  for prefix, module, member_vars in _members(model, variables):
    scopes = list(_damped_scopes(member_vars.get("params", {}), names))
    if not scopes:
      continue
    if not step.gating:
      rows += [_row(prefix + path, step.kind, [step.coefficient(None, None, scope)])
               for path, scope in scopes]
      continue
    # one eager forward pass: compiling the whole network would cost more than it saves
    _, state = module.apply(member_vars, x, train=False, mutable=[_INTERMEDIATES])
    rows += [_row(prefix + path, step.kind, values)
             for path, values in _sown(state.get(_INTERMEDIATES, {}))]
  if not rows:
    top = sorted(variables["params"])
    raise ValueError(
        f"no damped block in the variables given for {type(model).__name__} with step "
        f"{step!r}: expected parameter scopes holding {list(names)} under 'params'; got "
        f"top-level params {top[:12]}{' ...' if len(top) > 12 else ''}.")
  return sorted(rows, key=lambda r: _natural_key(r.path))
