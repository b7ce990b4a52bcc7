"""Geometry of the threat model: per-example broadcasting, steepest directions,
projections onto the l-inf / l2 ball intersected with the [0, 1] box, random starts.

Everything is written with broadcasting over the batch axis (or a ``vmap`` of a
per-example reduction), so examples never interact and a batch sharded over devices
keeps its sharding.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array

NORMS = ("linf", "l2")


def per_example(value: Any, x: Array) -> Array:
  """Broadcast a scalar or per-example ``[B]`` value against images ``[B, ...]``.

  Returns ``value`` in the dtype of ``x``, reshaped to ``[B, 1, ...]`` when it has one
  axis (a scalar stays a scalar).
  """
  value = jnp.asarray(value, dtype=x.dtype)
  if value.ndim == 1:
    return value.reshape((-1,) + (1,) * (x.ndim - 1))
  return value


def expand_mask(mask: Array, x: Array) -> Array:
  """Reshape a per-example boolean ``[B]`` to broadcast against ``x [B, ...]``."""
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def _l2_norm_one(v: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(v)))


def l2_normalize(g: Array) -> Array:
  """``g / ||g||_2`` per example for ``g [B, ...]`` (zero stays zero)."""
  return jax.vmap(lambda gi: gi / jnp.maximum(_l2_norm_one(gi), 1e-12))(g)


def l1_normalize(g: Array) -> Array:
  """``g / ||g||_1`` per example for ``g [B, ...]`` (zero stays zero)."""
  return jax.vmap(lambda gi: gi / jnp.maximum(jnp.sum(jnp.abs(gi)), 1e-12))(g)


def steepest_direction(g: Array, norm: str) -> Array:
  """Steepest ascent direction of unit norm: ``sign(g)`` (l-inf) or ``g / ||g||_2``.

  ``g [B, ...]``; ``norm`` is ``"linf"`` or ``"l2"`` (anything else is treated as l2).
  """
  return jnp.sign(g) if norm == "linf" else l2_normalize(g)


def _l2_norms(v: Array) -> Array:
  """Per-example l2 norms of ``v [B, ...]``, shaped ``[B, 1, ...]`` to broadcast."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def make_projection(norm: str, x: Array, eps: Any) -> Callable[[Array], Array]:
  """Projection onto ``{x' : ||x' - x|| <= eps} ∩ [0, 1]^d`` (per-example ``eps``).

  ``x [B, ...]`` is the centre, ``eps`` a scalar or ``[B]``; the returned function maps
  ``[B, ...]`` to ``[B, ...]``.  Exact for l-inf; for l2 it scales into the ball and
  then clips to the box (feasible, the usual approximation of the exact projection).
  Written with broadcasting rather than ``vmap`` over examples, so a batch sharded
  over devices (explicit sharding included) keeps its sharding.
  """
  eps_e = per_example(eps, x)
  if norm == "linf":
    return lambda x_adv: jnp.clip(jnp.clip(x_adv, x - eps_e, x + eps_e), 0.0, 1.0)

  def project_l2(x_adv: Array) -> Array:
    delta = x_adv - x
    factor = jnp.minimum(1.0, eps_e / jnp.maximum(_l2_norms(delta), 1e-12))
    # Clipping to the box after scaling only shrinks |delta| coordinate-wise, so the
    # result stays inside the ball.
    return jnp.clip(x + delta * factor, 0.0, 1.0)

  return project_l2


def random_start(key: Array, x: Array, eps: Any, norm: str, kind: str = "uniform",
                 scale: Any = None) -> Array:
  """A random starting point ``[B, ...]`` inside the threat model around ``x``.

  ``uniform`` (default): uniform in the l-inf ball, or uniform in the l2 ball (Gaussian
  direction, radius ``eps * U^(1/d)``).  ``normal``: ``x + scale * N(0, I)`` (TRADES;
  ``scale`` a scalar or ``[B]``).  The point is projected onto the ball and [0, 1].
  """
  project = make_projection(norm, x, eps)
  if kind == "normal":
    return project(x + per_example(scale, x) * jax.random.normal(key, x.shape, x.dtype))
  eps_e = per_example(eps, x)
  if norm == "linf":
    noise = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    return project(x + eps_e * noise)
  k_dir, k_rad = jax.random.split(key)
  direction = l2_normalize(jax.random.normal(k_dir, x.shape, x.dtype))
  d = math.prod(x.shape[1:])
  radius = jax.random.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / d)
  return project(x + eps_e * per_example(radius, x) * direction)
