"""Training objectives: natural cross-entropy, PGD adversarial training and TRADES.

An *objective* is a frozen (hence hashable, ``jit``-static) dataclass called as

    ``loss, aux = objective(apply_fn, x, y, key)``

* ``apply_fn`` runs the model in train mode with the current parameters.  Two forms are
  accepted: ``apply_fn(x) -> logits [B, K]`` (a plain logits function), or the training
  loop's ``apply_fn(x, *, key=None) -> (logits, model_state)``, whose ``model_state``
  (e.g. updated batch statistics) is passed on as ``aux["model_state"]`` and whose
  ``key`` gives the model fresh noise (stochastic nets such as EnResNet).
* ``x``: images ``[B, H, W, C]`` in [0, 1]; ``y``: integer labels ``[B]``; ``key``: a
  PRNG key.

``loss`` is a scalar to minimise; ``aux`` is a dict that always holds ``"logits"``, the
logits of the examples the loss trains on (for accuracy metrics), ``"model_state"``
when ``apply_fn`` returns one (the state of the forward pass on the training examples:
the adversarial pass for :class:`PGDAdversarial` and :class:`TRADES`), and scalar loss
terms.  Objectives are pure functions, differentiable in the parameters that
``apply_fn`` closes over.

Inner maximisations run on a copy of the model whose closed-over arrays (the
parameters) go through ``jax.lax.stop_gradient`` (found with ``jax.closure_convert``),
and the adversarial images are ``stop_gradient``-ed too: parameter gradients flow only
through the outer loss, and ``jax.grad`` never differentiates through the attack loop.
When ``apply_fn`` takes a ``key``, every attack iteration draws fresh model noise (as
the EnResNet training code does); the attack's own forward passes never contribute a
model state.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp

from jaxdefense import _checks
from jaxdefense import attacks

Array = jax.Array


class Objective(Protocol):
  """What the training loop calls: ``(loss scalar, aux dict with "logits")``."""

  def __call__(self, apply_fn: Callable[..., Any], x: Array, y: Array,
               key: Array) -> tuple[Array, dict[str, Any]]:
    ...


def frozen(fn: Callable[..., Any], *example_args: Any) -> Callable[..., Any]:
  """``fn`` with every closed-over (possibly differentiated) array stop-gradient-ed.

  Used for inner maximisations: the attack then sees the parameters as constants, so an
  outer ``jax.grad`` w.r.t. the parameters does not trace tangents through the attack.
  ``example_args`` fix the argument types (as for ``jax.closure_convert``).
  """
  converted, consts = jax.closure_convert(fn, *example_args)
  consts = [jax.lax.stop_gradient(c) for c in consts]
  return lambda *args: converted(*args, *consts)


def split_output(out: Any) -> tuple[Array, Any]:
  """``(logits, model_state or None)`` from either form of ``apply_fn``'s output."""
  if isinstance(out, tuple) and len(out) == 2:
    return out[0], out[1]
  return out, None


