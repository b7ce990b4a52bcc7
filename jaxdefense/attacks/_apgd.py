"""Auto-PGD (APGD-CE / APGD-DLR, targeted APGD-T) of Croce & Hein (2020).

Written as an :class:`~jaxdefense.attacks.AscentRule` (a pair of pure functions
whose state carries the step sizes, the best points and the checkpoint counters) run by
the shared ``lax.fori_loop`` driver.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import _checks
from jaxdefense.attacks._ascent import AscentRule
from jaxdefense.attacks._compiled import run_attack
from jaxdefense.attacks._loop import (ascent_loop, best_of_restarts, finite_examples,
                                      model_key)
from jaxdefense.attacks._losses import LOSS_DTYPE, better, make_loss, success
from jaxdefense.attacks._objective import evaluate, make_value_and_grad
from jaxdefense.attacks._projection import (expand_mask, make_projection, per_example,
                                            random_start, steepest_direction)
from jaxdefense.attacks._setup import setup

Array = jax.Array


def checkpoints(steps: int) -> list[int]:
  """APGD's checkpoints ``w_j = ceil(p_j N)`` (``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``), excluding ``w_0 = 0``."""
  p = [0.0, 0.22]
  while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  w = []
  for pj in p[1:]:
    wj = int(math.ceil(pj * steps - 1e-9))
    if 0 < wj < steps and (not w or wj > w[-1]):
      w.append(wj)
  return w


class APGDState(NamedTuple):
  """State of :func:`apgd_rule` (all per-example quantities have a leading ``[B]``).

  Attributes:
    x_prev: previous iterate (momentum term).
    x_max / g_max / f_max: highest-loss point seen, its gradient and loss.
    eta: current step size ``[B]``.
    count: loss increases ``f(x_{i}) > f(x_{i-1})`` since the last checkpoint.
    f_prev: loss of the previous iterate.
    f_max_ckpt: ``f_max`` at the last checkpoint.
    reduced_last: whether ``eta`` was halved at the last checkpoint.
    x_ret / succ_ret / f_ret: point returned (first by success, then by loss).
  """

  x_prev: Array
  x_max: Array
  g_max: Array
  f_max: Array
  eta: Array
  count: Array
  f_prev: Array
  f_max_ckpt: Array
  reduced_last: Array
  x_ret: Array
  succ_ret: Array
  f_ret: Array


def apgd_rule(project: Callable, eps: Any, norm: str, steps: int, y: Array,
              target: Optional[Array], rho: float = 0.75,
              alpha: float = 0.75) -> AscentRule:
  """APGD's update as an ascent rule (Croce & Hein 2020, Algorithm 1).

  ``z = P(x_k + eta dir(g))``; ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k -
  x_{k-1}))`` (a plain step at ``k = 0``).  At each checkpoint ``w_j`` the step size is
  halved and the iterate restarts from the best point when either fewer than
  ``rho (w_j - w_{j-1})`` steps increased the loss since ``w_{j-1}``, or the step size was
  not halved at ``w_{j-1}`` and the best loss has not improved since.  After a restart
  the momentum term is dropped for one step (``x_{k-1} := x_max``).
  """
  w = checkpoints(steps)
  is_ckpt = np.zeros(steps, bool)
  period = np.ones(steps, np.float32)
  prev = 0
  for wj in w:
    is_ckpt[wj] = True
    period[wj] = wj - prev
    prev = wj
  is_ckpt_c, period_c = jnp.asarray(is_ckpt), jnp.asarray(period)

  def init(x0):
    b = x0.shape[0]
    ninf = jnp.full((b,), -jnp.inf, LOSS_DTYPE)  # losses are float32
    eta = jnp.broadcast_to(2.0 * jnp.asarray(eps, x0.dtype), (b,))
    return APGDState(x_prev=x0, x_max=x0, g_max=jnp.zeros_like(x0), f_max=ninf, eta=eta,
                     count=jnp.zeros((b,), jnp.int32), f_prev=ninf, f_max_ckpt=ninf,
                     reduced_last=jnp.zeros((b,), bool), x_ret=x0,
                     succ_ret=jnp.zeros((b,), bool), f_ret=ninf)

  def update(i, x, f, logits, g, s):
    m = lambda mask: expand_mask(mask, x)
    succ = success(logits, y, target)
    take = better(succ, f, s.succ_ret, s.f_ret)
    x_ret = jnp.where(m(take), x, s.x_ret)
    succ_ret = jnp.where(take, succ, s.succ_ret)
    f_ret = jnp.where(take, f, s.f_ret)

    count = s.count + ((i > 0) & (f > s.f_prev)).astype(jnp.int32)
    improve = f > s.f_max
    x_max = jnp.where(m(improve), x, s.x_max)
    g_max = jnp.where(m(improve), g, s.g_max)
    f_max = jnp.where(improve, f, s.f_max)
    f_max_ckpt = jnp.where(i == 0, f_max, s.f_max_ckpt)

    ckpt = is_ckpt_c[i]
    oscillating = count.astype(x.dtype) < rho * period_c[i]
    stalled = ~s.reduced_last & (f_max <= f_max_ckpt)
    reduce = ckpt & (oscillating | stalled)
    eta = jnp.where(reduce, 0.5 * s.eta, s.eta)
    x_cur = jnp.where(m(reduce), x_max, x)
    g_cur = jnp.where(m(reduce), g_max, g)
    x_prev = jnp.where(m(reduce), x_max, s.x_prev)

    z = project(x_cur + per_example(eta, x) * steepest_direction(g_cur, norm))
    with_momentum = project(x_cur + alpha * (z - x_cur) + (1.0 - alpha) * (x_cur - x_prev))
    x_next = jnp.where(i == 0, z, with_momentum)
    state = APGDState(
        x_prev=x_cur, x_max=x_max, g_max=g_max, f_max=f_max, eta=eta,
        count=jnp.where(ckpt, 0, count), f_prev=f,
        f_max_ckpt=jnp.where(ckpt, f_max, f_max_ckpt),
        reduced_last=jnp.where(ckpt, reduce, s.reduced_last),
        x_ret=x_ret, succ_ret=succ_ret, f_ret=f_ret)
    return x_next, state

  return AscentRule(init, update)


