"""Builders from a config: step rule, model, objective, learning-rate schedule, optimizer."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import optax

from jaxdefense import _checks
from jaxdefense import data as _data
from jaxdefense import dynamics
from jaxdefense import models

__all__ = ["build_step", "build_model", "build_objective", "build_schedule",
           "build_optimizer"]

def build_step(spec: Mapping[str, Any] | ml_collections.ConfigDict, base: Any = None) -> Any:
  """A residual step rule from a config spec ``{"name": ..., **fields}``.

  The encoding is :func:`jaxdefense.dynamics.step_from_dict` (defaults from the rule
  itself; ``base`` is a rule that the spec completes).

  Raises:
    ValueError: unknown rule name or a field the rule does not take.
  """
  return dynamics.step_from_dict(spec, base=base)


def _step_given(spec: Mapping[str, Any]) -> bool:
  return spec.get("name") is not None or any(k != "name" for k in spec)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
  """The model of ``config.model`` (and ``config.ensemble``) for ``num_classes`` classes.

  ``model.normalize=True`` adds the data set's per-channel normalisation
  (``jaxdefense.data.channel_stats(config.dataset)``); every key of ``config.model``
  other than ``name``, ``normalize`` and ``step`` is a model override.

  The step rule: a preset that carries its own rule (the ``en*_`` / ``swe*_`` EnResNet
  presets) keeps it; ``model.step`` fields without a name, or with that rule's name,
  change its fields (``model.step.coef=0.2``), and a different rule name is an error.
  A preset with the default ``Euler`` rule takes whatever ``model.step`` names.  So
  the config route and ``jaxdefense.models.create(name, ...)`` build the same model.

  Returns:
    An unbound ``flax.linen.Module``; a ``jaxdefense.models.Ensemble`` when
    ``ensemble.size > 1``.

  Raises:
    ValueError: unknown model, an override the model does not take, a step rule the
      model cannot take (no residual step, or a preset with its own different rule), a
      ``model.num_classes`` that differs from the data set's, a bad ensemble size, or
      ``ensemble.size > 1`` on a preset that is already an ensemble.
  """
  spec = _checks.plain_value(config.model)
  name = spec.pop("name")
  normalize = spec.pop("normalize", False)
  step_spec = dict(spec.pop("step", None) or {})
  if "num_classes" in spec and spec["num_classes"] != num_classes:
    raise ValueError(f"model.num_classes={spec['num_classes']} but data set "
                     f"{config.dataset!r} has {num_classes} classes.")
  spec["num_classes"] = num_classes
  if normalize:
    spec["normalize"] = _data.channel_stats(config.dataset)
  model = models.create(name, **spec)
  if _step_given(step_spec):
    own = models.step_of(model)
    if own is None:
      step = build_step(step_spec, base=dynamics.Euler())
      if not isinstance(step, dynamics.Euler):
        raise ValueError(f"model {name!r} has no residual step, so model.step.name="
                         f"{step_spec.get('name')!r} cannot apply; use a residual model "
                         f"(e.g. resnet8, preact_resnet20) or leave model.step unset.")
    else:
      wanted = step_spec.get("name")
      if (wanted is not None and own != dynamics.Euler()
          and wanted != dynamics.step_name(own)):
        raise ValueError(
            f"model {name!r} carries its own step rule {own!r}, but the config names "
            f"model.step.name={wanted!r}; leave model.step.name unset (or set it to "
            f"{dynamics.step_name(own)!r}) to change that rule's fields, or pick a "
            f"model without its own rule.")
      base = own if wanted is None or wanted == dynamics.step_name(own) else None
      model = models.with_step(model, build_step(step_spec, base=base))
  size = _checks.check_int(config.ensemble.size, "ensemble.size", minimum=1)
  if size > 1:
    if isinstance(model, models.Ensemble):
      raise ValueError(f"model {name!r} is already an ensemble of {model.size}; "
                       f"ensemble.size={size} would nest a second one (leave "
                       f"ensemble.size=1, or use the plain base network).")
    model = models.Ensemble(member=model, size=size, shared=bool(config.ensemble.shared))
  return model


def build_objective(spec: ml_collections.ConfigDict) -> Any:
  """The training objective named by ``config.objective``.

  Delegates to :func:`jaxdefense.objectives.from_config` (``name`` plus keyword
  fields, e.g. ``{"name": "pgd", "eps": 8/255}``).

  Raises:
    ValueError: an unknown objective name or option.
  """
  from jaxdefense import objectives  # pylint: disable=import-outside-toplevel
  return objectives.from_config(spec)


def build_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step.

  * ``constant``: ``learning_rate``.
  * ``piecewise``: ``learning_rate * factor ** k`` after the ``k``-th epoch milestone
    (PyTorch ``MultiStepLR``), milestones in epochs, applied at
    ``milestone * steps_per_epoch`` steps.
  * ``cosine``: from ``learning_rate`` down to ``final_factor * learning_rate`` over
    the run (after warm-up).

  ``warmup_epochs > 0`` prepends a linear ramp from 0.

  Raises:
    ValueError: unknown schedule name, negative or unsorted milestones.
  """
  s = config.schedule
  lr = _checks.check_float(config.optimizer.learning_rate, "optimizer.learning_rate",
                           minimum=0.0)
  name = _checks.check_choice(s.name, "schedule.name", ("constant", "piecewise", "cosine"))
  warmup = int(round(_checks.check_float(s.warmup_epochs, "schedule.warmup_epochs",
                                         minimum=0.0) * steps_per_epoch))
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "piecewise":
    milestones = tuple(s.milestones)
    if any(not isinstance(m, (int, float)) or m < 0 for m in milestones) or \
        list(milestones) != sorted(milestones):
      raise ValueError(f"schedule.milestones must be increasing non-negative epochs; got "
                       f"{milestones}.")
    factor = _checks.check_float(s.factor, "schedule.factor", minimum=0.0)
    boundaries: dict[int, float] = {}
    for m in milestones:
      b = int(round(m * steps_per_epoch)) - warmup
      boundaries[b] = boundaries.get(b, 1.0) * factor
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    final = _checks.check_float(s.final_factor, "schedule.final_factor", minimum=0.0)
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), alpha=final)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def build_optimizer(config: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optax optimizer of ``config.optimizer``.

  * ``sgd``: heavy-ball momentum (``momentum``, ``nesterov``) exactly as PyTorch's
    ``torch.optim.SGD`` with ``dampening=0``: ``b <- momentum * b + g``,
    ``p <- p - lr * b`` (Nesterov: ``p <- p - lr * (g + momentum * b)``).
  * ``adam``: Adam (``b1``, ``b2``, ``eps``).  ``adamw``: Adam with decoupled decay.

  Weight decay (``weight_decay``, on every parameter, as the papers do):

  * ``decoupled_weight_decay=False`` (default): L2 added to the gradient,
    ``g <- g + wd * p``, *before* momentum / Adam moments, as PyTorch's SGD and Adam
    ``weight_decay`` do; the papers' 5e-4 is this kind.
  * ``True``: decoupled (SGDW / AdamW), ``p <- p - lr * (update + wd * p)``, with the
    decay scaled by the current learning rate.

  ``grad_clip_norm > 0`` clips the global gradient norm first.

  Raises:
    ValueError: unknown optimizer name or out-of-range hyper-parameters.
  """
  o = config.optimizer
  name = _checks.check_choice(o.name, "optimizer.name", ("sgd", "adam", "adamw"))
  wd = _checks.check_float(o.weight_decay, "optimizer.weight_decay", minimum=0.0)
  clip = _checks.check_float(o.grad_clip_norm, "optimizer.grad_clip_norm", minimum=0.0)
  decoupled = bool(o.decoupled_weight_decay) or name == "adamw"
  chain = []
  if clip > 0:
    chain.append(optax.clip_by_global_norm(clip))
  if wd > 0 and not decoupled:
    chain.append(optax.add_decayed_weights(wd))
  if name == "sgd":
    momentum = _checks.check_float(o.momentum, "optimizer.momentum", minimum=0.0,
                                   maximum=1.0)
    if momentum > 0:
      chain.append(optax.trace(decay=momentum, nesterov=bool(o.nesterov)))
  else:
    chain.append(optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps)))
  if wd > 0 and decoupled:
    chain.append(optax.add_decayed_weights(wd))
  chain.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*chain)


def learning_rate_at(schedule: optax.Schedule, step: int) -> float:
  """The learning rate of ``schedule`` at ``step`` as a Python float (host only).

  The schedule runs as one compiled program per schedule: evaluated op by op, an optax
  cosine or warm-up schedule dispatches half a dozen tiny programs, each compiled (or
  loaded from the persistent cache) on a run's first log line.
  """
  try:
    fn = _COMPILED_SCHEDULES.get(schedule)
    if fn is None:
      fn = _COMPILED_SCHEDULES.setdefault(schedule, jax.jit(schedule))
  except TypeError:   # a callable that takes no weak reference (nor jit): run as it is
    fn = schedule
  return float(jax.device_get(fn(np.int32(step))))


#: ``schedule -> jax.jit(schedule)`` (weak keys: a schedule's program lives as long as
#: the schedule does).
_COMPILED_SCHEDULES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
