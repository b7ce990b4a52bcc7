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
from typing import Any, Callable, ClassVar, Union

import jax
import jax.numpy as jnp
import optax

from jaxdefense import _checks
from jaxdefense.certify import _api as certify_api
from jaxdefense.certify._domains import worst_case_logits
from jaxdefense.nn._abstract import is_abstract

Array = jax.Array

__all__ = ["CertifiedObjective", "Lin"]


@dataclasses.dataclass(frozen=True)
class Lin:
  """DiffAI's ``Lin(a, b, m, n)`` schedule: ``a`` for ``m`` epochs, then linear to ``b``.

  ``Lin(start, end, hold, ramp)(t)`` is ``start`` for ``t <= hold``, ``end`` for
  ``t >= hold + ramp``, linear in between (``ramp = 0``: a step at ``hold``).  ``t`` is
  the fractional epoch; it may be a traced array (no retracing as it changes).
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
    return self.start + (self.end - self.start) * frac


Schedule = Union[float, Callable[[Any], Any]]


def _value(s: Schedule, epoch: Any) -> Array:
  return jnp.asarray(s(epoch) if callable(s) else s, jnp.float32)


def _split(out: Any) -> tuple[Any, dict | None]:
  """``apply_fn`` may return ``outputs`` or ``(outputs, mutated_collections)``."""
  if isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "items"):
    return out[0], dict(out[1])
  return out, None


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

  Call contract (the training loop's, plus an optional ``epoch``)::

      loss, aux = objective(apply_fn, x, y, key, epoch=epoch)

  * ``apply_fn(inputs)`` runs the model with the current parameters on a batch of
    images ``[B, H, W, C]`` *or* on an abstract value (``Box``/``HybridZonotope``) of
    that shape.  It returns logits ``[B, K]`` (concrete or abstract), or the training
    loop's pair ``(logits, model_state)`` (what ``model.apply(..., mutable=[...])``
    returns).  With pairs, every leaf of the abstract pass's ``model_state["losses"]``
    (the :class:`~jaxdefense.nn.DeepLoss` terms; make ``"losses"`` mutable to get them)
    is added to the loss.  Typical::

        def apply_fn(v):
          return model.apply({"params": params}, v, train=True, mutable=["losses"])

    A model with batch norm must run abstract inputs in evaluation mode
    (``train=not jaxdefense.nn.is_abstract(v)``): batch statistics of a set are undefined.
  * ``x``: images ``[B, H, W, C]`` in ``[0, 1]``; ``y``: int labels ``[B]``;
    ``key``: a PRNG key (unused; kept for the common contract).
  * ``epoch``: fractional epoch (``step / steps_per_epoch``; a float or a traced
    scalar, no retracing as it changes) at which the schedules are read.  ``None``
    (the default, for loops that do not pass it) reads both schedules at their end:
    full ``eps`` and final ``mix`` from the first step.  ``uses_epoch = True`` marks the
    class for loops that pass it.
  * Returns the scalar loss and ``aux``: ``"logits"`` (point logits ``[B, K]``),
    ``"model_state"`` (the point pass's state, ``{}`` for plain logits), and the scalars
    ``"point_loss"``, ``"abstract_loss"``, ``"deep_loss"``, ``"eps"``, ``"mix"``,
    ``"certified"`` (fraction of the batch whose training set ``B(x, eps(t))`` is
    proved).

  Raises:
    ValueError: bad ``eps`` or ``domain`` (at construction).
  """
  # Markers for the training loop: call with ``epoch=`` and an ``apply_fn`` that accepts
  # abstract values (not only a ``logits_fn`` on arrays).
  uses_epoch: ClassVar[bool] = True
  needs_abstract_apply: ClassVar[bool] = True

  eps: float = 0.1
  domain: str = "box"
  eps_schedule: Schedule = Lin(0.0, 1.0, 0.0, 10.0)
  mix: Schedule = Lin(0.0, 0.5, 0.0, 10.0)
  correlate_input: bool = False
  relu_budget: int | None = None

  def __post_init__(self):
    _checks.check_eps(self.eps, "eps")
    _checks.check_choice(self.domain, "domain", certify_api.DOMAINS)

  def schedules(self, epoch: Any = None) -> tuple[Array, Array]:
    """``(eps(t), lam(t))`` at fractional epoch ``t`` (``None``: the end values)."""
    if epoch is None:
      epoch = 1e9
    eps_t = self.eps * jnp.clip(_value(self.eps_schedule, epoch), 0.0, 1.0)
    return eps_t, jnp.clip(_value(self.mix, epoch), 0.0, 1.0)

  def __call__(self, apply_fn: Callable[[Any], Any], x: Array, y: Array, key: Array, *,
               epoch: Any = None) -> tuple[Array, dict[str, Any]]:
    del key
    eps_t, lam = self.schedules(epoch)
    logits, mutated = _split(apply_fn(x))
    point = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    value = certify_api.input_set(x, eps_t, self.domain, relu_budget=self.relu_budget,
                                  correlate_input=self.correlate_input)
    z, abs_mutated = _split(apply_fn(value))
    if not is_abstract(z):
      raise TypeError("CertifiedObjective: apply_fn returned a concrete array for an "
                      "abstract input; build the model from jaxdefense.nn layers.")
    worst = worst_case_logits(z, y)
    abstract = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(worst, y))
    deep = _extra_losses(abs_mutated or {})
    loss = (1.0 - lam) * point + lam * abstract + deep
    others = jnp.where(jax.nn.one_hot(y, worst.shape[-1]) > 0, -jnp.inf, worst)
    aux = {
        "logits": logits,
        "model_state": {} if mutated is None else mutated,
        "point_loss": point,
        "abstract_loss": abstract,
        "deep_loss": deep,
        "eps": eps_t,
        "mix": lam,
        "certified": jnp.mean(jnp.max(others, -1) < 0),
    }
    return loss, aux
