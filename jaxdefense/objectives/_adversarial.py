"""Training objectives: natural cross-entropy, PGD adversarial training and TRADES.

An *objective* is a frozen (hence hashable, ``jit``-static) dataclass called as

    ``loss, aux = objective(model, x, y, key)``

* ``model`` is a :class:`~jaxdefense.models.ModelFn` in training mode with the current
  parameters (``jaxdefense.models.bind(module, variables, train=True, rngs=...)``, or
  ``ModelFn.wrap(f)`` around a plain ``f(x) -> logits``).  Forward passes call
  ``model.apply(x, key=None) -> (logits [B, K], model_state)``; a pass given its own
  ``key`` draws independent model noise and dropout masks (as two forward calls of a
  PyTorch model do), a pass without one uses the model's default ``rngs`` (the
  training step's).
* ``x``: images ``[B, H, W, C]`` in [0, 1]; ``y``: integer labels ``[B]``; ``key``: a
  PRNG key.

``loss`` is a scalar to minimise; ``aux`` is a dict that always holds ``"logits"``, the
logits of the examples the loss trains on (for accuracy metrics), ``"model_state"``, the
state of the forward pass on the training examples (the adversarial pass for
:class:`PGDAdversarial` and :class:`TRADES`; ``{}`` for a wrapped function), and scalar
loss terms.  Objectives are pure functions, differentiable in the model's variables.

Inner maximisations run on ``model.frozen(...)`` (its variables, or a wrapped
function's closed-over arrays, go through ``jax.lax.stop_gradient``), in evaluation mode
(``model.with_mode(False)``) when ``attack_mode == "eval"``; a stochastic model is
attacked as ``attacks.eot(model, 1)``, one fresh noise draw per attack iteration (as the
EnResNet training code does).  The adversarial images are ``stop_gradient``-ed too:
parameter gradients flow only through the outer loss, and ``jax.grad`` never
differentiates through the attack loop; the attack's own forward passes never
contribute a model state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxdefense import _checks
from jaxdefense import attacks
from jaxdefense.models import ModelFn

Array = jax.Array


class Objective(Protocol):
  """What the training step calls: ``loss, aux = objective(model, x, y, key)``.

  Args (of the call):
    model: the model in training mode (:class:`jaxdefense.models.ModelFn`), with the
      current parameters; ``model.apply(x, key)`` gives ``(logits, state)``.
    x: images ``[B, H, W, C]`` in ``[0, 1]``.
    y: integer labels ``[B]``.
    key: a PRNG key for the objective's own randomness (attacks, noise draws).

  Returns:
    A scalar loss to minimise and an ``aux`` dict holding ``"logits"`` ``[B, K]`` (of
    the examples the loss trains on), ``"model_state"`` (the state of the forward pass
    whose loss is used) and scalar loss terms reported as metrics.
  """

  def __call__(self, model: ModelFn, x: Array, y: Array,
               key: Array) -> tuple[Array, dict[str, Any]]:
    ...


def check_model(model: Any, name: str) -> ModelFn:
  """``model`` if it is a :class:`~jaxdefense.models.ModelFn`, else a clear TypeError."""
  if not isinstance(model, ModelFn):
    raise TypeError(f"{name}: model must be a jaxdefense.models.ModelFn (models.bind(module, "
                    f"variables, train=True) or models.ModelFn.wrap(f)); got "
                    f"{type(model).__name__}.")
  return model


def attack_model(model: ModelFn, x: Array, key: Array, attack_mode: str = "train") -> Any:
  """The model as seen by an inner attack: logits only, variables stop-gradient-ed.

  ``attack_mode == "eval"`` takes the evaluation-mode model (running batch statistics,
  no dropout).  A stochastic model becomes ``attacks.eot(m, 1)`` (one fresh noise draw
  per attack iteration, keys derived from the attack's key); a deterministic one is the
  frozen :class:`~jaxdefense.models.ModelFn` itself.
  """
  m = model.with_mode(False) if attack_mode == "eval" else model
  m = m.frozen(*((x, key) if m.stochastic else (x,)))
  return attacks.eot(m, 1) if m.stochastic else m


_ATTACK_MODES = ("train", "eval")


def _mean_ce(logits: Array, y: Array) -> Array:
  return jnp.mean(attacks.cross_entropy(logits, y))


def _kl_one(log_p: Array, log_q: Array) -> Array:
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


def kl_divergence(logits_p: Array, logits_q: Array) -> Array:
  """Per-example ``KL(softmax(logits_p) || softmax(logits_q))``, as TRADES uses it.

  Args:
    logits_p: logits ``[B, K]`` of the reference distribution (TRADES: clean).
    logits_q: logits ``[B, K]`` of the other distribution (TRADES: adversarial).

  Returns:
    ``[B]`` non-negative divergences (computed from log-softmax, so stable for large
    logits); 0 where the two rows give the same distribution.
  """
  return jax.vmap(_kl_one)(jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q))


def _check_batch(x: Any, y: Any) -> None:
  _checks.check_images(x, "x")
  _checks.check_labels(y, None, "y", batch=x.shape[0])


def _validate_pgd_fields(obj: Any) -> None:
  """Normalise and check ``eps``, ``step_size``, ``steps`` and ``attack_mode``."""
  name = type(obj).__name__
  _checks.check_choice(obj.attack_mode, f"{name}.attack_mode", _ATTACK_MODES)
  eps = _checks.check_float(obj.eps, f"{name}.eps", minimum=0.0)
  _checks.check_eps(eps, f"{name}.eps")
  object.__setattr__(obj, "eps", eps)
  object.__setattr__(obj, "step_size",
                     _checks.check_float(obj.step_size, f"{name}.step_size", minimum=0.0))
  object.__setattr__(obj, "steps", _checks.check_int(obj.steps, f"{name}.steps", minimum=1))


@dataclasses.dataclass(frozen=True)
class Natural:
  """Natural training: mean softmax cross-entropy on clean images.

  Returns ``(loss, {"logits": clean logits, "loss_clean": loss, "model_state": state
  of the clean pass})``.
  """

  def __call__(self, model: ModelFn, x: Array, y: Array,
               key: Array | None = None) -> tuple[Array, dict]:
    """Loss and aux for one batch (``key`` is unused: the pass takes the model's rngs).

    Raises:
      TypeError: ``model`` is not a :class:`~jaxdefense.models.ModelFn`.
      ValueError / TypeError: bad images or labels.
    """
    del key
    check_model(model, "Natural")
    _check_batch(x, y)
    logits, state = model.apply(x)
    loss = _mean_ce(logits, y)
    return loss, {"logits": logits, "loss_clean": loss, "model_state": state}


@dataclasses.dataclass(frozen=True)
class PGDAdversarial:
  """PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to
  Adversarial Attacks", ICLR 2018).

  ``loss = (1 - mix) * CE(f(x_adv), y) + mix * CE(f(x), y)`` where ``x_adv`` is an l-inf
  PGD attack (``steps`` steps of ``step_size``, uniform random start) on the current
  model.  ``mix = 0`` is Madry's objective; EnResNet and LAD train with eps = 8/255, 10
  steps of 2/255.  The clean and adversarial batches go through ``model.apply`` in
  separate calls (so train-mode batch norm sees them separately).

  Attributes:
    eps: l-inf radius in [0, 1].  Default 8/255.
    step_size: PGD step.  Default 2/255.
    steps: PGD iterations (>= 1).  Default 10.
    random_start: uniform start in the ball.  Default True.
    mix: weight of the clean loss in [0, 1].  Default 0.
    attack_mode: the model the inner attack runs on: ``"train"`` (default; batch
      statistics of the batch under attack, as Madry et al.'s and the EnResNet authors'
      code) or ``"eval"`` (``model.with_mode(False)``: running statistics, no dropout).

  Raises:
    ValueError / TypeError (at construction): a field out of range or of the wrong type.
  """

  eps: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 10
  random_start: bool = True
  mix: float = 0.0
  attack_mode: str = "train"

  def __post_init__(self):
    _validate_pgd_fields(self)
    if not isinstance(self.random_start, (bool, int)):
      raise TypeError(f"PGDAdversarial.random_start must be a bool; got {self.random_start!r}.")
    object.__setattr__(self, "random_start", bool(self.random_start))
    object.__setattr__(self, "mix", _checks.check_float(self.mix, "PGDAdversarial.mix",
                                                        minimum=0.0, maximum=1.0))

  def __call__(self, model: ModelFn, x: Array, y: Array,
               key: Array) -> tuple[Array, dict]:
    """Loss and aux for one batch.

    Args:
      model: the training-mode :class:`~jaxdefense.models.ModelFn` with the current
        parameters (see the module docstring).
      x: clean images ``[B, H, W, C]`` in [0, 1].
      y: integer labels ``[B]``.
      key: PRNG key for the random start (and the attack's model noise).

    Returns:
      ``(loss, aux)`` with ``aux["logits"]`` the adversarial logits, ``"loss_adv"``,
      ``"model_state"`` of the adversarial pass and, when ``mix > 0``,
      ``"clean_logits"`` and ``"loss_clean"``.

    Raises:
      TypeError: ``model`` is not a :class:`~jaxdefense.models.ModelFn`.
      ValueError / TypeError: bad images or labels.
    """
    check_model(model, "PGDAdversarial")
    _check_batch(x, y)
    x = jnp.asarray(x)
    return self.outer(model, x, self.attack(model, x, y, key), y, key)

  def attack(self, model: ModelFn, x: Array, y: Array, key: Array) -> Array:
    """The inner maximisation: PGD images (``stop_gradient``-ed) for this batch."""
    inner = attack_model(model, x, key, self.attack_mode)
    x_adv = attacks.pgd(inner, x, y, key=key, eps=self.eps, step_size=self.step_size,
                        steps=self.steps, random_start=self.random_start)
    return jax.lax.stop_gradient(x_adv)

  def outer(self, model: ModelFn, x: Array, x_adv: Array, y: Array, key: Array,
            **model_kwargs: Any) -> tuple[Array, dict]:
    """The outer loss on the adversarial images ``x_adv`` (``model_kwargs``, e.g. LAD's
    ``perturbations``, go to the adversarial pass)."""
    logits_adv, state = model.apply(x_adv, **model_kwargs)
    loss_adv = _mean_ce(logits_adv, y)
    aux = {"logits": logits_adv, "loss_adv": loss_adv, "model_state": state}
    if self.mix == 0.0:
      return loss_adv, aux
    # the clean pass draws its own model noise (the adversarial pass has the step's)
    logits_clean, _ = model.apply(x, jax.random.fold_in(key, 1))
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
    attack_mode: ``"eval"`` (default: the reference code puts the model in eval mode for
      the inner maximisation: ``model.with_mode(False)``) or ``"train"``; see
      :class:`PGDAdversarial`.

  Raises:
    ValueError / TypeError (at construction): a field out of range or of the wrong type.
  """

  beta: float = 6.0
  eps: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 10
  init_std: float = 0.001
  attack_mode: str = "eval"

  def __post_init__(self):
    _validate_pgd_fields(self)
    object.__setattr__(self, "beta", _checks.check_float(self.beta, "TRADES.beta",
                                                         minimum=0.0))
    object.__setattr__(self, "init_std", _checks.check_float(self.init_std,
                                                             "TRADES.init_std",
                                                             minimum=0.0))

  def __call__(self, model: ModelFn, x: Array, y: Array,
               key: Array) -> tuple[Array, dict]:
    """Loss and aux for one batch (arguments as :meth:`PGDAdversarial.__call__`).

    Returns:
      ``(loss, aux)`` with ``aux["logits"]`` the clean logits, ``"adv_logits"``,
      ``"loss_clean"`` (CE), ``"loss_robust"`` (the mean KL term) and
      ``"model_state"`` of the adversarial pass.

    Raises:
      TypeError: ``model`` is not a :class:`~jaxdefense.models.ModelFn`.
      ValueError / TypeError: bad images or labels.
    """
    check_model(model, "TRADES")
    _check_batch(x, y)
    x = jnp.asarray(x)
    return self.outer(model, x, self.attack(model, x, y, key), y, key)

  def attack(self, model: ModelFn, x: Array, y: Array, key: Array) -> Array:
    """The inner maximisation of ``KL(p_clean || p(x'))``: adversarial images
    (``stop_gradient``-ed) for this batch."""
    del y
    k_clean, k_start, k_loop, _ = jax.random.split(key, 4)
    inner = attack_model(model, x, key, self.attack_mode)
    clean_for_attack = jax.lax.stop_gradient(attacks.predict(
        inner, x, key=k_clean if isinstance(inner, attacks.EOT) else None))
    kl_to_clean = lambda z: kl_divergence(clean_for_attack, z)
    project = attacks.make_projection("linf", x, self.eps)
    x0 = attacks.random_start(k_start, x, self.eps, "linf", kind="normal",
                              scale=self.init_std)
    vg = attacks.make_value_and_grad(inner, kl_to_clean)
    rule = attacks.sign_ascent(self.step_size, project, "linf")
    x_adv, _ = attacks.ascent_loop(vg, rule, x0, self.steps,
                                   k_loop if isinstance(inner, attacks.EOT) else None)
    return jax.lax.stop_gradient(x_adv)

  def outer(self, model: ModelFn, x: Array, x_adv: Array, y: Array, key: Array,
            **model_kwargs: Any) -> tuple[Array, dict]:
    """The outer loss (``model_kwargs``, e.g. LAD's ``perturbations``, go to the
    adversarial pass)."""
    k_outer = jax.random.split(key, 4)[3]
    # independent model noise in the two outer passes (the adversarial one has the step's)
    logits_clean, _ = model.apply(x, k_outer)
    logits_adv, state = model.apply(x_adv, **model_kwargs)
    loss_clean = _mean_ce(logits_clean, y)
    loss_robust = jnp.mean(kl_divergence(logits_clean, logits_adv))
    aux = {"logits": logits_clean, "adv_logits": logits_adv, "loss_clean": loss_clean,
           "loss_robust": loss_robust, "model_state": state}
    return loss_clean + self.beta * loss_robust, aux
