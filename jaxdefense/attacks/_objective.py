"""The attack objective at a point: per-example loss, mean logits and gradient.

An iterative attack sees its objective through a *value-and-gradient* function
``vg(z, key) -> (loss [B], logits [B, K] | None, grad)``: autodiff of the loss of a
model (:func:`make_value_and_grad`, an EOT average for a stochastic model) or the SPSA
estimator (:func:`jaxdefense.attacks.spsa_gradient`).  Losses are float32
(:data:`~jaxdefense.attacks._losses.LOSS_DTYPE`) and logits at least float32, whatever
the model's precision.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxdefense.attacks._eot import LogitsFn, logit_draws
from jaxdefense.attacks._losses import LOSS_DTYPE, LossFn

Array = jax.Array


def loss_values(loss_fn: LossFn, draws: Array) -> Array:
  """Per-example loss ``[B]`` (dtype :data:`LOSS_DTYPE`): the mean over draws ``[n, B, K]``."""
  return jnp.mean(jax.vmap(loss_fn)(draws), axis=0).astype(LOSS_DTYPE)


def make_value_and_grad(logits_fn: LogitsFn, loss_fn: LossFn,
                        transform: Optional[Callable[[Array], Array]] = None,
                        penalty: Optional[Callable[[Array], Array]] = None):
  """``vg(z, key) -> (loss [B], mean logits [B, K], d sum(loss) / dz)``.

  The attack variable ``z`` is the image itself, or ``transform(z)`` is (C&W's tanh
  reparametrisation).  ``penalty(z) -> [B]`` is added to the loss (C&W's distance
  term).  For an :class:`~jaxdefense.attacks.EOT` model the loss is the mean over draws
  of the per-draw loss and the returned logits are the mean logits (``key`` is
  required there and ignored for a deterministic model).  The loss is float32
  (:data:`LOSS_DTYPE`) and the logits at least float32, whatever the model's
  precision; the gradient has the shape and dtype of ``z``.
  """

  def total(z, key):
    x_adv = z if transform is None else transform(z)
    draws = logit_draws(logits_fn, x_adv, key)
    per_example = loss_values(loss_fn, draws)
    if penalty is not None:
      per_example = (per_example + penalty(z)).astype(LOSS_DTYPE)
    return jnp.sum(per_example), (per_example, jnp.mean(draws, axis=0))

  grad_fn = jax.grad(total, has_aux=True)

  def vg(z, key):
    grad, (loss, logits) = grad_fn(z, key)
    return loss, logits, grad

  return vg


def evaluate(logits_fn: LogitsFn, loss_fn: LossFn, z: Array, key: Optional[Array],
             transform: Optional[Callable[[Array], Array]] = None,
             penalty: Optional[Callable[[Array], Array]] = None) -> tuple[Array, Array]:
  """Per-example loss ``[B]`` and mean logits ``[B, K]`` at ``z`` (no gradient).

  ``transform`` and ``penalty`` have the meaning of :func:`make_value_and_grad`; the
  loss is float32 (:data:`LOSS_DTYPE`) as there.
  """
  x_adv = z if transform is None else transform(z)
  draws = logit_draws(logits_fn, x_adv, key)
  value = loss_values(loss_fn, draws)
  if penalty is not None:
    value = (value + penalty(z)).astype(LOSS_DTYPE)
  return value, jnp.mean(draws, axis=0)
