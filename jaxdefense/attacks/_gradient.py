"""First-order sign attacks: FGSM, IFGSM (BIM), PGD and MI-FGSM.

All four are one projected-ascent loop (:func:`jaxdefense.attacks.ascent_loop`)
with different starting points, step rules and iteration counts.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from jaxdefense.attacks._ascent import momentum_sign_ascent, sign_ascent
from jaxdefense.attacks._eot import EOT
from jaxdefense.attacks._compiled import run_attack
from jaxdefense.attacks._loop import ascent_loop, best_of_restarts, fold_in, model_key
from jaxdefense.attacks._losses import make_loss, success
from jaxdefense.attacks._objective import evaluate, make_value_and_grad
from jaxdefense.attacks._projection import make_projection, random_start
from jaxdefense.attacks._setup import setup

Array = jax.Array


def _projected_ascent_core(logits_fn, *, x, y, target, key, eps, step_size, mu, steps: int,
                           norm: str, start: Optional[str], restarts: int,
                           loss) -> tuple[Array, Array]:
  """The compiled part: ``restarts`` projected sign-ascent runs from ``start``.

  Returns ``(x_adv, nonfinite [B])``.
  """
  loss_fn = make_loss(loss, y, target)
  project = make_projection(norm, x, eps)
  if step_size is None:
    step_size = (eps if mu is not None else 2.5 * jnp.asarray(eps)) / steps
  vg = make_value_and_grad(logits_fn, loss_fn)
  if mu is None:
    rule = sign_ascent(step_size, project, norm)
  else:
    rule = momentum_sign_ascent(step_size, mu, project, norm)

  def run(k):
    x0 = x if start is None else random_start(fold_in(k, 0), x, eps, norm)
    z, _, bad = ascent_loop(vg, rule, x0, steps, model_key(logits_fn, k, 1),
                            with_nonfinite=True)
    return z, bad

  def score(x_adv, k):
    value, logits = evaluate(logits_fn, loss_fn, x_adv, model_key(logits_fn, k, 0))
    return success(logits, y, target), value

  return best_of_restarts(run, score, x, restarts, key)


def _projected_ascent(attack: str, logits_fn, x, y, *, key, eps, step_size, steps: int,
                      norm: str, start: Optional[str], restarts: int, target, loss,
                      mu: Any = None, key_required: bool = False) -> Array:
  """Check the arguments, then run :func:`_projected_ascent_core` compiled (cached)."""
  params = {} if step_size is None else {"step_size": step_size}
  if mu is not None:
    params["mu"] = mu
  s = setup(attack, logits_fn, x, y, key=key, key_required=key_required, eps=eps,
            norm=norm, target=target, loss=loss,
            counts={"steps": steps, "restarts": restarts}, params=params)
  if start is None and not isinstance(logits_fn, EOT):
    key = None  # nothing random: skip key derivations
  return run_attack(
      attack, _projected_ascent_core, logits_fn,
      {"x": s.x, "y": s.y, "target": s.target, "key": key, "eps": s.eps,
       "step_size": s.params.get("step_size"), "mu": s.params.get("mu")},
      {"steps": s.counts["steps"], "norm": norm, "start": start,
       "restarts": s.counts["restarts"], "loss": loss})


def fgsm(logits_fn: Callable, x: Array, y: Array, *, key: Optional[Array] = None,
         eps: Any, target: Optional[Array] = None,
         loss: Union[str, Callable] = "ce") -> Array:
  """Fast Gradient Sign Method: ``x' = clip_[0,1](x + eps * sign(grad_x L(x, y)))``.

  Reference: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial
  Examples", ICLR 2015 (EnResNet eq. 11).  Targeted: ``x - eps sign(grad CE(x, t))``.

  Args:
    logits_fn: model ``f(x) -> logits [B, K]``, or ``eot(f, n)`` for a stochastic model.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    y: integer labels ``[B]``.
    key: PRNG key; only needed for an :class:`EOT` model.
    eps: l-inf radius in [0, 1] pixel units; scalar or per example ``[B]``; may be traced.
    target: optional target labels ``[B]`` (targeted attack).
    loss: ``"ce"`` (default), ``"margin"``, ``"dlr"`` or ``loss(logits, y, target) -> [B]``.

  Returns:
    Adversarial images ``[B, H, W, C]`` with ``|x' - x|_inf <= eps`` and values in [0, 1].

  Raises:
    ValueError / TypeError: bad images, labels, eps, loss, or a model that does not
      map ``[B, H, W, C]`` to ``[B, K]``.
    ValueError: an untraced call where the model produced non-finite (NaN / inf)
      logits, loss or gradient for some examples (the message gives how many and
      which).  Traced (``jit`` / ``vmap``), nothing is raised and those examples stop
      at the iterate where it happened, inside the ball and [0, 1].
  """
  return _projected_ascent("fgsm", logits_fn, x, y, key=key, eps=eps, step_size=eps,
                           steps=1, norm="linf", start=None, restarts=1, target=target,
                           loss=loss)


def ifgsm(logits_fn: Callable, x: Array, y: Array, *, key: Optional[Array] = None,
          eps: Any, step_size: Any = None, steps: int = 20,
          target: Optional[Array] = None, loss: Union[str, Callable] = "ce") -> Array:
  """Iterative FGSM (BIM): FGSM steps from the clean image, clipped to the eps-ball.

  ``x_{m+1} = Clip_{x, eps}(x_m + alpha sign(grad L(x_m, y)))`` with ``x_0 = x`` (no random
  start).  Reference: Kurakin, Goodfellow & Bengio, "Adversarial Examples in the
  Physical World", 2017; EnResNet eq. 12 (IFGSM-20: 20 steps, alpha = 2/255, eps = 8/255).

  Args:
    logits_fn: model ``f(x) -> logits [B, K]``, or ``eot(f, n)``.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    y: integer labels ``[B]``.
    key: PRNG key; only needed for an :class:`EOT` model.
    eps: l-inf radius (scalar or ``[B]``, may be traced).
    step_size: alpha; default ``2.5 * eps / steps``.
    steps: number of iterations (static Python int, >= 1).  Default 20.
    target: optional target labels ``[B]``.
    loss: ``"ce"``, ``"margin"``, ``"dlr"`` or a callable.

  Returns:
    Adversarial images ``[B, H, W, C]`` inside the eps-ball and [0, 1].

  Raises:
    ValueError / TypeError: bad images, labels, eps, step size or steps.
    ValueError: an untraced call where the model produced non-finite (NaN / inf)
      logits, loss or gradient for some examples (the message gives how many and
      which).  Traced (``jit`` / ``vmap``), nothing is raised and those examples stop
      at the iterate where it happened, inside the ball and [0, 1].
  """
  return _projected_ascent("ifgsm", logits_fn, x, y, key=key, eps=eps,
                           step_size=step_size, steps=steps, norm="linf", start=None,
                           restarts=1, target=target, loss=loss)


def pgd(logits_fn: Callable, x: Array, y: Array, *, key: Array, eps: Any,
        step_size: Any = None, steps: int = 20, norm: str = "linf",
        random_start: bool = True, restarts: int = 1, target: Optional[Array] = None,
        loss: Union[str, Callable] = "ce") -> Array:
  """Projected Gradient Descent with a uniform random start and restarts.

  Each restart starts uniformly in the eps-ball (l-inf) or l2 ball, takes ``steps``
  steepest-ascent steps (``sign(g)`` for l-inf, ``g / ||g||_2`` for l2) and projects back
  onto the ball ∩ [0, 1].  Over restarts each example keeps its worst case: a point that
  fools the model (or hits ``target``), else the one with the highest loss.  Restart
  ``r`` uses ``fold_in(key, r)``.

  Reference: Madry et al., "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018.

  Args:
    logits_fn: model ``f(x) -> logits [B, K]``, or ``eot(f, n)``.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    y: integer labels ``[B]``.
    key: PRNG key (random start, restarts, EOT draws).
    eps: radius (scalar or ``[B]``, may be traced); l-inf in [0, 1] or l2 in
      ``[0, sqrt(H W C)]``.
    step_size: step length; default ``2.5 * eps / steps``.
    steps: iterations per restart (static, >= 1).  Default 20.
    norm: ``"linf"`` (default) or ``"l2"``.
    random_start: start from a uniform point in the ball (default) or from ``x``.
    restarts: number of restarts (static, >= 1).
    target: optional target labels ``[B]``.
    loss: ``"ce"``, ``"margin"``, ``"dlr"`` or a callable.

  Returns:
    Adversarial images ``[B, H, W, C]`` inside the ball and [0, 1].

  Raises:
    ValueError / TypeError: bad images, labels, eps, norm, steps, restarts or key.
    ValueError: an untraced call where the model produced non-finite (NaN / inf)
      logits, loss or gradient for some examples (the message gives how many and
      which).  Traced (``jit`` / ``vmap``), nothing is raised and those examples stop
      at the iterate where it happened, inside the ball and [0, 1].
  """
  return _projected_ascent("pgd", logits_fn, x, y, key=key, eps=eps, step_size=step_size,
                           steps=steps, norm=norm,
                           start="uniform" if random_start else None, restarts=restarts,
                           target=target, loss=loss, key_required=True)


def mifgsm(logits_fn: Callable, x: Array, y: Array, *, key: Optional[Array] = None,
           eps: Any, steps: int = 20, mu: Any = 0.8, step_size: Any = None,
           target: Optional[Array] = None, loss: Union[str, Callable] = "ce") -> Array:
  """Momentum Iterative FGSM.

  ``g_{t+1} = mu g_t + grad / ||grad||_1``, ``x_{t+1} = Clip_{x, eps}(x_t + alpha sign(g_{t+1}))``
  from ``x_0 = x``.  Reference: Dong et al., "Boosting Adversarial Attacks with
  Momentum", CVPR 2018.  Defaults follow DiffAI's evaluation (mu = 0.8, 20 iterations);
  alpha defaults to ``eps / steps`` as in Dong et al.

  Args:
    logits_fn: model ``f(x) -> logits [B, K]``, or ``eot(f, n)``.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    y: integer labels ``[B]``.
    key: PRNG key; only needed for an :class:`EOT` model.
    eps: l-inf radius (scalar or ``[B]``, may be traced).
    steps: iterations (static, >= 1).  Default 20.
    mu: momentum decay (>= 0; scalar or ``[B]``, may be traced).  Default 0.8.
    step_size: alpha; default ``eps / steps``.
    target: optional target labels ``[B]``.
    loss: ``"ce"``, ``"margin"``, ``"dlr"`` or a callable.

  Returns:
    Adversarial images ``[B, H, W, C]`` inside the eps-ball and [0, 1].

  Raises:
    ValueError / TypeError: bad images, labels, eps, mu, step size or steps.
    ValueError: an untraced call where the model produced non-finite (NaN / inf)
      logits, loss or gradient for some examples (the message gives how many and
      which).  Traced (``jit`` / ``vmap``), nothing is raised and those examples stop
      at the iterate where it happened, inside the ball and [0, 1].
  """
  return _projected_ascent("mifgsm", logits_fn, x, y, key=key, eps=eps,
                           step_size=step_size, steps=steps, norm="linf", start=None,
                           restarts=1, target=target, loss=loss, mu=mu)
