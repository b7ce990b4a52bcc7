"""Certified training: IBP / DiffAI-style mix of a point loss and a worst-case loss.

The objective is the DSL expression ``Mix(Point, Sub(eps_schedule, Box), mix)`` of
Mirman, Singh & Vechev (2019, table 2, "Baseline"), which is the training scheme of
IBP (Gowal et al. 2018)::

    loss = (1 - lam(t)) * CE(f(x), y) + lam(t) * CE(worst_case_logits(f#(B(x, eps(t)))), y)

where ``f#`` runs the same model on the abstract input set ``B(x, eps(t)) = [max(x -
eps(t), 0), min(x + eps(t), 1)]`` (a box, or a hybrid zonotope), and the worst-case
logits are ``-lower(z_y - z_j)`` (computed in the domain), whose cross-entropy bounds the
cross-entropy of every point of the set.  ``eps(t)`` and ``lam(t)`` ramp linearly over
fractional epochs ``t``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Union

import jax
import jax.numpy as jnp
import optax

from jaxdefense import _checks
from jaxdefense.certify import _api as certify_api
from jaxdefense.certify._domains import worst_case_logits
from jaxdefense.models import ModelFn
from jaxdefense.nn._abstract import is_abstract
from jaxdefense.objectives._adversarial import check_model

Array = jax.Array

__all__ = ["CertifiedObjective", "Lin"]


@dataclasses.dataclass(frozen=True)
class Lin:
  """DiffAI's ``Lin(a, b, m, n)`` schedule: ``a`` for ``m`` epochs, then linear to ``b``.

  ``Lin(start, end, hold, ramp)(t)`` is ``start`` for ``t <= hold``, ``end`` for
  ``t >= hold + ramp``, linear in between (``ramp = 0``: a step at ``hold``).  ``t`` is
  the fractional epoch; it may be a traced array (no retracing as it changes).
  ``start`` and ``end`` may themselves be schedules (callables of ``t``, as the DiffAI
  language allows): the line then runs between their values at ``t``.
  """
  start: float
  end: float
  hold: float = 0.0
  ramp: float = 0.0

  def __post_init__(self):
    _checks.check_float(self.hold, "Lin.hold", minimum=0.0)
    _checks.check_float(self.ramp, "Lin.ramp", minimum=0.0)

  def __call__(self, epoch: Any) -> Array:
    epoch = jnp.asarray(epoch, jnp.float32)
    if self.ramp == 0:
      frac = (epoch >= self.hold).astype(jnp.float32)
    else:
      frac = jnp.clip((epoch - self.hold) / self.ramp, 0.0, 1.0)
    start, end = self.start, self.end
    if callable(start) or callable(end):
      start, end = _value(start, epoch), _value(end, epoch)
    return start + (end - start) * frac


Schedule = Union[float, Callable[[Any], Any]]


def _value(s: Schedule, epoch: Any) -> Array:
  return jnp.asarray(s(epoch) if callable(s) else s, jnp.float32)


#: The collection :class:`~jaxdefense.nn.DeepLoss` layers sow their terms into.
LOSSES = "losses"

#: How the DeepLoss terms are mixed with the base loss (``CertifiedObjective.deep_mix``).
DEEP_MIXES = ("add", "convex")


def collecting_losses(model: ModelFn) -> ModelFn:
  """``model`` for an abstract pass that collects this pass's DeepLoss terms.

  ``"losses"`` is transient: stale terms in the variables are dropped (they would be
  appended to) and the collection is made mutable.  A wrapped function
  (``model.fn``) is returned as it is.
  """
  if model.fn is not None:
    return model
  variables = model.variables
  if isinstance(variables, Mapping) and LOSSES in variables:
    model = model.replace(variables={k: v for k, v in variables.items() if k != LOSSES})
  if LOSSES not in model.mutable:
    model = model.replace(mutable=tuple(model.mutable) + (LOSSES,))
  return model


def _extra_losses(mutated: dict) -> Array:
  losses = mutated.get("losses", {})
  leaves = jax.tree_util.tree_leaves(losses)
  return sum((jnp.sum(l) for l in leaves), jnp.float32(0.0))


@dataclasses.dataclass(frozen=True)
class CertifiedObjective:
  """IBP-style certified training objective (point loss mixed with a worst-case loss).

  Attributes:
    eps: target l-inf training radius in ``[0, 1]`` pixel units.
    domain: ``"box"`` (IBP, default), ``"zonotope"`` (hybrid zonotope, DiffAI's box
      ReLU) or ``"deepz"``.
    eps_schedule: fraction of ``eps`` used at fractional epoch ``t`` (a float or a
      callable such as :class:`Lin`); default ``Lin(0, 1, 0, 10)``.
    mix: weight ``lam`` of the worst-case loss at epoch ``t``; default
      ``Lin(0, 0.5, 0, 10)`` (IBP's kappa going from 1 to 0.5).
    correlate_input: zonotope domains: one generator per input pixel (``True``; exact
      on the first layer but ``p`` times the memory) or a box start relying on the
      model's correlation layers (``False``, default, as DiffAI trains).
    relu_budget: DeepZ generators per ReLU layer (``None``: one per neuron).
    deep_weight: weight ``w(t)`` of the :class:`~jaxdefense.nn.DeepLoss` terms (the sum
      over the model's DeepLoss layers of ``layer.weight * DeepLoss``), a float or a
      callable of the fractional epoch such as :class:`Lin` (read at the step's epoch,
      a traced scalar: no retracing).  Default 1.0.
    deep_mix: how the DeepLoss terms ``D`` enter the loss.  ``"add"`` (default, as
      before): ``loss = (1 - lam) point + lam abstract + w D``.  ``"convex"`` (the
      DiffAI authors' implementation, where a DeepLoss layer turns the loss of the
      abstract element into ``(1 - bw) pre_loss + bw deep_loss``): ``loss = (1 - lam)
      point + lam ((1 - w) abstract + w D)`` with ``w`` clipped to ``[0, 1]``.  With
      ``w = 0`` either way the term contributes nothing (its gradient is exactly zero).

  Call contract (the training step's, plus an optional ``epoch``)::

      loss, aux = objective(model, x, y, key, epoch=epoch)

  * ``model``: a training-mode :class:`~jaxdefense.models.ModelFn` with the current
    parameters, typically ``jaxdefense.models.bind(module, {"params": params},
    train=True)`` of a model built from :mod:`jaxdefense.nn` layers.  The point pass is
    ``model.apply(x)``; the abstract pass applies the same model to the abstract input
    set (``Box``/``HybridZonotope``) with the ``"losses"`` collection made mutable, and
    every leaf of its ``"losses"`` (the :class:`~jaxdefense.nn.DeepLoss` terms) is added
    to the loss.  Batch norm in training mode rejects abstract inputs (batch statistics
    of a set are undefined): certified training uses models without it, as DiffAI's.
  * ``x``: images ``[B, H, W, C]`` in ``[0, 1]``; ``y``: int labels ``[B]``;
    ``key``: a PRNG key (unused; kept for the common contract).
  * ``epoch``: fractional epoch (``step / steps_per_epoch``; a float or a traced
    scalar, no retracing as it changes) at which the schedules are read.  ``None``
    (the default, for loops that do not pass it) reads both schedules at their end:
    full ``eps`` and final ``mix`` from the first step.  ``uses_epoch = True`` marks the
    class for loops that pass it.
  * Returns the scalar loss and ``aux``: ``"logits"`` (point logits ``[B, K]``),
    ``"model_state"`` (the point pass's state without ``"losses"``: the structure of
    the training state; ``{}`` for a wrapped function), and the scalars
    ``"point_loss"``, ``"abstract_loss"``, ``"deep_loss"`` (``D``, before ``w``),
    ``"deep_weight"`` (``w(t)``), ``"eps"``, ``"mix"``, ``"certified"`` (fraction of the batch whose training set ``B(x, eps(t))`` is
    proved).

  Raises:
    ValueError: bad ``eps`` or ``domain`` (at construction).
    TypeError: ``model`` is not a :class:`~jaxdefense.models.ModelFn`, or it returns a
      concrete array for the abstract input (a model not built from
      :mod:`jaxdefense.nn` layers).
  """
  # Markers for the training loop: call with ``epoch=``; the model must accept abstract
  # values (not only arrays).
  uses_epoch: ClassVar[bool] = True
  needs_abstract_apply: ClassVar[bool] = True

  eps: float = 0.1
  domain: str = "box"
  eps_schedule: Schedule = Lin(0.0, 1.0, 0.0, 10.0)
  mix: Schedule = Lin(0.0, 0.5, 0.0, 10.0)
  correlate_input: bool = False
  relu_budget: int | None = None

  deep_weight: Schedule = 1.0
  deep_mix: str = "add"

  def __post_init__(self):
    _checks.check_eps(self.eps, "eps")
    _checks.check_choice(self.domain, "domain", certify_api.DOMAINS)
    _checks.check_choice(self.deep_mix, "deep_mix", DEEP_MIXES)
    w = self.deep_weight
    if not callable(w):
      if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        raise ValueError(f"deep_weight must be a number >= 0 or a schedule (a callable of "
                         f"the fractional epoch, e.g. Lin(0, 0.1, 2, 3)); got {w!r}.")
      if self.deep_mix == "convex" and w > 1:
        raise ValueError(f"deep_mix='convex' needs deep_weight in [0, 1]; got {w!r}.")

  def deep_weight_at(self, epoch: Any = None) -> Array:
    """``w(t)``, the DeepLoss weight at fractional epoch ``t`` (``None``: the end value).

    Clipped to ``>= 0`` (and ``<= 1`` for ``deep_mix="convex"``).
    """
    if epoch is None:
      epoch = 1e9
    w = jnp.maximum(_value(self.deep_weight, epoch), 0.0)
    return jnp.minimum(w, 1.0) if self.deep_mix == "convex" else w

  def schedules(self, epoch: Any = None) -> tuple[Array, Array]:
    """``(eps(t), lam(t))`` at fractional epoch ``t`` (``None``: the end values)."""
    if epoch is None:
      epoch = 1e9
    eps_t = self.eps * jnp.clip(_value(self.eps_schedule, epoch), 0.0, 1.0)
    return eps_t, jnp.clip(_value(self.mix, epoch), 0.0, 1.0)

  def __call__(self, model: ModelFn, x: Array, y: Array, key: Array | None, *,
               epoch: Any = None) -> tuple[Array, dict[str, Any]]:
    """Loss and aux for one batch (see the class docstring)."""
    del key
    check_model(model, "CertifiedObjective")
    eps_t, lam = self.schedules(epoch)
    logits, state = model.apply(x)
    state = {k: v for k, v in dict(state).items() if k != LOSSES}
    point = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    value = certify_api.input_set(x, eps_t, self.domain, relu_budget=self.relu_budget,
                                  correlate_input=self.correlate_input)
    z, abs_state = collecting_losses(model).apply(value)
    if not is_abstract(z):
      raise TypeError("CertifiedObjective: the model returned a concrete array for an "
                      "abstract input; build the model from jaxdefense.nn layers.")
    worst = worst_case_logits(z, y)
    abstract = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(worst, y))
    deep = _extra_losses(dict(abs_state))
    w = self.deep_weight_at(epoch)
    # where(w == 0, 0, ...) keeps a zero weight's contribution (and gradient) exactly 0
    # even if the DeepLoss terms were not finite.
    deep_term = jnp.where(w == 0, 0.0, w * deep)
    if self.deep_mix == "convex":
      loss = (1.0 - lam) * point + lam * ((1.0 - w) * abstract + deep_term)
    else:
      loss = (1.0 - lam) * point + lam * abstract + deep_term
    others = jnp.where(jax.nn.one_hot(y, worst.shape[-1]) > 0, -jnp.inf, worst)
    aux = {
        "logits": logits,
        "model_state": state,
        "point_loss": point,
        "abstract_loss": abstract,
        "deep_loss": deep,
        "deep_weight": w,
        "eps": eps_t,
        "mix": lam,
        "certified": jnp.mean(jnp.max(others, -1) < 0),
    }
    return loss, aux
