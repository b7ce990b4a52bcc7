"""Drivers of the attacks: key derivation, the ``lax.fori_loop`` over iterations, restarts.

:func:`ascent_loop` runs an :class:`~jaxdefense.attacks.AscentRule` for a static number
of steps inside one ``jax.lax.fori_loop``, so compile time does not grow with the
number of steps; :func:`best_of_restarts` repeats a whole attack and keeps each
example's worst case.  Keys are derived with ``fold_in`` from the attack's own key, so
an attack is a deterministic function of its inputs and key.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jaxdefense.attacks._ascent import AscentRule
from jaxdefense.attacks._eot import EOT, LogitsFn
from jaxdefense.attacks._losses import LOSS_DTYPE, better
from jaxdefense.attacks._projection import expand_mask

Array = jax.Array


def fold_in(key: Optional[Array], data: Any) -> Optional[Array]:
  """``jax.random.fold_in`` that passes ``None`` (no randomness needed) through."""
  return None if key is None else jax.random.fold_in(key, data)


def model_key(logits_fn: LogitsFn, key: Optional[Array], data: Any) -> Optional[Array]:
  """A key for the model's noise: ``fold_in(key, data)`` for an :class:`EOT`, else ``None``."""
  return fold_in(key, data) if isinstance(logits_fn, EOT) else None


def ascent_loop(vg: Callable, rule: AscentRule, z0: Array, steps: int,
                key: Optional[Array]) -> tuple[Array, Any]:
  """Run ``steps`` iterations of ``rule`` from ``z0`` inside one ``lax.fori_loop``.

  Iteration ``i`` evaluates ``vg(z_i, fold_in(key, i))`` (``vg(z_i, None)`` when ``key``
  is ``None``, for deterministic models) and applies ``rule.update``.

  Args:
    vg: value-and-gradient function ``vg(z, key) -> (loss [B], logits [B, K] | None,
      grad)``, e.g. :func:`~jaxdefense.attacks.make_value_and_grad`.
    rule: the :class:`AscentRule` applied at every iteration.
    z0: starting attack variable ``[B, ...]``.
    steps: number of iterations (a static Python int; 0 returns ``z0``).
    key: PRNG key for the model's noise, or ``None``.

  Returns:
    ``(z_steps, final rule state)``.
  """

  def body(i, carry):
    z, state = carry
    loss, logits, grad = vg(z, fold_in(key, i))
    return rule.update(i, z, loss, logits, grad, state)

  return jax.lax.fori_loop(0, steps, body, (z0, rule.init(z0)))


def best_of_restarts(run: Callable[[Optional[Array]], Array], score: Callable, x: Array,
                     restarts: int, key: Optional[Array]) -> Array:
  """Run an attack ``restarts`` times and keep the worst case for each example.

  ``run(key) -> x_adv [B, ...]``; ``score(x_adv, key) -> (success [B], loss [B])``.
  Restart ``r`` uses ``fold_in(key, r)``, so ``restarts=1`` reproduces restart 0 of a
  longer run.  An example keeps the restart that succeeded, or else the one with the
  highest loss.  ``key`` may be ``None`` when nothing is random.
  """
  if restarts == 1:
    return run(fold_in(key, 0))

  def body(r, carry):
    best_x, best_succ, best_loss = carry
    k = fold_in(key, r)
    x_r = run(k)
    succ, loss = score(x_r, fold_in(k, 1_000_003))
    take = better(succ, loss, best_succ, best_loss)
    best_x = jnp.where(expand_mask(take, x_r), x_r, best_x)
    return (best_x, jnp.where(take, succ, best_succ), jnp.where(take, loss, best_loss))

  b = x.shape[0]
  init = (x, jnp.zeros((b,), bool), jnp.full((b,), -jnp.inf, LOSS_DTYPE))
  return jax.lax.fori_loop(0, restarts, body, init)[0]
