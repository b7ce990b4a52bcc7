"""Drivers of the attacks: key derivation, the ``lax.fori_loop`` over iterations, restarts.

:func:`ascent_loop` runs an :class:`~jaxdefense.attacks.AscentRule` for a static number
of steps inside one ``jax.lax.fori_loop``, so compile time does not grow with the
number of steps, and stops each example at its first non-finite loss, logits or
gradient (:func:`finite_examples`); :func:`best_of_restarts` repeats a whole attack and
keeps each example's worst case.  Keys are derived with ``fold_in`` from the attack's
own key, so an attack is a deterministic function of its inputs and key.
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


def finite_examples(*values: Optional[Array]) -> Array:
  """Per-example finiteness ``[B]``: ``True`` where every entry of every value is finite.

  Each value has a leading batch axis ``[B, ...]`` (a loss ``[B]``, logits ``[B, K]``,
  a gradient ``[B, H, W, C]``); ``None`` values are skipped.  The reduction runs over
  the non-batch axes only, so a batch sharded over devices keeps its sharding.
  """
  ok = None
  for v in values:
    if v is None:
      continue
    f = jnp.isfinite(v)
    if f.ndim > 1:
      f = jnp.all(f, axis=tuple(range(1, f.ndim)))
    ok = f if ok is None else ok & f
  if ok is None:
    raise ValueError("finite_examples needs at least one array.")
  return ok


def ascent_loop(vg: Callable, rule: AscentRule, z0: Array, steps: int,
                key: Optional[Array], *, with_nonfinite: bool = False) -> tuple:
  """Run ``steps`` iterations of ``rule`` from ``z0`` inside one ``lax.fori_loop``.

  Iteration ``i`` evaluates ``vg(z_i, fold_in(key, i))`` (``vg(z_i, None)`` when ``key``
  is ``None``, for deterministic models) and applies ``rule.update``.

  Non-finite values: an example whose loss, logits or gradient at ``z_i`` is not finite
  (NaN or inf) stops there: it keeps ``z_i`` (the iterate where the non-finite value
  appeared, itself finite and inside the threat model when ``z0`` is) for the
  remaining iterations, however its rule state evolves.  Other examples are not
  affected.  The check is a per-example reduction inside the loop (no host sync).

  Args:
    vg: value-and-gradient function ``vg(z, key) -> (loss [B], logits [B, K] | None,
      grad)``, e.g. :func:`~jaxdefense.attacks.make_value_and_grad`.
    rule: the :class:`AscentRule` applied at every iteration.
    z0: starting attack variable ``[B, ...]``.
    steps: number of iterations (a static Python int; 0 returns ``z0``).
    key: PRNG key for the model's noise, or ``None``.
    with_nonfinite: also return the stopped examples.  Default ``False``.

  Returns:
    ``(z_steps, final rule state)``, or ``(z_steps, final rule state, nonfinite)``
    with ``with_nonfinite``, where ``nonfinite [B]`` (bool) marks the examples that
    met a non-finite loss, logits or gradient.
  """

  def body(i, carry):
    z, state, bad = carry
    loss, logits, grad = vg(z, fold_in(key, i))
    z_next, state = rule.update(i, z, loss, logits, grad, state)
    bad = bad | ~finite_examples(loss, logits, grad)
    return jnp.where(expand_mask(bad, z), z, z_next), state, bad

  init = (z0, rule.init(z0), jnp.zeros((z0.shape[0],), bool))
  z, state, bad = jax.lax.fori_loop(0, steps, body, init)
  return (z, state, bad) if with_nonfinite else (z, state)


def best_of_restarts(run: Callable[[Optional[Array]], tuple[Array, Array]],
                     score: Callable, x: Array, restarts: int,
                     key: Optional[Array]) -> tuple[Array, Array]:
  """Run an attack ``restarts`` times and keep the worst case for each example.

  ``run(key) -> (x_adv [B, ...], nonfinite [B])``; ``score(x_adv, key) -> (success [B],
  loss [B])``.  Restart ``r`` uses ``fold_in(key, r)``, so ``restarts=1`` reproduces
  restart 0 of a longer run.  An example keeps the restart that succeeded, or else the
  one with the highest loss.  ``key`` may be ``None`` when nothing is random.

  Returns:
    ``(x_adv [B, ...], nonfinite [B])``: ``nonfinite`` is true for an example when any
    restart met a non-finite value (or its score was not finite).
  """
  if restarts == 1:
    return run(fold_in(key, 0))

  def body(r, carry):
    best_x, best_succ, best_loss, bad = carry
    k = fold_in(key, r)
    x_r, bad_r = run(k)
    succ, loss = score(x_r, fold_in(k, 1_000_003))
    # Restart 0 is always taken (it beats the -inf start unless its loss is NaN).
    take = better(succ, loss, best_succ, best_loss) | (r == 0)
    best_x = jnp.where(expand_mask(take, x_r), x_r, best_x)
    bad = bad | bad_r | ~finite_examples(loss)
    return (best_x, jnp.where(take, succ, best_succ), jnp.where(take, loss, best_loss), bad)

  b = x.shape[0]
  init = (x, jnp.zeros((b,), bool), jnp.full((b,), -jnp.inf, LOSS_DTYPE),
          jnp.zeros((b,), bool))
  best_x, _, _, bad = jax.lax.fori_loop(0, restarts, body, init)
  return best_x, bad
