"""Ascent rules: one attack iteration as an optax-like pair of pure functions.

An :class:`AscentRule` ``(init, update)`` carries its own state (momentum, Adam moments,
the best iterate so far, ...) and is driven by
:func:`jaxdefense.attacks._loop.ascent_loop`.  The rules here: projected sign / l2
steepest ascent (FGSM, IFGSM, PGD), MI-FGSM's momentum, any optax optimiser, Adam with
a per-example learning rate (C&W, SPSA), and :func:`track_best`, which wraps a rule to
remember each example's best iterate.  APGD's rule lives with APGD
(:func:`jaxdefense.attacks.apgd_rule`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdefense import _checks
from jaxdefense.attacks._losses import LOSS_DTYPE, better, success
from jaxdefense.attacks._projection import (expand_mask, l1_normalize, per_example,
                                            steepest_direction)
from jaxdefense.attacks._setup import as_param

Array = jax.Array


class AscentRule(NamedTuple):
  """An optax-like pair of pure functions driving one attack iteration.

  Attributes:
    init: ``init(z0) -> state``.
    update: ``update(i, z, loss, logits, grad, state) -> (z_next, state)`` where
      ``loss [B]``, ``logits [B, K]`` (or ``None``) and ``grad`` are evaluated at ``z``
      and ``z_next`` is already projected onto the threat model.
  """

  init: Callable[[Array], Any]
  update: Callable[..., tuple[Array, Any]]


def sign_ascent(step_size: Any, project: Callable, norm: str = "linf") -> AscentRule:
  """Projected steepest ascent ``z <- P(z + step_size * dir(g))`` (FGSM / IFGSM / PGD).

  ``dir`` is ``sign`` for l-inf (default) and ``g / ||g||_2`` for l2 (Madry et al.,
  2018); ``step_size`` is a scalar or per example ``[B]``; ``project`` maps
  ``[B, ...]`` to ``[B, ...]``.  The rule has no state.
  """

  def init(z):
    del z
    return ()

  def update(i, z, loss, logits, grad, state):
    del i, loss, logits
    step = per_example(step_size, z)
    return project(z + step * steepest_direction(grad, norm)), state

  return AscentRule(init, update)


def momentum_sign_ascent(step_size: Any, mu: Any, project: Callable,
                         norm: str = "linf") -> AscentRule:
  """MI-FGSM: ``m <- mu m + g / ||g||_1``, ``z <- P(z + step_size * dir(m))``.

  ``step_size`` and ``mu`` are scalars or per example ``[B]``; the state is the
  momentum ``m`` (zeros of the shape of ``z`` at the start); ``norm`` as in
  :func:`sign_ascent` (default ``"linf"``).

  Reference: Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018.
  """

  def init(z):
    return jnp.zeros_like(z)

  def update(i, z, loss, logits, grad, m):
    del i, loss, logits
    m = per_example(mu, z) * m + l1_normalize(grad)
    step = per_example(step_size, z)
    return project(z + step * steepest_direction(m, norm)), m

  return AscentRule(init, update)


def optax_ascent(tx: optax.GradientTransformation, project: Callable) -> AscentRule:
  """Ascent with an optax optimiser, projecting every step.

  ``tx`` minimises, so it is handed ``-grad``.  Its hyper-parameters are whatever
  ``tx`` broadcasts against the images; for a per-example learning rate use
  :func:`adam_ascent`.  The state is ``tx``'s state.
  """

  def init(z):
    return tx.init(z)

  def update(i, z, loss, logits, grad, state):
    del i, loss, logits
    updates, state = tx.update(-grad, state, z)
    return project(optax.apply_updates(z, updates)), state

  return AscentRule(init, update)


def adam_updates(lr: Any) -> optax.GradientTransformation:
  """Adam with a scalar or per-example ``[B]`` learning rate, as an optax transformation.

  ``optax.scale_by_adam()`` followed by a multiplication by ``-lr``, with ``lr``
  broadcast over the leading (batch) axis of the parameters (:func:`per_example`);
  ``optax.adam(lr)`` would align a ``[B]`` learning rate with the last (channel) axis.
  For a scalar ``lr`` it equals ``optax.adam(lr)``.  The parameters must be one array
  ``[B, ...]``.
  """
  moments = optax.scale_by_adam()

  def update(grads, state, params=None):
    updates, state = moments.update(grads, state, params)
    return updates * -per_example(lr, updates), state

  return optax.GradientTransformation(moments.init, update)


def adam_ascent(lr: Any, project: Callable) -> AscentRule:
  """Adam ascent (C&W and SPSA) with a scalar or per-example ``[B]`` learning rate.

  :func:`optax_ascent` of :func:`adam_updates`: the step of example ``b`` is
  ``lr[b]`` times its Adam direction (optax's defaults b1 0.9, b2 0.999, eps 1e-8),
  then the point is projected.

  Args:
    lr: learning rate, ``>= 0``: a scalar or one value per example ``[B]`` (may be
      traced; then only its rank is checked).
    project: ``P(z) -> z`` applied after every step, e.g. :func:`make_projection`.

  Returns:
    An :class:`AscentRule` for :func:`ascent_loop` over attack variables ``[B, ...]``.

  Raises:
    TypeError: ``lr`` is a bool or not numeric, or ``project`` is not callable.
    ValueError: ``lr`` has more than one axis, or a concrete ``lr`` is negative or
      not finite.
  """
  if not callable(project):
    raise TypeError(f"adam_ascent: project must be callable P(z) -> z; got {project!r}.")
  if isinstance(lr, bool) or lr is None:
    raise TypeError(f"adam_ascent: lr must be a non-negative number; got {lr!r}.")
  lr = as_param(lr)
  if np.ndim(lr) > 1:
    raise ValueError(f"adam_ascent: lr must be a scalar or one value per example [B]; "
                     f"got shape {np.shape(lr)}.")
  arr = _checks.as_concrete_numpy(lr)
  if arr is not None:
    if not np.issubdtype(arr.dtype, np.number):
      raise TypeError(f"adam_ascent: lr must be a non-negative number; got {lr!r}.")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
      raise ValueError(f"adam_ascent: lr must be finite and >= 0; got {lr!r}.")
  return optax_ascent(adam_updates(lr), project)


class BestState(NamedTuple):
  """State of :func:`track_best`: the wrapped rule's state and the best point so far.

  Attributes:
    inner: the wrapped rule's state.
    x_best: best image per example ``[B, ...]``.
    succ_best: whether it fools the model (reaches the target), ``[B]`` bool.
    loss_best: its loss ``[B]`` (float32; ``-inf`` before the first iterate).
  """

  inner: Any
  x_best: Array
  succ_best: Array
  loss_best: Array


def track_best(rule: AscentRule, decode: Callable[[Array], Array], y: Array,
               target: Optional[Array]) -> AscentRule:
  """Wrap ``rule`` so that its state also keeps each example's best iterate.

  "Best" is lexicographic: an iterate that fools the model (or reaches ``target``)
  beats one that does not, then the higher loss wins.  ``decode(z)`` maps the attack
  variable to images ``[B, ...]``; ``y`` and ``target`` are labels ``[B]`` (``target``
  may be ``None``).  Finish with :func:`best_with_last` to include the last iterate.
  """

  def init(z):
    x0 = decode(z)
    b = x0.shape[0]
    return BestState(rule.init(z), x0, jnp.zeros((b,), bool),
                     jnp.full((b,), -jnp.inf, LOSS_DTYPE))

  def update(i, z, loss, logits, grad, state):
    x_now = decode(z)
    succ = success(logits, y, target)
    take = better(succ, loss, state.succ_best, state.loss_best)
    best = BestState(state.inner,
                     jnp.where(expand_mask(take, x_now), x_now, state.x_best),
                     jnp.where(take, succ, state.succ_best),
                     jnp.where(take, loss, state.loss_best))
    z_next, inner = rule.update(i, z, loss, logits, grad, state.inner)
    return z_next, best._replace(inner=inner)

  return AscentRule(init, update)


def best_with_last(state: BestState, x_last: Array, loss_last: Array, logits_last: Array,
                   y: Array, target: Optional[Array]) -> Array:
  """The best point ``[B, ...]`` of a :func:`track_best` run, the last iterate included.

  ``x_last [B, ...]``, ``loss_last [B]`` and ``logits_last [B, K]`` describe the last
  iterate; ``y`` / ``target`` are labels ``[B]`` (``target`` may be ``None``).
  """
  take = better(success(logits_last, y, target), loss_last, state.succ_best,
                state.loss_best)
  return jnp.where(expand_mask(take, x_last), x_last, state.x_best)
