"""SPSA: a gradient-free attack (finite differences along random +-1 directions, Adam)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from jaxdefense import _checks
from jaxdefense.attacks._ascent import adam_ascent
from jaxdefense.attacks._compiled import run_attack
from jaxdefense.attacks._eot import EOT, logit_draws
from jaxdefense.attacks._loop import ascent_loop, fold_in, model_key
from jaxdefense.attacks._losses import LOSS_DTYPE, make_loss
from jaxdefense.attacks._objective import loss_values
from jaxdefense.attacks._projection import make_projection, per_example
from jaxdefense.attacks._projection import random_start as random_point
from jaxdefense.attacks._setup import setup

Array = jax.Array


def spsa_gradient(logits_fn: Callable, loss_fn: Callable, delta: Any, num_samples: int,
                  samples_per_call: int) -> Callable:
  """SPSA estimator ``vg(x, key) -> (loss [B], None, g)`` of the loss gradient.

  ``g = mean_i (L(x + delta v_i) - L(x - delta v_i)) / (2 delta) * v_i`` over
  ``num_samples`` Rademacher directions ``v_i`` per example.  The model sees
  ``2 * samples_per_call * B`` images per chunk of directions (in one call, or in two
  for an :class:`~jaxdefense.attacks.EOT` model, see below); the chunks run in a
  ``lax.fori_loop`` (directions are regenerated from keys, so memory does not grow
  with ``num_samples``).  The returned loss is the mean of the probe losses (float32).

  For an :class:`~jaxdefense.attacks.EOT` model the estimator uses common random
  numbers: the ``+delta`` probes and the ``-delta`` probes are two model calls of the
  same shape with the same key, so the two probes of a direction see the same noise
  (for a model whose noise is a function of its key and the position in the batch)
  and the noise cancels in their difference instead of swamping it (it is divided by
  ``2 delta``).
  """
  calls = num_samples // samples_per_call
  stochastic = isinstance(logits_fn, EOT)

  def vg(x, key):
    batch = x.shape[0]
    d_b = jnp.broadcast_to(jnp.asarray(delta, x.dtype), (batch,))  # [B]
    d = per_example(d_b, x)

    def body(j, carry):
      g, loss = carry
      k_dir = jax.random.fold_in(key, j)
      k_model = model_key(logits_fn, model_key(logits_fn, key, calls), j)
      v = jax.random.rademacher(k_dir, (samples_per_call,) + x.shape, x.dtype)
      # Probes batch-major, [B, S, ...] -> [B * S, ...]: merging into the (possibly
      # sharded) batch axis from the minor side keeps the batch's sharding.
      vb = jnp.moveaxis(v, 0, 1)
      plus_x, minus_x = x[:, None] + d[:, None] * vb, x[:, None] - d[:, None] * vb

      def probe(points):  # [B, s, ...] -> logits [n, B, s, K]
        draws = logit_draws(logits_fn, points.reshape((-1,) + x.shape[1:]), k_model)
        return draws.reshape((draws.shape[0], batch, points.shape[1], -1))

      if stochastic:
        # Common random numbers: the + and the - probes go through two calls with the
        # same key and the same batch layout, so probe pairs share their noise.
        draws = jnp.concatenate([probe(plus_x), probe(minus_x)], axis=2)  # [n, B, 2S, K]
      else:
        draws = probe(jnp.concatenate([plus_x, minus_x], axis=1))  # one call
      draws = jnp.swapaxes(draws, 1, 2)  # [n, 2S, B, K]
      values = jax.vmap(lambda dr: loss_values(loss_fn, dr), in_axes=1)(draws)
      plus, minus = values[:samples_per_call], values[samples_per_call:]  # [S, B] each
      coef = ((plus - minus) / (2.0 * d_b)).astype(x.dtype)  # [S, B]
      g = g + jnp.einsum("sb,sb...->b...", coef, v)
      return g, loss + jnp.sum(values, axis=0)

    g, loss = jax.lax.fori_loop(0, calls, body,
                                (jnp.zeros_like(x), jnp.zeros((batch,), LOSS_DTYPE)))
    return loss / (2 * num_samples), None, g / num_samples

  return vg


def spsa(logits_fn: Callable, x: Array, y: Array, *, key: Array, eps: Any,
         steps: int = 100, lr: Any = 0.01, delta: Any = 0.01, num_samples: int = 64,
         samples_per_call: Optional[int] = None, random_start: bool = False,
         target: Optional[Array] = None, loss: Union[str, Callable] = "margin") -> Array:
  """SPSA attack (gradient-free) inside the l-inf ball.

  Each step estimates the gradient of the per-example loss by simultaneous
  perturbation: ``g = mean_i (L(x + delta v_i) - L(x - delta v_i)) / (2 delta) v_i`` with
  Rademacher ``v_i``, takes an Adam ascent step and projects onto the eps-ball ∩ [0, 1].
  It needs only logits, so it sees through masked / obfuscated gradients (SONet's
  adaptive-solver study).  Returns the last iterate.

  Reference: Uesato et al., "Adversarial Risk and the Dangers of Evaluating Against
  Weak Attacks", ICML 2018 (Adam lr 0.01, delta 0.01, margin loss).

  Args:
    logits_fn: model ``f(x) -> logits [B, K]``, or ``eot(f, n)``; never differentiated.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    y: integer labels ``[B]``.
    key: PRNG key (directions, optional random start, EOT draws).
    eps: l-inf radius (scalar or ``[B]``, may be traced).
    steps: Adam steps (static, >= 1).  Default 100.
    lr: Adam learning rate (scalar or ``[B]``).  Default 0.01.
    delta: finite-difference step (> 0; scalar or ``[B]``).  Default 0.01.
    num_samples: directions per step (static, >= 1).  Default 64.
    samples_per_call: directions evaluated per chunk (static, divides
      ``num_samples``); default all of them (the model sees ``2 * num_samples * B``
      images at once; an :class:`~jaxdefense.attacks.EOT` model sees the ``+delta``
      and the ``-delta`` probes in two calls with common noise).
    random_start: start uniformly in the ball instead of at ``x``.
    target: optional target labels ``[B]``.
    loss: ``"margin"`` (default), ``"ce"``, ``"dlr"`` or a callable.

  Returns:
    Adversarial images ``[B, H, W, C]`` inside the eps-ball and [0, 1].

  Raises:
    ValueError / TypeError: bad images, labels, eps, steps, delta or sample counts.
    ValueError: an untraced call where the model produced non-finite (NaN / inf)
      logits, loss or gradient for some examples (the message gives how many and
      which).  Traced (``jit`` / ``vmap``), nothing is raised and those examples stop
      at the iterate where it happened, inside the ball and [0, 1].
  """
  if samples_per_call is None:
    samples_per_call = num_samples
  s = setup("spsa", logits_fn, x, y, key=key, key_required=True, eps=eps, norm="linf",
            target=target, loss=loss,
            counts={"steps": steps, "num_samples": num_samples,
                    "samples_per_call": samples_per_call},
            params={"lr": lr, "delta": delta})
  steps, num_samples = s.counts["steps"], s.counts["num_samples"]
  samples_per_call = _checks.check_int(s.counts["samples_per_call"], "samples_per_call",
                                       minimum=1, maximum=num_samples)
  if num_samples % samples_per_call:
    raise ValueError(f"spsa: samples_per_call ({samples_per_call}) must divide "
                     f"num_samples ({num_samples}).")
  delta = s.params["delta"]
  delta_np = _checks.as_concrete_numpy(delta)
  if delta_np is not None and (delta_np <= 0).any():
    raise ValueError(f"spsa: delta must be > 0; got {delta!r}.")
  return run_attack(
      "spsa", _spsa_core, logits_fn,
      {"x": s.x, "y": s.y, "target": s.target, "key": key, "eps": s.eps,
       "lr": s.params["lr"], "delta": delta},
      {"steps": steps, "num_samples": num_samples, "samples_per_call": samples_per_call,
       "random_start": bool(random_start), "loss": loss})


def _spsa_core(logits_fn, *, x, y, target, key, eps, lr, delta, steps: int,
               num_samples: int, samples_per_call: int, random_start: bool,
               loss) -> tuple[Array, Array]:
  """The compiled part of :func:`spsa`; returns ``(x_adv, nonfinite [B])``."""
  vg = spsa_gradient(logits_fn, make_loss(loss, y, target), delta, num_samples,
                     samples_per_call)
  project = make_projection("linf", x, eps)
  rule = adam_ascent(lr, project)
  x0 = random_point(fold_in(key, 0), x, eps, "linf") if random_start else x
  z, _, bad = ascent_loop(vg, rule, x0, steps, fold_in(key, 1), with_nonfinite=True)
  return z, bad
