"""Carlini & Wagner attacks in the tanh reparametrisation, optimised with Adam.

``x' = (tanh(u) + 1) / 2`` always lies in [0, 1]; ``u`` is optimised with Adam.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxdefense.attacks._ascent import (AscentRule, adam_ascent, adam_updates, best_with_last,
                                        track_best)
from jaxdefense.attacks._compiled import run_attack
from jaxdefense.attacks._eot import EOT
from jaxdefense.attacks._loop import ascent_loop, finite_examples, fold_in, model_key
from jaxdefense.attacks._losses import margin as margin_loss
from jaxdefense.attacks._losses import success
from jaxdefense.attacks._objective import evaluate, make_value_and_grad
from jaxdefense.attacks._projection import expand_mask, make_projection
from jaxdefense.attacks._setup import setup

Array = jax.Array

# Images at exactly 0 or 1 map to u = +-atanh(1 - _TANH_MARGIN) instead of +-inf.
_TANH_MARGIN = 1e-6


def _to_tanh(x: Array) -> Array:
  """Inverse of :func:`_from_tanh`, with [0, 1] shrunk slightly to keep ``u`` finite."""
  return jnp.arctanh(jnp.clip(2.0 * x - 1.0, -1.0 + _TANH_MARGIN, 1.0 - _TANH_MARGIN))


def _from_tanh(u: Array) -> Array:
  return 0.5 * (jnp.tanh(u) + 1.0)


def _cw_margin(target: Optional[Array], y: Array, kappa: Any) -> Callable:
  """Eq. (14)'s ``max(-kappa, max_{i != t} Z_i - Z_t)`` (untargeted: ``Z_y - max_{i!=y} Z_i``).

  Returned as a quantity to *maximise* (its negative), per example.
  """
  if target is None:
    return lambda z: -jnp.maximum(-kappa, -margin_loss(z, y))
  return lambda z: -jnp.maximum(-kappa, margin_loss(z, target))


def _cw_success(logits: Array, y: Array, target: Optional[Array], kappa: Any) -> Array:
  """Per-example success ``[B]`` with confidence ``kappa`` (``compare`` of C&W's code).

  Untargeted: ``max_{i != y} Z_i - Z_y >= kappa``; targeted: ``Z_t - max_{i != t} Z_i >=
  kappa``.  Computed as the argmax of the logits with ``Z_y`` raised (``Z_t`` lowered) by
  ``kappa``, so ``kappa = 0`` is exactly :func:`~jaxdefense.attacks._losses.success`.
  """
  kappa_e = jnp.asarray(kappa, logits.dtype)
  if kappa_e.ndim == 1:
    kappa_e = kappa_e[:, None]
  num_classes = logits.shape[-1]
  if target is None:
    shifted = logits + kappa_e * jax.nn.one_hot(y, num_classes, dtype=logits.dtype)
  else:
    shifted = logits - kappa_e * jax.nn.one_hot(target, num_classes, dtype=logits.dtype)
  return success(shifted, y, target)


def _linf_distance(x: Array) -> Callable:
  def dist(u):
    return jax.vmap(lambda d: jnp.max(jnp.abs(d)))(_from_tanh(u) - x)
  return dist


def cw_linf(logits_fn: Callable, x: Array, y: Array, *, key: Optional[Array] = None,
            eps: Any, steps: int = 50, lr: Any = 6e-4, c: Any = 10.0, kappa: Any = 0.0,
            target: Optional[Array] = None) -> Array:
  """C&W l-inf attack of the EnResNet paper (eq. 14), projected onto the eps-ball.

  Minimises over ``u``, with ``x'(u) = (tanh(u) + 1) / 2``,

      ``|| x'(u) - x ||_inf + c * max(-kappa, max_{i != t} Z(x')_i - Z(x')_t)``

  with Adam.  Without ``target`` the untargeted margin ``Z(x')_y - max_{i != y} Z(x')_i``
  replaces the targeted one.  After every Adam step ``x'`` is projected onto the l-inf
  ball of radius ``eps`` ∩ [0, 1] and mapped back to ``u``, so the attack is a projected
  attack inside the threat model (the paper's unconstrained problem trades distance
  for misclassification through ``c`` instead).  The defaults are the paper's: 50 Adam
  steps, learning rate 6e-4, c = 10, kappa = 0.  As in C&W, each example returns its
  best iterate: one that fools the model (reaches ``target``) if any, else the one with
  the lowest objective.  Pixels at exactly 0 or 1 sit where ``tanh`` saturates and
  barely move (a known property of the reparametrisation).

  References: Carlini & Wagner, "Towards Evaluating the Robustness of Neural
  Networks", IEEE S&P 2017; Wang et al., "ResNets Ensemble via the Feynman-Kac
  Formalism to Improve Natural and Robust Accuracies", NeurIPS 2019, eq. (14).

  Args:
    logits_fn: model ``f(x) -> logits [B, K]``, or ``eot(f, n)``.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    y: integer labels ``[B]``.
    key: PRNG key; only needed for an :class:`EOT` model.
    eps: l-inf radius (scalar or ``[B]``, may be traced).
    steps: Adam steps (static, >= 1).  Default 50.
    lr: Adam learning rate in ``u`` space (> 0; scalar or ``[B]``).  Default 6e-4.
    c: weight of the margin term (>= 0; scalar or ``[B]``).  Default 10.
    kappa: confidence margin (>= 0; scalar or ``[B]``).  Default 0.
    target: optional target labels ``[B]`` (eq. 14 is targeted).

  Returns:
    Adversarial images ``[B, H, W, C]`` inside the eps-ball and [0, 1].

  Raises:
    ValueError / TypeError: bad images, labels, eps, steps, lr, c or kappa.
    ValueError: an untraced call where the model produced non-finite (NaN / inf)
      logits, loss or gradient for some examples (the message gives how many and
      which).  Traced (``jit`` / ``vmap``), nothing is raised and those examples stop
      at the iterate where it happened, inside the ball and [0, 1].
  """
  s = setup("cw_linf", logits_fn, x, y, key=key, eps=eps, norm="linf", target=target,
            counts={"steps": steps}, params={"lr": lr, "c": c, "kappa": kappa})
  return run_attack(
      "cw_linf", _cw_linf_core, logits_fn,
      {"x": s.x, "y": s.y, "target": s.target,
       "key": key if isinstance(logits_fn, EOT) else None, "eps": s.eps,
       "lr": s.params["lr"], "c": s.params["c"], "kappa": s.params["kappa"]},
      {"steps": s.counts["steps"]})


def _cw_linf_core(logits_fn, *, x, y, target, key, eps, lr, c, kappa,
                  steps: int) -> tuple[Array, Array]:
  """The compiled part of :func:`cw_linf`; returns ``(x_adv, nonfinite [B])``."""
  c_e = jnp.asarray(c, x.dtype)
  dist = _linf_distance(x)
  objective = lambda z: c_e * _cw_margin(target, y, kappa)(z)  # to maximise
  penalty = lambda u: -dist(u)
  vg = make_value_and_grad(logits_fn, objective, transform=_from_tanh, penalty=penalty)
  project_x = make_projection("linf", x, eps)
  decode = lambda u: project_x(_from_tanh(u))
  rule = track_best(adam_ascent(lr, lambda u: _to_tanh(decode(u))), decode, y, target)
  u, state, bad = ascent_loop(vg, rule, _to_tanh(x), steps, model_key(logits_fn, key, 0),
                              with_nonfinite=True)
  value, logits = evaluate(logits_fn, objective, u, model_key(logits_fn, key, 1),
                           transform=decode, penalty=penalty)
  bad = bad | ~finite_examples(value, logits)
  return best_with_last(state, decode(u), value, logits, y, target), bad


class _BestL2(NamedTuple):
  """State of one Adam run of :func:`cw_l2` (per-example quantities lead with ``[B]``).

  Attributes:
    adam: Adam's state.
    best_x / best_dist: closest successful point over all runs so far and its squared
      l2 distance (``inf`` while none).
    found: whether *this* run (this value of ``c``) reached a successful iterate.
  """

  adam: Any
  best_x: Array
  best_dist: Array
  found: Array


def cw_l2(logits_fn: Callable, x: Array, y: Array, *, key: Optional[Array] = None,
          eps: Any = None, c: Any = 1.0, kappa: Any = 0.0, steps: int = 100,
          lr: Any = 1e-2, binary_search_steps: int = 1,
          target: Optional[Array] = None) -> Array:
  """Carlini & Wagner l2 attack (minimum-distance), optionally confined to an l2 ball.

  Minimises ``||x'(u) - x||_2^2 + c * max(-kappa, margin)`` over ``u`` with Adam, where
  ``x'(u) = (tanh(u) + 1) / 2`` and ``margin`` is ``Z_y - max_{i != y} Z_i`` (untargeted)
  or ``max_{i != t} Z_i - Z_t`` (targeted).  An iterate is *successful* when it is
  misclassified with confidence ``kappa``: ``max_{i != y} Z_i - Z_y >= kappa``
  (targeted: ``Z_t - max_{i != t} Z_i >= kappa``).  Each example keeps the successful
  iterate of smallest l2 distance; an example never fooled is returned unchanged.
  With ``binary_search_steps > 1`` the constant ``c`` is tuned per example as in C&W:
  after a run (one value of ``c``) that reached a successful iterate, ``c`` goes down
  (bisection between the largest failing and the smallest successful ``c``); after a
  run that did not, it goes up (multiplied by 10 until a first success, then
  bisection).  With ``eps`` given, every iterate is projected onto the l2 ball of
  radius ``eps`` ∩ [0, 1].

  Reference: Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
  IEEE S&P 2017.

  Args:
    logits_fn: model ``f(x) -> logits [B, K]``, or ``eot(f, n)``.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    y: integer labels ``[B]``.
    key: PRNG key; only needed for an :class:`EOT` model.
    eps: optional l2 radius (scalar or ``[B]``, may be traced); ``None`` = unbounded.
    c: initial weight of the margin term (>= 0; scalar or ``[B]``).  Default 1.
    kappa: confidence (>= 0; scalar or ``[B]``).  Default 0.
    steps: Adam steps per binary-search step (static, >= 1).  Default 100.
    lr: Adam learning rate (scalar or ``[B]``).  Default 0.01.
    binary_search_steps: number of values of ``c`` tried (static, >= 1).  Default 1.
    target: optional target labels ``[B]``.

  Returns:
    Adversarial images ``[B, H, W, C]`` in [0, 1] (and inside the l2 ball if ``eps``).

  Raises:
    ValueError / TypeError: bad images, labels, eps, steps, lr, c or kappa.
    ValueError: an untraced call where the model produced non-finite (NaN / inf)
      logits, loss or gradient for some examples (the message gives how many and
      which).  Traced (``jit`` / ``vmap``), nothing is raised and those examples stop
      at the iterate where it happened, inside the ball and [0, 1].
  """
  s = setup("cw_l2", logits_fn, x, y, key=key, eps=eps, norm="l2", target=target,
            counts={"steps": steps, "binary_search_steps": binary_search_steps},
            params={"lr": lr, "c": c, "kappa": kappa})
  return run_attack(
      "cw_l2", _cw_l2_core, logits_fn,
      {"x": s.x, "y": s.y, "target": s.target,
       "key": key if isinstance(logits_fn, EOT) else None, "eps": s.eps,
       "lr": s.params["lr"], "c": s.params["c"], "kappa": s.params["kappa"]},
      {"steps": s.counts["steps"],
       "binary_search_steps": s.counts["binary_search_steps"]})


def _cw_l2_core(logits_fn, *, x, y, target, key, eps, lr, c, kappa, steps: int,
                binary_search_steps: int) -> tuple[Array, Array]:
  """The compiled part of :func:`cw_l2`; returns ``(x_adv, nonfinite [B])``."""
  key = model_key(logits_fn, key, 0)  # None for a deterministic model
  batch = x.shape[0]
  if eps is None:
    project_u = lambda u: u
  else:
    project_x = make_projection("l2", x, eps)
    project_u = lambda u: _to_tanh(project_x(_from_tanh(u)))
  sq_dist = lambda u: jax.vmap(lambda d: jnp.sum(jnp.square(d)))(_from_tanh(u) - x)
  margin = _cw_margin(target, y, kappa)
  adam = adam_updates(lr)  # per-example lr broadcast over the batch axis

  def run(c_b, best_x, best_dist, k):
    """One Adam run with per-example ``c_b``; track the closest successful iterate.

    Returns the updated ``(best_x, best_dist)``, whether this run reached a
    successful iterate (``[B]``), which drives the search over ``c``, and whether it
    met a non-finite value (``[B]``).
    """
    vg = make_value_and_grad(
        logits_fn, lambda z: c_b * margin(z), transform=_from_tanh,
        penalty=lambda u: -sq_dist(u))

    def keep_best(u, logits, best_x, best_dist):
      x_u = _from_tanh(u)
      if eps is not None:
        x_u = project_x(x_u)
      d = jax.vmap(lambda v: jnp.sum(jnp.square(v)))(x_u - x)
      succ = _cw_success(logits, y, target, kappa)
      take = succ & (d < best_dist)
      return (jnp.where(expand_mask(take, x), x_u, best_x),
              jnp.where(take, d, best_dist), succ)

    def init(u):
      return _BestL2(adam.init(u), best_x, best_dist, jnp.zeros((batch,), bool))

    def update(i, u, loss, logits, grad, state):
      del i, loss
      bx, bd, succ = keep_best(u, logits, state.best_x, state.best_dist)
      updates, adam_state = adam.update(-grad, state.adam, u)
      return (project_u(optax.apply_updates(u, updates)),
              _BestL2(adam_state, bx, bd, state.found | succ))

    u, state, bad = ascent_loop(vg, AscentRule(init, update), project_u(_to_tanh(x)),
                                steps, k, with_nonfinite=True)
    _, logits = evaluate(logits_fn, margin, _from_tanh(u), fold_in(k, steps))
    bx, bd, succ = keep_best(u, logits, state.best_x, state.best_dist)
    return bx, bd, state.found | succ, bad | ~finite_examples(logits)

  def search(s, carry):
    c_b, lo, hi, best_x, best_dist, bad = carry
    best_x, best_dist, found, bad_s = run(c_b, best_x, best_dist, fold_in(key, s))
    # C&W: a run that succeeded (whether or not it beat earlier runs' distance) lowers
    # c; one that failed raises it (x10 while no c has succeeded, else bisection).
    hi = jnp.where(found, jnp.minimum(hi, c_b), hi)
    lo = jnp.where(found, lo, jnp.maximum(lo, c_b))
    c_b = jnp.where(hi < 1e9, 0.5 * (lo + hi), c_b * 10.0)
    return c_b, lo, hi, best_x, best_dist, bad | bad_s

  c0 = jnp.broadcast_to(jnp.asarray(c, x.dtype), (batch,))
  init = (c0, jnp.zeros_like(c0), jnp.full_like(c0, 1e10), x, jnp.full_like(c0, jnp.inf),
          jnp.zeros((batch,), bool))
  out = jax.lax.fori_loop(0, binary_search_steps, search, init)
  return out[3], out[5]
