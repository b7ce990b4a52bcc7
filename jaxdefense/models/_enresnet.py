"""EnResNet presets (Wang, Yuan, Shi & Osher, NeurIPS 2019) and logit integration.

EnResNet is configuration, not code: a registered residual network with the
:class:`~jaxdefense.dynamics.EulerMaruyama` step rule (noise ``coef * std * N(0, I)``
after every residual block, in training and at test time), wrapped in an
:class:`~jaxdefense.models.Ensemble` for ``En_n``.  Registered names, for each base
``B`` in ``preact_resnet20, preact_resnet44, preact_resnet110, wrn34_10``:

* ``en_B``: the noisy net (``En_1 B``, no ensemble wrapper);
* ``en{n}_B`` (n = 1, 2, 5): ``En_n B``, n independently parametrised noisy nets trained
  jointly, logits averaged as in the authors' code (``Ensemble(shared=False)``; the
  paper's Feynman–Kac reading averages softmax probabilities, see ``Ensemble``);
* ``swe{n}_B`` (n = 1, 2, 5): the shared-weights ensemble "n x En_1 B" of the paper's
  Table 7, one parameter set and n noise draws (``Ensemble(shared=True)``);
* ``ens{n}_B`` (n = 2, 5): the baseline ensemble of plain (noise-free) nets.

Every factory takes the base network's overrides (``num_classes``, ``normalize``,
``dropout``...), the step's (``coef``, ``std``, ``at_test``, ``sampler``) and, for ensembles,
``size``.  :func:`average_logits` integrates separately trained models (the paper's
Table 5, e.g. ``En_2 ResNet110 & En_1 WRN-34-10``) into one ``ModelFn``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdefense import _checks
from jaxdefense.dynamics import Euler, EulerMaruyama
from jaxdefense.models._bound import ModelFn
from jaxdefense.models._ensemble import AVERAGES, Ensemble, combine
from jaxdefense.models._registry import create, register

Array = jax.Array

BASES = ("preact_resnet20", "preact_resnet44", "preact_resnet110", "wrn34_10")
_PAPER_NAMES = {"preact_resnet20": "ResNet20", "preact_resnet44": "ResNet44",
                "preact_resnet110": "ResNet110", "wrn34_10": "WideResNet34-10"}


def enresnet(base: str = "preact_resnet20", size: int | None = None, *,
             shared: bool = False, noise: bool = True, coef: float | None = None,
             std: str | None = None, at_test: bool | None = None,
             sampler: str | None = None, **overrides: Any) -> nn.Module:
  """An EnResNet (or a plain ensemble) built from a registered residual network.

  Args:
    base: registered model name of the member network, e.g. ``"preact_resnet20"``
      (the paper's ResNet20), ``"wrn34_10"``, or any model with a ``step`` field.
    size: ensemble size ``n``; ``None`` returns the bare member (no ensemble axis),
      ``1`` an ``Ensemble`` of one (parameters carry a leading axis of length 1).
    shared: shared-weights ensemble ("n x En_1": one parameter set, n noise draws)
      instead of n independently parametrised members.
    noise: Euler–Maruyama (EnResNet) steps; ``False`` gives plain ``Euler`` (ResNet)
      members and then ``coef``/``std``/``at_test`` must not be given.
    coef: noise coefficient ``a >= 0``; default (``None``) 0.1 as in the paper
      (Table 6 scans 0.05-0.8).
    std: noise scale ``"batch"`` (default; the authors' code: std of the whole batch
      tensor), ``"sample"`` (per example) or ``"fixed"`` (``coef`` is the absolute
      sigma).
    at_test: also inject noise when ``train=False``; default True (as the paper).
    sampler: the noise sampler, ``"jax"`` (default, ``jax.random.normal``),
      ``"fast"`` (a fused counter-based hash; see
      :func:`jaxdefense.dynamics.fast_normal`) or ``"rademacher"`` (random signs, the
      simplified weak Euler scheme; see :func:`jaxdefense.dynamics.fast_rademacher`).
    **overrides: fields of the member network (``num_classes=100``, ``normalize=...``,
      ``dropout=...``); a ``step`` override replaces the step rule entirely and then
      ``noise``/``coef``/``std``/``at_test`` must not be given.

  Returns:
    A Flax module; apply it with ``rngs={"noise": key}`` when noise is on.

  Raises:
    ValueError: unknown ``base``, ``size < 1``, bad ``coef``/``std``, a ``step``
      override together with noise arguments, noise arguments with ``noise=False``, an
      override the base does not take.
  """
  given = {k: v for k, v in (("coef", coef), ("std", std), ("at_test", at_test),
                              ("sampler", sampler)) if v is not None}
  if "step" in overrides:
    if given or not noise:
      raise ValueError(f"enresnet got both step={overrides['step']!r} and noise arguments "
                       f"{sorted(given) or ['noise=False']}; pass one or the other.")
    step = overrides.pop("step")
  elif not noise and given:
    raise ValueError(f"noise=False (a plain ensemble) takes no noise arguments; got "
                     f"{sorted(given)}.")
  elif noise:
    step = EulerMaruyama(coef=0.1 if coef is None else coef, std=std or "batch",
                         at_test=True if at_test is None else at_test,
                         sampler=sampler or "jax")
  else:
    step = Euler()
  member = create(base, step=step, **overrides)
  if size is None:
    return member
  size = _checks.check_int(size, "size", minimum=1)
  return Ensemble(member=member, size=size, shared=bool(shared))


def _describe(kind: str, base: str, n: int | None) -> str:
  b = _PAPER_NAMES[base]
  if kind == "en" and n is None:
    return f"EnResNet: pre-activation {b} with Euler-Maruyama noise (En_1 {b}, no ensemble axis)"
  if kind == "en":
    return f"En_{n} {b}: {n} independently parametrised noisy {b}s, logits averaged"
  if kind == "swe":
    return f"{n} x En_1 {b}: shared-weights ensemble of {n} noise draws (Table 7)"
  return f"baseline ensemble of {n} noise-free {b}s, logits averaged"


for _base in BASES:
  register(f"en_{_base}", _describe("en", _base, None))(
      functools.partial(enresnet, base=_base, size=None))
  for _n in (1, 2, 5):
    register(f"en{_n}_{_base}", _describe("en", _base, _n))(
        functools.partial(enresnet, base=_base, size=_n))
    register(f"swe{_n}_{_base}", _describe("swe", _base, _n))(
        functools.partial(enresnet, base=_base, size=_n, shared=True))
  for _n in (2, 5):
    register(f"ens{_n}_{_base}", _describe("ens", _base, _n))(
        functools.partial(enresnet, base=_base, size=_n, noise=False))


def average_logits(models: Sequence[Any], weights: Sequence[float] | None = None, *,
                   stochastic: bool = False, average: str = "logits") -> ModelFn:
  """Integrate separately trained models by (weighted) averaging of their logits.

  The paper's "integration of separately trained EnResNets" (Sec. 3.2, Table 5):
  models of different architectures and checkpoints are combined into one model usable
  by every attack (as ``jaxdefense.attacks.eot(combined, n)`` when it is stochastic).

  Args:
    models: :class:`ModelFn` s (``jaxdefense.models.bind(...)``), each keeping its own
      ``stochastic`` flag, or plain functions converted with
      ``ModelFn.wrap(f, stochastic=stochastic)``: ``f(x [B, H, W, C]) -> logits [B, K]``,
      or ``f(x, key)`` when ``stochastic``.  All must give the same ``[B, K]``.
    weights: optional non-negative weights, one per model (normalised to sum 1);
      default uniform.
    stochastic: how the plain functions among ``models`` are called (default False).
    average: ``"logits"`` (default: the weighted mean of the logits, as the authors'
      code) or ``"probs"`` (the log of the weighted mean of the probabilities, the
      Feynman–Kac reading; see :func:`jaxdefense.models.Ensemble`).

  Returns:
    A :class:`ModelFn` ``combined(x, key=None) -> [B, K]``, stochastic iff any member
    is; then ``key`` is required and member ``i`` gets ``jax.random.split(key, n)[i]``
    (deterministic members ignore theirs).

  Raises:
    TypeError: a non-callable member.
    ValueError: no members, wrong number of weights, negative or all-zero weights;
      members disagreeing on the logits shape (at the call).
  """
  _checks.check_choice(average, "average", AVERAGES)
  members = tuple(models)
  if not members:
    raise ValueError("average_logits needs at least one model; got none.")
  for i, f in enumerate(members):
    if not callable(f):
      raise TypeError(f"models[{i}] must be a ModelFn or callable f(x) (f(x, key) when "
                      f"stochastic=True); got {f!r}.")
  members = tuple(f if isinstance(f, ModelFn) else ModelFn.wrap(f, stochastic=stochastic)
                  for f in members)
  if weights is None:
    w = [1.0 / len(members)] * len(members)
  else:
    w = [_checks.check_float(v, f"weights[{i}]", minimum=0.0) for i, v in enumerate(weights)]
    if len(w) != len(members):
      raise ValueError(f"weights must have one entry per model ({len(members)}); "
                       f"got {len(w)}.")
    total = sum(w)
    if total <= 0:
      raise ValueError(f"weights must not all be zero; got {list(weights)}.")
    w = [v / total for v in w]
  any_stochastic = any(m.stochastic for m in members)

  def combined(x: Array, key: Array | None = None) -> Array:
    if any_stochastic:
      keys = jax.random.split(key, len(members))
      outs = [m(x, keys[i]) for i, m in enumerate(members)]
    else:
      outs = [m(x) for m in members]
    shapes = {tuple(o.shape) for o in outs}
    if len(shapes) != 1:
      raise ValueError(f"average_logits members disagree on the logits shape: "
                       f"{[tuple(o.shape) for o in outs]}.")
    return combine(jnp.stack(outs), average, w)

  return ModelFn.wrap(combined, stochastic=any_stochastic)