def apgd(logits_fn: Callable, x: Array, y: Array, *, key: Array, eps: Any,
         steps: int = 100, norm: str = "linf", loss: Union[str, Callable] = "ce",
         restarts: int = 1, rho: float = 0.75, alpha: float = 0.75,
         target: Optional[Array] = None) -> Array:
  """Auto-PGD: step-size-free PGD with momentum and checkpointed step halving.

  APGD-CE (``loss="ce"``), APGD-DLR (``loss="dlr"``, ``K >= 3``) and the targeted
  APGD-T (``loss="dlr"``, ``target`` given, ``K >= 4``), in l-inf or l2.  The step size
  starts at ``2 eps``; at the checkpoints ``w_j = ceil(p_j N)`` with ``p_0 = 0, p_1 =
  0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` it is halved and the iterate
  restarts from the best point if the loss oscillated (fewer than ``rho`` of the steps
  since the last checkpoint increased it) or stalled.  The start is uniform in the
  ball; each example returns an iterate that fools the model if one was found, else
  its highest-loss iterate; restarts keep the worst case per example.

  Reference: Croce & Hein, "Reliable Evaluation of Adversarial Robustness with an
  Ensemble of Diverse Parameter-free Attacks", ICML 2020.

  Args:
    logits_fn: model ``f(x) -> logits [B, K]``, or ``eot(f, n)``.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    y: integer labels ``[B]``.
    key: PRNG key (random start, restarts, EOT draws).
    eps: radius (scalar or ``[B]``, may be traced).
    steps: gradient evaluations per restart (static, >= 1).  Default 100.
    norm: ``"linf"`` or ``"l2"``.
    loss: ``"ce"`` (default), ``"dlr"``, ``"margin"`` or a callable.
    restarts: static, >= 1.
    rho: oscillation threshold in (0, 1].  Default 0.75.
    alpha: momentum weight in (0, 1].  Default 0.75.
    target: optional target labels ``[B]``.

  Returns:
    Adversarial images ``[B, H, W, C]`` inside the ball and [0, 1].

  Raises:
    ValueError / TypeError: bad images, labels, eps, norm, loss, steps, restarts, rho,
      alpha, key, or too few classes for DLR.
    ValueError: an untraced call where the model produced non-finite (NaN / inf)
      logits, loss or gradient for some examples (the message gives how many and
      which).  Traced (``jit`` / ``vmap``), nothing is raised and those examples stop
      at the iterate where it happened, inside the ball and [0, 1].
  """
  su = setup("apgd", logits_fn, x, y, key=key, key_required=True, eps=eps, norm=norm,
             target=target, loss=loss, counts={"steps": steps, "restarts": restarts})
  rho = _checks.check_float(rho, "rho", minimum=0.0, maximum=1.0, strict_min=True)
  alpha = _checks.check_float(alpha, "alpha", minimum=0.0, maximum=1.0, strict_min=True)
  return run_attack(
      "apgd", _apgd_core, logits_fn,
      {"x": su.x, "y": su.y, "target": su.target, "key": key, "eps": su.eps, "rho": rho,
       "alpha": alpha},
      {"steps": su.counts["steps"], "norm": norm, "restarts": su.counts["restarts"],
       "loss": loss})


def _apgd_core(logits_fn, *, x, y, target, key, eps, rho, alpha, steps: int, norm: str,
               restarts: int, loss) -> tuple[Array, Array]:
  """The compiled part of :func:`apgd`; returns ``(x_adv, nonfinite [B])``."""
  loss_fn = make_loss(loss, y, target)
  project = make_projection(norm, x, eps)
  vg = make_value_and_grad(logits_fn, loss_fn)
  rule = apgd_rule(project, eps, norm, steps, y, target, rho, alpha)

  def run(k):
    x0 = random_start(jax.random.fold_in(k, 0), x, eps, norm)
    x_last, s, bad = ascent_loop(vg, rule, x0, steps, model_key(logits_fn, k, 1),
                                 with_nonfinite=True)
    f_last, logits_last = evaluate(logits_fn, loss_fn, x_last, model_key(logits_fn, k, 2))
    take = better(success(logits_last, y, target), f_last, s.succ_ret, s.f_ret)
    bad = bad | ~finite_examples(f_last, logits_last)
    return jnp.where(expand_mask(take, x), x_last, s.x_ret), bad

  def score(x_adv, k):
    value, logits = evaluate(logits_fn, loss_fn, x_adv, model_key(logits_fn, k, 0))
    return success(logits, y, target), value

  return best_of_restarts(run, score, x, restarts, key)
