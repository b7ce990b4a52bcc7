"""LAD: layer-wise adversarial defence by operator splitting (on PGD-AT or TRADES).

The LAD paper (known to us by its introduction; ``shared/papers/NOTES.md`` section 5)
perturbs every hidden state, not only the input, along the back-propagated gradient of
the loss at that state, and reads it as the flow ``dx/dt = f(x, t) + eta a(t)`` with
``a = dL/dx`` the adjoint, split into the residual step and the perturbation step:

* Lie–Trotter (LAD): the perturbation sub-step, then the residual sub-step:
  ``x' = x_n + eta g_n``, ``x_{n+1} = x' + f_n(x')``;
* Strang–Marchuk (LAD-SM): ``x' = x_n + (eta/2) g_n``, ``x'' = x' + f_n(x')``,
  ``x_{n+1} = x'' + (eta/2) g_{n+1}``,

with ``g_n`` the adjoint at ``x_n`` normalised per example.  In terms of the model's
perturbation slots (:mod:`jaxdefense.models._slots`: the stem output ``x_0`` and every
block output ``x_1 .. x_L``): Lie–Trotter adds ``eta g_k`` at ``x_k`` for ``k < L``;
Strang–Marchuk adds ``(eta/2) g_0`` at ``x_0``, ``eta g_k`` at ``x_k`` for
``0 < k < L`` (the half step after block ``k - 1`` and the half step before block ``k``
meet there) and ``(eta/2) g_L`` at ``x_L``.

The literal Lie–Trotter form ``x_{n+1} = x_n + f_n(x_n) + eta g_n`` (NOTES.md) adds the
adjoint at ``x_n`` to ``x_{n+1}``, which has another shape at every stage transition
(stride 2, more channels), so it is not defined for a ResNet; the order above (the
perturbation step first, as Strang–Marchuk's first half) is defined for every block,
and for a block that keeps the shape it differs from the literal form only in that
``f_n`` sees the perturbed state.

The adjoints come from one backward pass: ``jax.grad`` of the base objective's
adversarial loss with respect to zero-valued perturbations at every slot, on the base
objective's adversarial images, with the parameters held constant (``model.frozen``);
they are cut from the parameter gradient, as the inner attack is.  The training loss is
the base objective's outer loss with the perturbations in its adversarial pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from jaxdefense import _checks
from jaxdefense.models import Ensemble, ModelFn
from jaxdefense.objectives._certified import Lin
from jaxdefense.objectives._adversarial import (PGDAdversarial, TRADES, _check_batch,
                                                _mean_ce, check_model, kl_divergence)

Array = jax.Array

SPLITTINGS = ("lie_trotter", "strang_marchuk")
NORMALIZATIONS = ("sign", "l2", "none")
DIRECTIONS = ("ascent", "descent")
_BASES = {"pgd": PGDAdversarial, "trades": TRADES}
_BASE_FIELDS = {"pgd": ("eps", "step_size", "steps", "random_start", "mix", "attack_mode"),
                "trades": ("beta", "eps", "step_size", "steps", "init_std", "attack_mode")}


def _num_blocks(model: ModelFn) -> int:
  module = model.module
  if isinstance(module, Ensemble):
    module = module.member
  n = getattr(module, "num_blocks", None)
  if module is None or n is None:
    what = type(module).__name__ if module is not None else "a wrapped function"
    raise ValueError("LAD needs a model of the zoo with perturbation slots (ResNet, SONet or "
                     f"an Ensemble of them); got {what}.")
  return int(n)


def normalize_adjoint(a: Array, how: str) -> Array:
  """Per-example normalisation of an adjoint ``[B, ...]``: ``sign``, unit ``l2`` norm
  per example, or ``none``."""
  if how == "sign":
    return jnp.sign(a)
  if how == "l2":
    norm = jnp.sqrt(jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1))
    return a / jnp.maximum(norm, 1e-12).reshape((-1,) + (1,) * (a.ndim - 1))
  return a


def place(adjoints: list[Array], eta: float, splitting: str) -> list[Any]:
  """The perturbations at the ``L + 1`` slots from the normalised adjoints ``g_0 .. g_L``
  (see the module docstring)."""
  n = len(adjoints)  # L + 1
  if splitting == "lie_trotter":
    return [eta * g for g in adjoints[:-1]] + [None]
  out = [eta * g for g in adjoints]
  out[0] = 0.5 * eta * adjoints[0]
  out[n - 1] = 0.5 * eta * adjoints[n - 1]
  return out


@dataclasses.dataclass(frozen=True)
class LAD:
  """Layer-wise adversarial training: a base objective with LAD's hidden perturbations.

  Attributes:
    base: ``"pgd"`` (PGD adversarial training) or ``"trades"``.
    eta: perturbation size (>= 0) per hidden state; ``eta = 0`` is the base objective
      exactly.  Default 0.05 (our choice; the introduction gives none: sweep it).
    splitting: ``"lie_trotter"`` (LAD) or ``"strang_marchuk"`` (LAD-SM).
    normalization: ``"sign"`` (default: the l-inf direction, as FGSM), ``"l2"`` (unit
      l2 norm per example and state) or ``"none"`` (the per-example adjoint itself).
    direction: ``"ascent"`` (default: along the adjoint, raising the loss, adversarial)
      or ``"descent"``.
    eta_schedule: ``None`` (constant ``eta``) or a factor of ``eta`` over the fractional
      training epoch: a :class:`~jaxdefense.objectives.Lin` (e.g. ``Lin(0, 1, 0, 5)``
      ramps eta up over five epochs), a mapping ``{"start", "end", "hold", "ramp"}`` of
      one (from a config), or any callable of the epoch; the training loop passes the
      epoch (outside training the schedule's end value is used).
    eps, step_size, steps, random_start, mix, beta, init_std, attack_mode: the base
      objective's fields (``None``: its default); those of the other base are rejected.

  Call: ``loss, aux = LAD(...)(model, x, y, key)`` as the base objective, with
  ``aux["lad_adjoint_norm"]`` (mean l2 norm of the raw adjoints per example) added.

  Raises:
    ValueError: (at construction) ``eta < 0``, an unknown base, splitting,
      normalisation or direction, a field of the other base; (at the call) a model
      without perturbation slots at the stem (e.g. a wrapped function or a DiffAI net).
  """

  base: str = "pgd"
  eta: float = 0.05
  splitting: str = "lie_trotter"
  normalization: str = "sign"
  direction: str = "ascent"
  eps: Any = None
  step_size: Any = None
  steps: Any = None
  random_start: Any = None
  mix: Any = None
  beta: Any = None
  init_std: Any = None
  attack_mode: Any = None
  eta_schedule: Any = None
  base_objective: Any = dataclasses.field(init=False, repr=False, default=None)
  uses_epoch: ClassVar[bool] = True

  def __post_init__(self):
    _checks.check_choice(self.base, "LAD.base", tuple(_BASES))
    object.__setattr__(self, "eta", _checks.check_float(self.eta, "LAD.eta", minimum=0.0))
    _checks.check_choice(self.splitting, "LAD.splitting", SPLITTINGS)
    _checks.check_choice(self.normalization, "LAD.normalization", NORMALIZATIONS)
    _checks.check_choice(self.direction, "LAD.direction", DIRECTIONS)
    given = {f: getattr(self, f) for f in set().union(*_BASE_FIELDS.values())
             if getattr(self, f) is not None}
    wrong = sorted(set(given) - set(_BASE_FIELDS[self.base]))
    if wrong:
      raise ValueError(f"LAD(base={self.base!r}) does not take {wrong}: those are fields "
                       f"of the other base; {self.base!r} takes {list(_BASE_FIELDS[self.base])}.")
    object.__setattr__(self, "base_objective", _BASES[self.base](**given))
    sched = self.eta_schedule
    if isinstance(sched, Mapping) or hasattr(sched, "to_dict"):
      sched = dict(sched.to_dict() if hasattr(sched, "to_dict") else sched)
      unknown = sorted(set(sched) - {"start", "end", "hold", "ramp"})
      if unknown or not {"start", "end"} <= set(sched):
        raise ValueError(f"LAD.eta_schedule as a mapping needs 'start' and 'end' (and "
                         f"optionally 'hold', 'ramp'); got keys {sorted(sched)}.")
      sched = Lin(**sched)
    if sched is not None and not callable(sched):
      raise TypeError(f"LAD.eta_schedule must be None, a Lin, a mapping or a callable of "
                      f"the epoch; got {self.eta_schedule!r}.")
    object.__setattr__(self, "eta_schedule", sched)

  def eta_at(self, epoch: Any = None) -> Any:
    """The perturbation size at fractional ``epoch`` (``eta`` without a schedule)."""
    if self.eta_schedule is None:
      return self.eta
    t = 1e9 if epoch is None else epoch
    return self.eta * jnp.maximum(jnp.asarray(self.eta_schedule(t), jnp.float32), 0.0)

  def adjoints(self, model: ModelFn, x: Array, x_adv: Array, y: Array,
               key: Array) -> list[Array]:
    """``dL/dx_k`` at the ``L + 1`` slots, on ``x_adv``, parameters held constant."""
    n = _num_blocks(model) + 1
    frozen = model.frozen(*((x_adv, key) if model.stochastic else (x_adv,)))
    k_pass = jax.random.fold_in(key, 7) if model.stochastic else None
    out = jax.eval_shape(lambda: frozen.apply(x_adv, k_pass, perturbations=[None] * n,
                                              capture_states=True))[0][1]
    batch = x_adv.shape[0]
    zeros = [jnp.zeros(s.shape[-len(s.shape) + (1 if isinstance(
        model.module, Ensemble) else 0):], s.dtype) for s in out]
    if self.base == "trades":
      clean = jax.lax.stop_gradient(frozen.apply(x, k_pass)[0])

    def loss(deltas):
      logits = frozen.apply(x_adv, k_pass, perturbations=list(deltas))[0]
      if self.base == "trades":
        return jnp.mean(kl_divergence(clean, logits))
      return _mean_ce(logits, y)

    grads = jax.grad(loss)(zeros)
    return [jax.lax.stop_gradient(g * batch) for g in grads]  # per-example adjoints

  def __call__(self, model: ModelFn, x: Array, y: Array, key: Array, *,
               epoch: Any = None) -> tuple[Array, dict]:
    """Loss and aux for one batch (arguments as the base objective's; ``epoch``: the
    fractional training epoch, for ``eta_schedule``)."""
    check_model(model, "LAD")
    _check_batch(x, y)
    x = jnp.asarray(x)
    base = self.base_objective
    x_adv = base.attack(model, x, y, key)
    raw = self.adjoints(model, x, x_adv, y, jax.random.fold_in(key, 3))
    sign = 1.0 if self.direction == "ascent" else -1.0
    g = [sign * normalize_adjoint(a, self.normalization) for a in raw]
    loss, aux = base.outer(model, x, x_adv, y, key,
                           perturbations=place(g, self.eta_at(epoch), self.splitting))
    norms = [jnp.sqrt(jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)) for a in raw]
    aux["lad_adjoint_norm"] = jnp.mean(jnp.stack([jnp.mean(v) for v in norms]))
    if self.eta_schedule is not None:
      aux["lad_eta"] = jnp.asarray(self.eta_at(epoch), jnp.float32)
    return loss, aux
