"""The model side of the attacks: deterministic logits functions and EOT wrappers.

A *logits function* is either a deterministic ``f(x) -> logits`` or an :class:`EOT`
wrapper (made by :func:`eot`) around a stochastic ``f(x, key) -> logits``.  Attacks
derive every key they hand to the model from their own ``key`` argument
(:func:`jaxdefense.attacks._loop.model_key`), so an attack is a deterministic function
of its inputs and key.

Precision: the model may compute in lower precision; :func:`logit_draws` upcasts its
logits to at least float32 before any loss sees them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxdefense import _checks

Array = jax.Array
LogitsFn = Callable[..., Array]


@dataclasses.dataclass(frozen=True)
class EOT:
  """Expectation over Transformation of a stochastic model (Athalye et al., 2018).

  Wraps a stochastic ``logits_fn(x, key) -> logits``.  Called as ``eot_fn(x, key)`` it
  returns the logits averaged over ``n`` noise draws (the ensemble prediction).  When an
  attack is given an ``EOT`` it maximises the *mean of the per-draw losses*, so its
  gradient is the mean of the ``n`` per-draw gradients; every iteration draws fresh
  keys derived from the attack's ``key``.

  An ``EOT`` is a pytree: its child is ``logits_fn`` (so the variables of a
  :class:`~jaxdefense.models.ModelFn` inside are leaves), ``n`` and ``vectorize`` are
  static.

  Attributes:
    logits_fn: stochastic model ``f(x [B, H, W, C], key) -> logits [B, K]``.
    n: number of noise draws per evaluation (>= 1).
    vectorize: evaluate the draws with ``jax.vmap`` (fast, ``n`` times the memory);
      ``False`` runs them sequentially with ``jax.lax.map``.
  """

  logits_fn: LogitsFn
  n: int = 5
  vectorize: bool = True

  def draws(self, x: Array, key: Array) -> Array:
    """Logits of ``n`` independent draws, ``[n, B, K]``."""
    keys = jax.random.split(key, self.n)
    one = lambda k: self.logits_fn(x, k)
    if self.vectorize:
      return jax.vmap(one)(keys)
    return jax.lax.map(one, keys)

  def __call__(self, x: Array, key: Array) -> Array:
    """Mean logits over ``n`` draws, ``[B, K]``."""
    return jnp.mean(self.draws(x, key), axis=0)


# An EOT is a pytree whose child is the wrapped model (its variables are leaves, e.g. of a
# ModelFn) and whose static part is (n, vectorize): the attacks pass it into jax.jit as
# an argument, so a new EOT of the same model reuses the compiled attack.
jax.tree_util.register_pytree_node(
    EOT, lambda e: ((e.logits_fn,), (e.n, e.vectorize)),
    lambda aux, children: EOT(children[0], *aux))


def eot(logits_fn: LogitsFn, n: int = 5, *, vectorize: bool = True) -> EOT:
  """Wrap a stochastic model for Expectation-over-Transformation attacks.

  Reference: Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of
  Security", ICML 2018; the EnResNet paper attacks its noisy nets with EOT over 5 draws.

  Every attack in :mod:`jaxdefense.attacks` accepts either a deterministic
  ``logits_fn(x)`` or the object returned here.  With an ``EOT`` model the attack's
  objective is the mean over ``n`` draws of the per-draw loss (so its gradient is the
  mean of the per-draw gradients), and each iteration uses fresh noise keys derived
  from the attack's ``key``.  On a deterministic model (one that ignores its key) the
  result equals the un-wrapped attack up to float rounding.

  Args:
    logits_fn: ``f(x [B, H, W, C], key) -> logits [B, K]``, e.g.
      ``lambda x, k: model.apply(variables, x, train=False, rngs={"noise": k})``.
    n: number of noise draws per gradient (EnResNet uses 5).
    vectorize: draw with ``vmap`` (default) or sequentially with ``lax.map``.

  Returns:
    An :class:`EOT` callable ``(x, key) -> mean logits [B, K]``.

  Raises:
    TypeError: ``logits_fn`` is not callable or ``n`` is not an integer.
    ValueError: ``n < 1``.
  """
  if not callable(logits_fn):
    raise TypeError(f"logits_fn must be callable f(x, key) -> logits; got {logits_fn!r}.")
  n = _checks.check_int(n, "n", minimum=1)
  return EOT(logits_fn, n, bool(vectorize))


def upcast_logits(logits: Array) -> Array:
  """Logits ``[..., K]`` in at least float32 (bfloat16 / float16 logits are upcast)."""
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def logit_draws(logits_fn: LogitsFn, x: Array, key: Optional[Array]) -> Array:
  """Logits of images ``x [B, H, W, C]`` as a stack of draws ``[n, B, K]``.

  ``n`` is the number of draws of an :class:`EOT` model (which needs ``key``) and 1 for
  a deterministic model (``key`` is ignored).  The logits are upcast to at least
  float32 (:func:`upcast_logits`), so losses of a model computing in low precision
  are evaluated in float32.
  """
  if isinstance(logits_fn, EOT):
    return upcast_logits(logits_fn.draws(x, key))
  return upcast_logits(logits_fn(x))[None]


def predict(logits_fn: LogitsFn, x: Array, *, key: Optional[Array] = None) -> Array:
  """Logits of a deterministic model, or the mean logits over draws of an :class:`EOT`.

  Args:
    logits_fn: ``f(x) -> logits`` or an :class:`EOT`.
    x: images ``[B, H, W, C]``.
    key: PRNG key, required for an :class:`EOT` model (ignored otherwise).  Default
      ``None``.

  Returns:
    Logits ``[B, K]``.

  Raises:
    ValueError: an :class:`EOT` model without a key.
  """
  if isinstance(logits_fn, EOT):
    if key is None:
      raise ValueError("predict: an EOT (stochastic) model needs key=jax.random.key(...); "
                       "got key=None.")
    return logits_fn(x, key)
  return logits_fn(x)
