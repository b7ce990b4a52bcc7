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
from typing import Any, Callable, Union

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


def _split(out: Any) -> tuple[Any, dict]:
  """``apply_fn`` may return ``outputs`` or ``(outputs, mutated_collections)``."""
  if isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "items"):
    return out[0], dict(out[1])
  return out, {}


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

  Call contract (for the training loop)::

      loss, aux = objective(apply_fn, x, y, key, epoch=epoch)

  * ``apply_fn(inputs)`` runs the model with the current parameters on a batch of
    images ``[B, H, W, C]`` *or* on an abstract value (``Box``/``HybridZonotope``) of
    that shape, and returns logits ``[B, K]`` (concrete or abstract).  It may instead
    return ``(outputs, mutated)`` as ``model.apply(..., mutable=[...])`` does; then
    every leaf of ``mutated["losses"]`` (the :class:`~jaxdefense.nn.DeepLoss` terms of
    the abstract pass) is added to the loss, and ``mutated`` of the *point* pass is
    returned as ``aux["mutated"]`` (e.g. updated ``batch_stats``).  Typical::

        def apply_fn(v):
          return model.apply({"params": params}, v, train=True, mutable=["losses"])

    For a model with batch norm, run abstract inputs in evaluation mode:
    ``train=not jaxdefense.nn.is_abstract(v)``.
  * ``x``: images ``[B, H, W, C]`` in ``[0, 1]``; ``y``: int labels ``[B]``;
    ``key``: a PRNG key (unused by this objective; kept for the common contract);
    ``epoch``: fractional epoch (float or traced scalar; no retracing as it changes).
  * Returns the scalar loss and ``aux``: ``{"point_loss", "abstract_loss",
    "deep_loss", "eps", "mix", "accuracy", "certified"}`` (scalars; ``certified`` is the
    fraction of the batch whose training box is proved at the current ``eps(t)``),
    plus ``"mutated"`` when ``apply_fn`` returns collections.

  Raises:
    ValueError: bad ``eps`` or ``domain`` (at construction).
  """
  eps: float = 0.1
  domain: str = "box"
  eps_schedule: Schedule = Lin(0.0, 1.0, 0.0, 10.0)
  mix: Schedule = Lin(0.0, 0.5, 0.0, 10.0)
  correlate_input: bool = False
  relu_budget: int | None = None

  def __post_init__(self):
    _checks.check_eps(self.eps, "eps")
    _checks.check_choice(self.domain, "domain", certify_api.DOMAINS)

  def schedules(self, epoch: Any) -> tuple[Array, Array]:
    """``(eps(t), lam(t))`` at fractional epoch ``t``."""
    eps_t = self.eps * jnp.clip(_value(self.eps_schedule, epoch), 0.0, 1.0)
    return eps_t, jnp.clip(_value(self.mix, epoch), 0.0, 1.0)

  def __call__(self, apply_fn: Callable[[Any], Any], x: Array, y: Array, key: Array, *,
               epoch: Any = 0.0) -> tuple[Array, dict[str, Any]]:
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
    deep = _extra_losses(abs_mutated)
    loss = (1.0 - lam) * point + lam * abstract + deep
    others = jnp.where(jax.nn.one_hot(y, worst.shape[-1]) > 0, -jnp.inf, worst)
    aux = {
        "point_loss": point,
        "abstract_loss": abstract,
        "deep_loss": deep,
        "eps": eps_t,
        "mix": lam,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
        "certified": jnp.mean(jnp.max(others, -1) < 0),
    }
    if mutated:
      aux["mutated"] = mutated
    return loss, aux