def _takes_key(fn: Callable[..., Any]) -> bool:
  """Whether ``fn`` accepts a ``key=`` keyword (the training loop's ``apply_fn``)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return "key" in params and params["key"].kind in (inspect.Parameter.KEYWORD_ONLY,
                                                    inspect.Parameter.POSITIONAL_OR_KEYWORD)


def attack_model(apply_fn: Callable[..., Any], x: Array, key: Array) -> Callable[..., Any]:
  """The model as seen by an inner attack: logits only, parameters stop-gradient-ed.

  A ``key``-taking ``apply_fn`` becomes ``attacks.eot(f, 1)`` (one fresh noise draw per
  attack iteration, keys derived from the attack's key); otherwise a plain
  ``f(x) -> logits``.
  """
  if _takes_key(apply_fn):
    f = frozen(lambda z, k: split_output(apply_fn(z, key=k))[0], x, key)
    return attacks.eot(f, 1)
  return frozen(lambda z: split_output(apply_fn(z))[0], x)


def forward(apply_fn: Callable[..., Any], x: Array,
            key: Optional[Array] = None) -> tuple[Array, Any]:
  """``(logits, model_state or None)`` of ``apply_fn(x)``, with its own noise draw.

  A ``key``-taking ``apply_fn`` gets ``key=key`` (when given), so two forward passes of
  one objective draw independent model noise and dropout masks, as two forward calls
  of a PyTorch model do; a plain ``f(x)`` is called as it is.
  """
  if key is not None and _takes_key(apply_fn):
    return split_output(apply_fn(x, key=key))
  return split_output(apply_fn(x))


_ATTACK_MODES = ("train", "eval")


def _with_state(aux: dict, state: Any) -> dict:
  if state is not None:
    aux["model_state"] = state
  return aux


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

  Returns ``(loss, {"logits": clean logits, "loss_clean": loss})`` (plus
  ``"model_state"`` of the clean pass when ``apply_fn`` returns one).
  """

  def __call__(self, apply_fn: Callable[..., Any], x: Array, y: Array,
               key: Optional[Array] = None, *,
               attack_logits_fn: Optional[Callable] = None) -> tuple[Array, dict]:
    """Loss and aux for one batch; ``key`` and ``attack_logits_fn`` are unused."""
    del key, attack_logits_fn
    _check_batch(x, y)
    logits, state = split_output(apply_fn(x))
    loss = _mean_ce(logits, y)
    return loss, _with_state({"logits": logits, "loss_clean": loss}, state)


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
    attack_mode: the model the inner attack runs on in the training loop: ``"train"``
      (default; batch statistics of the batch under attack, as Madry et al.'s and the
      EnResNet authors' code) or ``"eval"`` (running statistics, no dropout).  The
      training loop passes the matching ``attack_logits_fn``; called directly, the
      objective uses the ``attack_logits_fn`` it is given, else ``apply_fn``.

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

  def __call__(self, apply_fn: Callable[..., Any], x: Array, y: Array,
               key: Array, *,
               attack_logits_fn: Optional[Callable] = None) -> tuple[Array, dict]:
    """Loss and aux for one batch.

    Args:
      apply_fn: train-mode model with the current parameters, ``f(x) -> logits [B, K]``
        or ``f(x, *, key=None) -> (logits, model_state)`` (see the module docstring).
      x: clean images ``[B, H, W, C]`` in [0, 1].
      y: integer labels ``[B]``.
      key: PRNG key for the random start (and the attack's model noise).
      attack_logits_fn: optional model used for the inner attack (e.g. eval-mode batch
        norm, as in the reference TRADES / Madry code), of either form; defaults to
        ``apply_fn``.

    Returns:
      ``(loss, aux)`` with ``aux["logits"]`` the adversarial logits, ``"loss_adv"``,
      ``"model_state"`` of the adversarial pass (if any) and, when ``mix > 0``,
      ``"clean_logits"`` and ``"loss_clean"``.
    """
    _check_batch(x, y)
    x = jnp.asarray(x)
    model = attack_model(attack_logits_fn or apply_fn, x, key)
    x_adv = attacks.pgd(model, x, y, key=key, eps=self.eps, step_size=self.step_size,
                        steps=self.steps, random_start=self.random_start)
    x_adv = jax.lax.stop_gradient(x_adv)
    logits_adv, state = split_output(apply_fn(x_adv))
    loss_adv = _mean_ce(logits_adv, y)
    aux = _with_state({"logits": logits_adv, "loss_adv": loss_adv}, state)
    if self.mix == 0.0:
      return loss_adv, aux
    # the clean pass draws its own model noise (the adversarial pass has the step's)
    logits_clean, _ = forward(apply_fn, x, jax.random.fold_in(key, 1))
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
      the inner maximisation) or ``"train"``; see :class:`PGDAdversarial`.

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

  def __call__(self, apply_fn: Callable[..., Any], x: Array, y: Array,
               key: Array, *,
               attack_logits_fn: Optional[Callable] = None) -> tuple[Array, dict]:
    """Loss and aux for one batch (arguments as :meth:`PGDAdversarial.__call__`).

    Returns:
      ``(loss, aux)`` with ``aux["logits"]`` the clean logits, ``"adv_logits"``,
      ``"loss_clean"`` (CE), ``"loss_robust"`` (the mean KL term) and
      ``"model_state"`` of the adversarial pass (if ``apply_fn`` returns one).
    """
    _check_batch(x, y)
    x = jnp.asarray(x)
    k_clean, k_start, k_loop, k_outer = jax.random.split(key, 4)
    model = attack_model(attack_logits_fn or apply_fn, x, key)
    clean_for_attack = jax.lax.stop_gradient(attacks.predict(
        model, x, key=k_clean if isinstance(model, attacks.EOT) else None))
    kl_to_clean = lambda z: kl_divergence(clean_for_attack, z)
    project = attacks.make_projection("linf", x, self.eps)
    x0 = attacks.random_start(k_start, x, self.eps, "linf", kind="normal",
                              scale=self.init_std)
    vg = attacks.make_value_and_grad(model, kl_to_clean)
    rule = attacks.sign_ascent(self.step_size, project, "linf")
    x_adv, _ = attacks.ascent_loop(vg, rule, x0, self.steps,
                                   k_loop if isinstance(model, attacks.EOT) else None)
    x_adv = jax.lax.stop_gradient(x_adv)

    # independent model noise in the two outer passes (the adversarial one has the step's)
    logits_clean, _ = forward(apply_fn, x, k_outer)
    logits_adv, state = split_output(apply_fn(x_adv))
    loss_clean = _mean_ce(logits_clean, y)
    loss_robust = jnp.mean(kl_divergence(logits_clean, logits_adv))
    aux = {"logits": logits_clean, "adv_logits": logits_adv, "loss_clean": loss_clean,
           "loss_robust": loss_robust}
    return loss_clean + self.beta * loss_robust, _with_state(aux, state)
