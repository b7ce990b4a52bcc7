"""Training objectives: natural cross-entropy, PGD adversarial training and TRADES.

An *objective* is a frozen (hence hashable, ``jit``-static) dataclass called as

    ``loss, aux = objective(logits_fn, x, y, key)``

with ``logits_fn(x) -> logits [B, K]`` the model in train mode with the current
parameters, ``x`` images ``[B, H, W, C]`` in [0, 1], ``y`` integer labels ``[B]`` and
``key`` a PRNG key.  ``loss`` is a scalar to minimise; ``aux`` is a dict of arrays that
always holds ``"logits"``, the logits of the examples the loss trains on (for accuracy
metrics).  Objectives are pure functions, differentiable in the parameters that
``logits_fn`` closes over.

Inner maximisations run on a copy of the model whose closed-over arrays (the
parameters) go through ``jax.lax.stop_gradient`` (found with ``jax.closure_convert``),
and the adversarial images are ``stop_gradient``-ed too: parameter gradients flow only
through the outer loss, and ``jax.grad`` never differentiates through the attack loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp

from jaxdefense import _checks
from jaxdefense import attacks

Array = jax.Array


class Objective(Protocol):
  """What the training loop calls: ``(loss scalar, aux dict with "logits")``."""

  def __call__(self, logits_fn: Callable[[Array], Array], x: Array, y: Array,
               key: Array) -> tuple[Array, dict[str, Array]]:
    ...


def frozen(logits_fn: Callable[[Array], Array], x: Array) -> Callable[[Array], Array]:
  """``logits_fn`` with every closed-over (possibly differentiated) array stop-gradient-ed.

  Used for inner maximisations: the attack then sees the parameters as constants, so an
  outer ``jax.grad`` w.r.t. the parameters does not trace tangents through the attack.
  """
  converted, consts = jax.closure_convert(logits_fn, x)
  consts = [jax.lax.stop_gradient(c) for c in consts]
  return lambda z: converted(z, *consts)


def _mean_ce(logits: Array, y: Array) -> Array:
  return jnp.mean(attacks.cross_entropy(logits, y))


def _kl_one(log_p: Array, log_q: Array) -> Array:
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


def kl_divergence(logits_p: Array, logits_q: Array) -> Array:
  """Per-example ``KL(softmax(logits_p) || softmax(logits_q))``, ``[B]``."""
  return jax.vmap(_kl_one)(jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q))


def _check_batch(x: Any, y: Any) -> None:
  _checks.check_images(x, "x")
  _checks.check_labels(y, None, "y", batch=x.shape[0])


def _validate_pgd_fields(obj: Any) -> None:
  """Normalise and check ``eps``, ``step_size`` and ``steps`` of an objective."""
  name = type(obj).__name__
  eps = _checks.check_float(obj.eps, f"{name}.eps", minimum=0.0)
  _checks.check_eps(eps, f"{name}.eps")
  object.__setattr__(obj, "eps", eps)
  object.__setattr__(obj, "step_size",
                     _checks.check_float(obj.step_size, f"{name}.step_size", minimum=0.0))
  object.__setattr__(obj, "steps", _checks.check_int(obj.steps, f"{name}.steps", minimum=1))


@dataclasses.dataclass(frozen=True)
class Natural:
  """Natural training: mean softmax cross-entropy on clean images.

  Returns ``(loss, {"logits": clean logits})``.
  """

  def __call__(self, logits_fn: Callable[[Array], Array], x: Array, y: Array,
               key: Optional[Array] = None, *,
               attack_logits_fn: Optional[Callable] = None) -> tuple[Array, dict]:
    """Loss and aux for one batch; ``key`` and ``attack_logits_fn`` are unused."""
    del key, attack_logits_fn
    _check_batch(x, y)
    logits = logits_fn(x)
    loss = _mean_ce(logits, y)
    return loss, {"logits": logits, "loss_clean": loss}


@dataclasses.dataclass(frozen=True)
class PGDAdversarial:
  """PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to
  Adversarial Attacks", ICLR 2018).

  ``loss = (1 - mix) * CE(f(x_adv), y) + mix * CE(f(x), y)`` where ``x_adv`` is an l-inf
  PGD attack (``steps`` steps of ``step_size``, uniform random start) on the current
  model.  ``mix = 0`` is Madry's objective; EnResNet and LAD train with eps = 8/255, 10
  steps of 2/255.  The clean and adversarial batches go through ``logits_fn`` in
  separate calls (so train-mode batch norm sees them separately).

  Attributes:
    eps: l-inf radius in [0, 1].  Default 8/255.
    step_size: PGD step.  Default 2/255.
    steps: PGD iterations (>= 1).  Default 10.
    random_start: uniform start in the ball.  Default True.
    mix: weight of the clean loss in [0, 1].  Default 0.

  Raises:
    ValueError / TypeError (at construction): a field out of range or of the wrong type.
  """

  eps: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 10
  random_start: bool = True
  mix: float = 0.0

  def __post_init__(self):
    _validate_pgd_fields(self)
    if not isinstance(self.random_start, (bool, int)):
      raise TypeError(f"PGDAdversarial.random_start must be a bool; got {self.random_start!r}.")
    object.__setattr__(self, "random_start", bool(self.random_start))
    object.__setattr__(self, "mix", _checks.check_float(self.mix, "PGDAdversarial.mix",
                                                        minimum=0.0, maximum=1.0))

  def __call__(self, logits_fn: Callable[[Array], Array], x: Array, y: Array,
               key: Array, *,
               attack_logits_fn: Optional[Callable] = None) -> tuple[Array, dict]:
    """Loss and aux for one batch.

    Args:
      logits_fn: train-mode model ``f(x) -> logits [B, K]`` with the current parameters.
      x: clean images ``[B, H, W, C]`` in [0, 1].
      y: integer labels ``[B]``.
      key: PRNG key for the random start.
      attack_logits_fn: optional model used for the inner attack (e.g. eval-mode batch
        norm, as in the reference TRADES / Madry code); defaults to ``logits_fn``.

    Returns:
      ``(loss, aux)`` with ``aux["logits"]`` the adversarial logits, plus
      ``"loss_adv"`` and, when ``mix > 0``, ``"clean_logits"`` and ``"loss_clean"``.
    """
    _check_batch(x, y)
    attack_fn = frozen(attack_logits_fn or logits_fn, x)
    x_adv = attacks.pgd(attack_fn, x, y, key=key, eps=self.eps, step_size=self.step_size,
                        steps=self.steps, random_start=self.random_start)
    x_adv = jax.lax.stop_gradient(x_adv)
    logits_adv = logits_fn(x_adv)
    loss_adv = _mean_ce(logits_adv, y)
    aux = {"logits": logits_adv, "loss_adv": loss_adv}
    if self.mix == 0.0:
      return loss_adv, aux
    logits_clean = logits_fn(x)
    loss_clean = _mean_ce(logits_clean, y)
    aux.update(clean_logits=logits_clean, loss_clean=loss_clean)
    return (1.0 - self.mix) * loss_adv + self.mix * loss_clean, aux


@dataclasses.dataclass(frozen=True)
class TRADES:
  """TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and
  Accuracy", ICML 2019).

  ``loss = CE(f(x), y) + beta * mean_b KL(softmax(f(x)) || softmax(f(x_adv)))`` where the
  inner maximisation starts at ``x + 0.001 N(0, I)`` (projected onto the ball and [0, 1])
  and takes ``steps`` l-inf sign steps of ``step_size`` on ``KL(p_clean || p(x'))``, with
  ``p_clean`` fixed, as the reference code does.  Gradients of the outer loss flow
  through both the clean and the adversarial logits.

  Attributes:
    beta: trade-off weight (>= 0).  Default 6.0 (the paper's CIFAR-10 value).
    eps: l-inf radius.  Default 8/255 (the paper uses 0.031).
    step_size: inner step.  Default 2/255 (the paper uses 0.007).
    steps: inner iterations (>= 1).  Default 10.
    init_std: standard deviation of the Gaussian start.  Default 0.001.

  Raises:
    ValueError / TypeError (at construction): a field out of range or of the wrong type.
  """

  beta: float = 6.0
  eps: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 10
  init_std: float = 0.001

  def __post_init__(self):
    _validate_pgd_fields(self)
    object.__setattr__(self, "beta", _checks.check_float(self.beta, "TRADES.beta",
                                                         minimum=0.0))
    object.__setattr__(self, "init_std", _checks.check_float(self.init_std,
                                                             "TRADES.init_std",
                                                             minimum=0.0))

  def __call__(self, logits_fn: Callable[[Array], Array], x: Array, y: Array,
               key: Array, *,
               attack_logits_fn: Optional[Callable] = None) -> tuple[Array, dict]:
    """Loss and aux for one batch (arguments as :meth:`PGDAdversarial.__call__`).

    Returns:
      ``(loss, aux)`` with ``aux["logits"]`` the clean logits, ``"adv_logits"``,
      ``"loss_clean"`` (CE) and ``"loss_robust"`` (the mean KL term).
    """
    _check_batch(x, y)
    x = jnp.asarray(x)
    attack_fn = frozen(attack_logits_fn or logits_fn, x)
    clean_for_attack = jax.lax.stop_gradient(attack_fn(x))
    kl_to_clean = lambda z: kl_divergence(clean_for_attack, z)
    project = attacks.make_projection("linf", x, self.eps)
    k_start, k_loop = jax.random.split(key)
    x0 = attacks.random_start(k_start, x, self.eps, "linf", kind="normal",
                              scale=self.init_std)
    vg = attacks.make_value_and_grad(attack_fn, kl_to_clean)
    rule = attacks.sign_ascent(self.step_size, project, "linf")
    x_adv, _ = attacks.ascent_loop(vg, rule, x0, self.steps, k_loop)
    x_adv = jax.lax.stop_gradient(x_adv)

    logits_clean = logits_fn(x)
    logits_adv = logits_fn(x_adv)
    loss_clean = _mean_ce(logits_clean, y)
    loss_robust = jnp.mean(kl_divergence(logits_clean, logits_adv))
    aux = {"logits": logits_clean, "adv_logits": logits_adv, "loss_clean": loss_clean,
           "loss_robust": loss_robust}
    return loss_clean + self.beta * loss_robust, aux
