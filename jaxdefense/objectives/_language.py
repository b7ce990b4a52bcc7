"""DiffAI's training language: goals, schedules and the objective they make.

Mirman, Singh & Vechev, "A Provable Defense for Deep Residual Networks" (2019),
section 4 and tables 1-2.  A *goal* maps the training box ``[l, u] = [max(x - eps, 0),
min(x + eps, 1)]`` to a training element (a point or an abstract set, the paper's
``alpha_g(l, u)``) and the element to a loss (``loss_g(d, t)``):

* concrete goals (CE of the point's logits): :class:`Point` (the centre ``(l + u) / 2``),
  :class:`Normal` and :class:`Uniform` (a random point of the box), :class:`IFGSM`
  (``k`` sign-gradient steps inside the box, from the centre);
* abstract goals (CE of the worst-case logits of the model run on the set, see
  :func:`jaxdefense.certify.worst_case_logits`): :class:`Box` (interval domain),
  :class:`HBox` (hybrid zonotope started as a box, DiffAI's box ReLU), :class:`Zonotope`
  (one generator per input pixel, box ReLU) and :class:`DeepZ` (zonotope, DeepZ ReLU);
* combinators: :class:`Mix` (weighted sum of two goals' losses), :class:`Sub` (a goal
  on the box shrunk about its centre), :class:`Sample`, :class:`BiSample` and
  :class:`DeepLossWeight` (the scale of the :class:`~jaxdefense.nn.DeepLoss` terms
  sown by the model during the goal's abstract passes).

A *schedule* is a number, :class:`~jaxdefense.objectives.Lin` or :class:`Until`, read
at the fractional epoch ``t``; every real argument of a goal and the values of a
schedule may be schedules themselves (epoch counts are numbers).

:class:`DiffAIObjective` wraps a goal and the training radius ``eps`` in the training
step's contract.  Everything is a frozen, hashable dataclass: the objective is one
static object under ``jax.jit``, the epoch a traced scalar (no retracing as it moves).
``str()`` of any of them prints the language text (:func:`jaxdefense.objectives.parse`
reads it back).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdefense import _checks
from jaxdefense import attacks
from jaxdefense.certify._domains import Box as _BoxDomain
from jaxdefense.certify._domains import HybridZonotope as _ZonoDomain
from jaxdefense.certify._domains import worst_case_logits
from jaxdefense.models import ModelFn
from jaxdefense.nn._abstract import is_abstract
from jaxdefense.objectives._adversarial import _check_batch, attack_model, check_model
from jaxdefense.objectives._certified import LOSSES, Lin, _extra_losses, collecting_losses

Array = jax.Array

__all__ = [
    "BiSample", "Box", "DeepLossWeight", "DeepZ", "DiffAIObjective", "Goal", "HBox",
    "IFGSM", "Lin", "Mix", "Normal", "Point", "Sample", "Sub", "Uniform", "Until",
    "Zonotope", "schedule_range", "schedule_value",
]

#: The epoch at which schedules are read when the loop passes none (their end values).
END_EPOCH = 1e9


# ------------------------------------------------------------------ schedules
@dataclasses.dataclass(frozen=True)
class Until:
  """DiffAI's ``Until(m, s1, s2)``: ``s1(t)`` before epoch ``m``, then ``s2(t - m)``.

  Attributes:
    m: the switching epoch (a number >= 0).
    s1, s2: numbers or schedules.

  Raises:
    ValueError / TypeError: ``m`` negative or not a number, ``s1``/``s2`` not schedules.
  """
  m: float
  s1: Any
  s2: Any

  def __post_init__(self):
    object.__setattr__(self, "m", _checks.check_float(self.m, "Until.m", minimum=0.0))
    object.__setattr__(self, "s1", check_schedule(self.s1, "Until.s1"))
    object.__setattr__(self, "s2", check_schedule(self.s2, "Until.s2"))

  def __call__(self, epoch: Any) -> Array:
    return schedule_value(self, epoch)

  def __str__(self) -> str:
    return to_text(self)


Schedule = Union[float, Lin, Until]


def is_schedule(value: Any) -> bool:
  """Whether ``value`` is a number, a :class:`Lin` or an :class:`Until`."""
  if isinstance(value, bool):
    return False
  return isinstance(value, (numbers.Real, Lin, Until))


def check_schedule(value: Any, name: str) -> Schedule:
  """``value`` as a schedule (numbers become ``float``), checked recursively.

  Raises:
    TypeError: ``value`` (or a part of it) is neither a number nor a schedule.
    ValueError: a non-finite number.
  """
  if isinstance(value, bool) or not is_schedule(value):
    raise TypeError(f"{name} must be a number or a schedule (Lin, Until); got {value!r}.")
  if isinstance(value, numbers.Real):
    return _checks.check_float(value, name)
  if isinstance(value, Lin):
    check_schedule(value.start, f"{name}.a")
    check_schedule(value.end, f"{name}.b")
    _checks.check_float(value.hold, f"{name}.m", minimum=0.0)
    _checks.check_float(value.ramp, f"{name}.n", minimum=0.0)
  return value


def schedule_value(s: Schedule, epoch: Any) -> Array:
  """The value of schedule ``s`` at fractional epoch ``epoch`` (float32, jit-able).

  ``epoch`` may be a traced scalar; ``None`` reads the schedule at its end.  ``Lin``
  interpolates between the *values* of its ends at ``epoch`` (ends may be schedules).
  """
  if epoch is None:
    epoch = END_EPOCH
  if isinstance(s, numbers.Real):
    return jnp.float32(s)
  t = jnp.asarray(epoch, jnp.float32)
  if isinstance(s, Lin):  # Lin evaluates schedule-valued ends itself
    return jnp.asarray(s(t), jnp.float32)
  if isinstance(s, Until):
    return jnp.where(t < s.m, schedule_value(s.s1, t), schedule_value(s.s2, t - s.m))
  raise TypeError(f"not a schedule: {s!r}.")


def schedule_range(s: Schedule) -> tuple[float, float]:
  """Static bounds ``(lowest, highest)`` of every value the schedule can take."""
  if isinstance(s, numbers.Real):
    return float(s), float(s)
  if isinstance(s, Lin):
    (a0, a1), (b0, b1) = schedule_range(s.start), schedule_range(s.end)
    return min(a0, b0), max(a1, b1)
  if isinstance(s, Until):
    (a0, a1), (b0, b1) = schedule_range(s.s1), schedule_range(s.s2)
    return min(a0, b0), max(a1, b1)
  raise TypeError(f"not a schedule: {s!r}.")


def _check_range(s: Schedule, name: str, minimum: float | None = None,
                 maximum: float | None = None) -> Schedule:
  s = check_schedule(s, name)
  lo, hi = schedule_range(s)
  if minimum is not None and lo < minimum:
    raise ValueError(f"{name} must be >= {minimum} at every epoch; {to_text(s)} reaches {lo}.")
  if maximum is not None and hi > maximum:
    raise ValueError(f"{name} must be <= {maximum} at every epoch; {to_text(s)} reaches {hi}.")
  return s


# ------------------------------------------------------------------ printing
def _number(v: float) -> str:
  v = float(v)
  if v.is_integer() and abs(v) < 1e15:
    return str(int(v))
  return repr(v)


def to_text(obj: Any) -> str:
  """The language text of a number, schedule, goal or objective (``str()`` uses it)."""
  if isinstance(obj, numbers.Real) and not isinstance(obj, bool):
    return _number(obj)
  if isinstance(obj, Lin):
    return (f"Lin({to_text(obj.start)}, {to_text(obj.end)}, {_number(obj.hold)}, "
            f"{_number(obj.ramp)})")
  if isinstance(obj, Until):
    return f"Until({_number(obj.m)}, {to_text(obj.s1)}, {to_text(obj.s2)})"
  if isinstance(obj, Goal):
    return f"{obj.NAME}({', '.join(obj._text_args())})"
  if isinstance(obj, DiffAIObjective):
    return f"DiffAI({to_text(obj.goal)}, eps={_number(obj.eps)})"
  raise TypeError(f"{obj!r} is not part of the DiffAI language.")


# ------------------------------------------------------------------ elements
@dataclasses.dataclass
class _Context:
  """What every goal sees besides its box: the models, labels and epoch."""
  model: ModelFn            # training mode, for concrete passes
  abstract_model: ModelFn   # the same with "losses" mutable, for abstract passes
  y: Array
  epoch: Any


@dataclasses.dataclass
class _Terms:
  """A goal's loss: ``value`` (deep terms weighted inside included), ``deep`` (deep terms
  not yet weighted), ``weighted_deep`` (the part of ``value`` that is deep terms) and the
  first abstract leaf's loss / certified fraction (``None`` without one)."""
  value: Array
  deep: Array
  weighted_deep: Array
  abstract_loss: Optional[Array] = None
  certified: Optional[Array] = None


def _ce(logits: Array, y: Array) -> Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


class _Element:
  """A training element (the paper's ``d = alpha_g(l, u)``) and its loss."""

  def center(self) -> Array:
    raise TypeError(f"{type(self).__name__} has no centre.")

  def upper(self) -> Array:
    raise TypeError(f"{type(self).__name__} has no upper bound.")

  def loss(self, ctx: _Context) -> _Terms:
    raise NotImplementedError


class _PointElement(_Element):

  def __init__(self, x: Array):
    self.x = x

  def center(self) -> Array:
    return self.x

  def upper(self) -> Array:
    return self.x

  def loss(self, ctx: _Context) -> _Terms:
    logits, _ = ctx.model.apply(self.x)
    zero = jnp.float32(0.0)
    return _Terms(_ce(logits, ctx.y), zero, zero)


class _SetElement(_Element):

  def __init__(self, lo: Array, hi: Array, goal: "_Domain"):
    self.lo, self.hi, self.goal = lo, hi, goal

  def center(self) -> Array:
    return (self.lo + self.hi) / 2

  def upper(self) -> Array:
    return self.hi

  def loss(self, ctx: _Context) -> _Terms:
    g = self.goal
    if g.DOMAIN == "box":
      value = _BoxDomain.from_bounds(self.lo, self.hi)
    else:
      value = _ZonoDomain.from_bounds(self.lo, self.hi, correlate=g.CORRELATE,
                                      relu_mode=g.RELU, relu_budget=g.relu_budget())
    z, state = ctx.abstract_model.apply(value)
    if not is_abstract(z):
      raise TypeError(f"DiffAI goal {g.NAME}: the model returned a concrete array for an "
                      "abstract input; build the model from jaxdefense.nn layers.")
    worst = worst_case_logits(z, ctx.y)
    loss = _ce(worst, ctx.y)
    others = jnp.where(jax.nn.one_hot(ctx.y, worst.shape[-1]) > 0, -jnp.inf, worst)
    certified = jnp.mean(jnp.max(others, -1) < 0)
    return _Terms(loss, _extra_losses(dict(state)), jnp.float32(0.0), loss, certified)


class _MixElement(_Element):

  def __init__(self, a: _Element, b: _Element, aw: Array, bw: Array):
    self.a, self.b, self.aw, self.bw = a, b, aw, bw

  def loss(self, ctx: _Context) -> _Terms:
    ta, tb = self.a.loss(ctx), self.b.loss(ctx)
    first = ta if ta.abstract_loss is not None else tb
    return _Terms(self.aw * ta.value + self.bw * tb.value, ta.deep + tb.deep,
                  self.aw * ta.weighted_deep + self.bw * tb.weighted_deep,
                  first.abstract_loss, first.certified)


class _DeepElement(_Element):

  def __init__(self, inner: _Element, weight: Array):
    self.inner, self.weight = inner, weight

  def center(self) -> Array:
    return self.inner.center()

  def upper(self) -> Array:
    return self.inner.upper()

  def loss(self, ctx: _Context) -> _Terms:
    t = self.inner.loss(ctx)
    extra = self.weight * t.deep
    return _Terms(t.value + extra, jnp.float32(0.0), t.weighted_deep + extra,
                  t.abstract_loss, t.certified)


def _need_key(key: Any, name: str) -> Array:
  if key is None:
    raise ValueError(f"DiffAI goal {name} draws random points: the objective needs a PRNG "
                     "key (got key=None).")
  return key


def _split(key: Any, n: int) -> list[Any]:
  return [None] * n if key is None else [jax.random.fold_in(key, i) for i in range(n)]


# ------------------------------------------------------------------ goals
class Goal:
  """Base class of DiffAI goals (frozen dataclasses).

  A goal is a pure, jit-able function of the model, the labels, the box ``[lo, hi]``
  (``[B, H, W, C]`` each) and a PRNG key: :meth:`element` returns the training element,
  whose loss the objective takes.  Subclasses set ``NAME`` (their name in the language).
  """
  NAME: ClassVar[str] = ""

  def element(self, ctx: _Context, lo: Array, hi: Array, key: Any) -> _Element:
    """The training element for the box ``[lo, hi]`` (the paper's ``alpha_g(l, u)``)."""
    raise NotImplementedError

  def children(self) -> tuple["Goal", ...]:
    """The goals this goal is built from."""
    return ()

  @property
  def is_abstract(self) -> bool:
    """Whether the goal (or one inside it) runs the model on an abstract set."""
    return any(c.is_abstract for c in self.children())

  @property
  def is_random(self) -> bool:
    """Whether the goal (or one inside it) draws random numbers from the key."""
    return any(c.is_random for c in self.children())

  def _text_args(self) -> list[str]:
    return []

  def __str__(self) -> str:
    return to_text(self)


def _check_goal(value: Any, name: str) -> Goal:
  if not isinstance(value, Goal):
    raise TypeError(f"{name} must be a goal (Point, Box, Mix, ...); got {value!r}.")
  return value


@dataclasses.dataclass(frozen=True)
class Point(Goal):
  """``Point``: the centre ``(l + u) / 2`` of the box, cross-entropy loss."""
  NAME: ClassVar[str] = "Point"

  def element(self, ctx, lo, hi, key):
    return _PointElement((lo + hi) / 2)


@dataclasses.dataclass(frozen=True)
class Normal(Goal):
  """``Normal``: ``clip(c + r * N(0, 1), l, u)`` (``c``, ``r`` the box's centre and
  half-width), cross-entropy loss.  Needs a key."""
  NAME: ClassVar[str] = "Normal"

  @property
  def is_random(self) -> bool:
    return True

  def element(self, ctx, lo, hi, key):
    key = _need_key(key, self.NAME)
    noise = jax.random.normal(key, lo.shape, lo.dtype)
    return _PointElement(jnp.clip((lo + hi) / 2 + (hi - lo) / 2 * noise, lo, hi))


@dataclasses.dataclass(frozen=True)
class Uniform(Goal):
  """``Uniform``: ``c + r * U(-1, 1)``, a uniform point of the box, cross-entropy loss.
  Needs a key."""
  NAME: ClassVar[str] = "Uniform"

  @property
  def is_random(self) -> bool:
    return True

  def element(self, ctx, lo, hi, key):
    key = _need_key(key, self.NAME)
    noise = jax.random.uniform(key, lo.shape, lo.dtype, -1.0, 1.0)
    return _PointElement(jnp.clip((lo + hi) / 2 + (hi - lo) / 2 * noise, lo, hi))


@dataclasses.dataclass(frozen=True)
class IFGSM(Goal):
  """``IFGSM(k)``: ``k`` steps of iterative FGSM inside the box, cross-entropy loss.

  The attack starts at the box's centre ``c`` and ascends the cross-entropy with sign
  steps of ``2.5 r / k`` (``r`` the per-pixel half-width), projected onto ``[l, u]``
  after every step (``k = 1`` is FGSM to a corner).  It runs on the frozen training
  model (:func:`jaxdefense.objectives._adversarial.attack_model`); the point is
  ``stop_gradient``-ed.

  Attributes:
    k: number of steps (an int >= 1; default 5).
  """
  NAME: ClassVar[str] = "IFGSM"
  k: int = 5

  def __post_init__(self):
    if isinstance(self.k, bool) or not isinstance(self.k, (numbers.Integral, float)) or \
        float(self.k) != int(self.k):
      raise TypeError(f"IFGSM.k must be an integer number of steps; got {self.k!r}.")
    object.__setattr__(self, "k", _checks.check_int(int(self.k), "IFGSM.k", minimum=1))

  def _text_args(self):
    return [str(self.k)]

  def element(self, ctx, lo, hi, key):
    c, r = (lo + hi) / 2, (hi - lo) / 2
    x = jax.lax.stop_gradient(c)
    inner = attack_model(ctx.model, x, key)
    vg = attacks.make_value_and_grad(inner, attacks.make_loss("ce", ctx.y, None),
                                     transform=lambda w: c + r * w)
    rule = attacks.sign_ascent(2.5 / self.k, lambda w: jnp.clip(w, -1.0, 1.0))
    noise_key = key if isinstance(inner, attacks.EOT) else None
    w, _ = attacks.ascent_loop(vg, rule, jnp.zeros_like(x), self.k, noise_key)
    return _PointElement(jax.lax.stop_gradient(jnp.clip(c + r * w, lo, hi)))


class _Domain(Goal):
  DOMAIN: ClassVar[str] = "box"
  RELU: ClassVar[str] = "box"
  CORRELATE: ClassVar[bool] = False

  @property
  def is_abstract(self) -> bool:
    return True

  def relu_budget(self) -> Optional[int]:
    return None

  def element(self, ctx, lo, hi, key):
    return _SetElement(lo, hi, self)


@dataclasses.dataclass(frozen=True)
class Box(_Domain):
  """``Box``: the interval domain on ``[l, u]`` (IBP), CE of the worst-case logits."""
  NAME: ClassVar[str] = "Box"


@dataclasses.dataclass(frozen=True)
class HBox(_Domain):
  """``HBox``: a hybrid zonotope started as a box (no generators; the model's correlation
  layers add them), DiffAI's box ReLU; CE of the worst-case logits."""
  NAME: ClassVar[str] = "HBox"
  DOMAIN: ClassVar[str] = "zonotope"


@dataclasses.dataclass(frozen=True)
class Zonotope(_Domain):
  """``Zonotope``: a hybrid zonotope with one generator per input pixel, DiffAI's box
  ReLU; CE of the worst-case logits."""
  NAME: ClassVar[str] = "Zonotope"
  DOMAIN: ClassVar[str] = "zonotope"
  CORRELATE: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class DeepZ(_Domain):
  """``DeepZ(budget)``: a zonotope (one generator per input pixel) with the DeepZ ReLU.

  Attributes:
    budget: new generators per ReLU layer (an int >= 1), or ``None`` (default): one per
      crossing neuron.
  """
  NAME: ClassVar[str] = "DeepZ"
  DOMAIN: ClassVar[str] = "zonotope"
  RELU: ClassVar[str] = "deepz"
  CORRELATE: ClassVar[bool] = True
  budget: Optional[int] = None

  def __post_init__(self):
    if self.budget is not None:
      if isinstance(self.budget, float) and self.budget.is_integer():
        object.__setattr__(self, "budget", int(self.budget))
      _checks.check_int(self.budget, "DeepZ.budget", minimum=1)

  def relu_budget(self):
    return self.budget

  def _text_args(self):
    return [] if self.budget is None else [str(self.budget)]


@dataclasses.dataclass(frozen=True, init=False)
class Mix(Goal):
  """``Mix(a, b, lam)`` = ``(1 - lam) loss_a + lam loss_b`` (the paper's form), or
  ``Mix(a, b, aw, bw)`` = ``aw loss_a + bw loss_b`` (DiffAI's code form).

  Both goals see the same box (their elements form the paper's cartesian product).
  Weights are numbers or schedules.

  Args:
    a, b: goals.
    *weights: ``lam`` (in ``[0, 1]``) or ``aw, bw`` (>= 0).
    aw, bw: the weights by keyword (``bw`` alone is ``lam``).

  Raises:
    TypeError: ``a``/``b`` not goals, weights not schedules, a weight given twice.
    ValueError: a weight that can leave its range, or no weight at all.
  """
  NAME: ClassVar[str] = "Mix"
  a: Goal
  b: Goal
  aw: Optional[Schedule]   # None: 1 - bw (the paper's lambda form)
  bw: Schedule

  def __init__(self, a: Goal, b: Goal, *weights: Schedule, aw: Any = None, bw: Any = None):
    if len(weights) > 2:
      raise TypeError(f"Mix takes 3 or 4 arguments (a, b, lam) or (a, b, aw, bw); got "
                      f"{2 + len(weights)}.")
    if len(weights) == 1:
      if bw is not None or aw is not None:
        raise TypeError("Mix: lam given both by position and by keyword.")
      bw = weights[0]
    elif len(weights) == 2:
      if bw is not None or aw is not None:
        raise TypeError("Mix: weights given both by position and by keyword.")
      aw, bw = weights
    if bw is None:
      raise ValueError("Mix needs a weight: Mix(a, b, lam) or Mix(a, b, aw, bw).")
    object.__setattr__(self, "a", _check_goal(a, "Mix.a"))
    object.__setattr__(self, "b", _check_goal(b, "Mix.b"))
    if aw is None:
      object.__setattr__(self, "aw", None)
      object.__setattr__(self, "bw", _check_range(bw, "Mix.lam", 0.0, 1.0))
    else:
      object.__setattr__(self, "aw", _check_range(aw, "Mix.aw", 0.0))
      object.__setattr__(self, "bw", _check_range(bw, "Mix.bw", 0.0))

  def children(self):
    return (self.a, self.b)

  def weights(self, epoch: Any) -> tuple[Array, Array]:
    """``(aw(t), bw(t))`` (``aw = 1 - lam`` in the paper's form)."""
    bw = schedule_value(self.bw, epoch)
    aw = 1.0 - bw if self.aw is None else schedule_value(self.aw, epoch)
    return aw, bw

  def _text_args(self):
    w = [] if self.aw is None else [to_text(self.aw)]
    return [to_text(self.a), to_text(self.b)] + w + [to_text(self.bw)]

  def element(self, ctx, lo, hi, key):
    ka, kb = _split(key, 2)
    aw, bw = self.weights(ctx.epoch)
    return _MixElement(self.a.element(ctx, lo, hi, ka), self.b.element(ctx, lo, hi, kb),
                       aw, bw)


def _shrink(lo: Array, hi: Array, delta: Array) -> tuple[Array, Array]:
  """The box scaled by ``delta`` about its centre: ``0.5 (u + l -+ delta (u - l))``."""
  c, r = (lo + hi) / 2, (hi - lo) / 2
  return c - delta * r, c + delta * r


@dataclasses.dataclass(frozen=True)
class Sub(Goal):
  """``Sub(delta, g)``: ``g`` on the box scaled by ``delta`` about its centre,
  ``[c - delta r, c + delta r]``; ``g``'s loss.  ``Sub(0, g)`` sees the centre alone,
  ``Sub(1, g)`` is ``g``.

  Attributes:
    delta: a number or schedule, >= 0 at every epoch.
    goal: the goal.
  """
  NAME: ClassVar[str] = "Sub"
  delta: Schedule
  goal: Goal

  def __post_init__(self):
    object.__setattr__(self, "delta", _check_range(self.delta, "Sub.delta", 0.0))
    _check_goal(self.goal, "Sub.goal")

  def children(self):
    return (self.goal,)

  def _text_args(self):
    return [to_text(self.delta), to_text(self.goal)]

  def element(self, ctx, lo, hi, key):
    lo2, hi2 = _shrink(lo, hi, schedule_value(self.delta, ctx.epoch))
    return self.goal.element(ctx, lo2, hi2, key)


def _check_single(goal: Goal, name: str) -> Goal:
  _check_goal(goal, name)
  if _has_mix(goal):
    raise ValueError(f"{name} must give one element (its centre / upper bound is used); "
                     f"{to_text(goal)} contains a Mix.")
  return goal


def _has_mix(goal: Goal) -> bool:
  if isinstance(goal, Mix):
    return True
  if isinstance(goal, (Sample, BiSample)):   # their element is their last goal's
    return _has_mix(goal.children()[-1])
  return any(_has_mix(c) for c in goal.children())


@dataclasses.dataclass(frozen=True)
class Sample(Goal):
  """``Sample(delta, r, gs, gt)``: ``gt`` on a box of relative size ``delta`` about a
  sampled centre.

  ``b`` is the centre of ``gs``'s element on ``Sub(max(1 - r delta, 0))`` of the box;
  ``gt`` then runs on ``[b - delta (u - l) / 2, b + delta (u - l) / 2]``; ``gt``'s loss.
  The language also accepts ``Sample(delta, gs, gt)`` (``r = 1``, the paper's text).

  Attributes:
    delta: number or schedule >= 0.
    r: number or schedule in ``[0, 1]``.
    gs: the sampling goal (one element: no ``Mix``).
    gt: the training goal.
  """
  NAME: ClassVar[str] = "Sample"
  delta: Schedule
  r: Schedule
  gs: Goal
  gt: Goal

  def __post_init__(self):
    object.__setattr__(self, "delta", _check_range(self.delta, "Sample.delta", 0.0))
    object.__setattr__(self, "r", _check_range(self.r, "Sample.r", 0.0, 1.0))
    _check_single(self.gs, "Sample.gs")
    _check_goal(self.gt, "Sample.gt")

  def children(self):
    return (self.gs, self.gt)

  def _text_args(self):
    return [to_text(self.delta), to_text(self.r), to_text(self.gs), to_text(self.gt)]

  def element(self, ctx, lo, hi, key):
    ks, kt = _split(key, 2)
    delta = schedule_value(self.delta, ctx.epoch)
    shrink = jnp.maximum(1.0 - schedule_value(self.r, ctx.epoch) * delta, 0.0)
    b = self.gs.element(ctx, *_shrink(lo, hi, shrink), ks).center()
    half = delta * (hi - lo) / 2
    return self.gt.element(ctx, b - half, b + half, kt)


@dataclasses.dataclass(frozen=True)
class BiSample(Goal):
  """``BiSample(g1, g2)``: ``g2`` on the box symmetric about the centre ``c`` that reaches
  the upper bound of ``g1``'s element: ``[c - w, c + w]``, ``w = |UB(alpha_g1(l, u)) -
  c|``; ``g2``'s loss.

  Attributes:
    g1: the goal whose element sets the width (one element: no ``Mix``).
    g2: the training goal.
  """
  NAME: ClassVar[str] = "BiSample"
  g1: Goal
  g2: Goal

  def __post_init__(self):
    _check_single(self.g1, "BiSample.g1")
    _check_goal(self.g2, "BiSample.g2")

  def children(self):
    return (self.g1, self.g2)

  def _text_args(self):
    return [to_text(self.g1), to_text(self.g2)]

  def element(self, ctx, lo, hi, key):
    k1, k2 = _split(key, 2)
    c = (lo + hi) / 2
    w = jnp.abs(self.g1.element(ctx, lo, hi, k1).upper() - c)
    return self.g2.element(ctx, c - w, c + w, k2)


@dataclasses.dataclass(frozen=True)
class DeepLossWeight(Goal):
  """``DeepLoss(weight, g)``: ``g``'s loss plus ``weight(t)`` times the
  :class:`~jaxdefense.nn.DeepLoss` terms the model sows during ``g``'s abstract passes.

  Outside any ``DeepLoss(...)`` the sown terms count with weight 1 (as in
  :class:`~jaxdefense.objectives.CertifiedObjective`); inside, the innermost weight
  applies.  The layer's own ``weight`` multiplies in as well.  The weighted terms are
  part of this goal's loss, so an enclosing ``Mix`` scales them with its weight:
  ``DeepLoss(w, Mix(Point, Box, lam))`` adds ``w D`` (``CertifiedObjective``'s
  ``deep_mix="add"``), ``Mix(Point, DeepLoss(w, Box), lam)`` adds ``lam w D``.

  Attributes:
    weight: number or schedule >= 0.
    goal: the goal.
  """
  NAME: ClassVar[str] = "DeepLoss"
  weight: Schedule
  goal: Goal

  def __post_init__(self):
    object.__setattr__(self, "weight", _check_range(self.weight, "DeepLoss.weight", 0.0))
    _check_goal(self.goal, "DeepLoss.goal")

  def children(self):
    return (self.goal,)

  def _text_args(self):
    return [to_text(self.weight), to_text(self.goal)]

  def element(self, ctx, lo, hi, key):
    return _DeepElement(self.goal.element(ctx, lo, hi, key),
                        schedule_value(self.weight, ctx.epoch))


# ------------------------------------------------------------------ objective
@dataclasses.dataclass(frozen=True)
class DiffAIObjective:
  """A DiffAI goal as a training objective (text: ``DiffAI(goal, eps=...)``).

  The loss is ``loss_g(alpha_g(l, u), y)`` on the clipped box ``[l, u] = [max(x - eps,
  0), min(x + eps, 1)]`` plus the :class:`~jaxdefense.nn.DeepLoss` terms the goal's
  abstract passes sow (weight 1 unless a ``DeepLoss(w, ...)`` goal sets one).

  Call contract (the training step's)::

      loss, aux = objective(model, x, y, key, epoch=epoch)

  Args (of the call):
    model: a training-mode :class:`~jaxdefense.models.ModelFn` (``models.bind(module,
      variables, train=True)``); abstract goals need a deterministic model built from
      :mod:`jaxdefense.nn` layers.
    x: images ``[B, H, W, C]`` in ``[0, 1]``; y: int labels ``[B]``.
    key: PRNG key (needed by ``Normal``, ``Uniform`` and a stochastic model's attack).
    epoch: fractional epoch (a float or traced scalar; ``None``: the schedules' end).

  Returns (of the call):
    The scalar loss and ``aux``: ``"logits"`` (of the clean ``x``, ``[B, K]``),
    ``"model_state"`` (of that pass, without ``"losses"``), ``"point_loss"`` (CE at
    ``x``), ``"goal_loss"``, ``"deep_loss"`` (the weighted DeepLoss terms in the loss),
    and for an abstract goal ``"abstract_loss"`` and ``"certified"`` (of the first
    abstract set in the goal).

  Attributes:
    goal: a :class:`Goal`.
    eps: training radius in ``[0, 1]``.

  Raises:
    TypeError / ValueError: (construction) a goal that is not a :class:`Goal`, ``eps``
      outside ``[0, 1]``; (call) a model that is not a ``ModelFn``, bad images or labels,
      a random goal without a key, a stochastic model under an abstract goal.
  """
  uses_epoch: ClassVar[bool] = True
  goal: Goal
  eps: float = 0.1

  def __post_init__(self):
    _check_goal(self.goal, "DiffAIObjective.goal")
    object.__setattr__(self, "eps", _checks.check_float(self.eps, "eps"))
    _checks.check_eps(self.eps, "eps")

  @property
  def needs_abstract_apply(self) -> bool:
    """Whether the goal runs the model on abstract sets."""
    return self.goal.is_abstract

  def __str__(self) -> str:
    return to_text(self)

  def __call__(self, model: ModelFn, x: Array, y: Array, key: Any, *,
               epoch: Any = None) -> tuple[Array, dict[str, Any]]:
    """Loss and aux for one batch (see the class docstring)."""
    check_model(model, "DiffAIObjective")
    _check_batch(x, y)
    if self.goal.is_random:
      _need_key(key, to_text(self.goal))
    if self.goal.is_abstract and model.stochastic:
      raise ValueError("DiffAIObjective: an abstract goal needs a deterministic model; "
                       f"{type(model.module).__name__} draws noise.")
    x = jnp.asarray(x)
    logits, state = model.apply(x)
    state = {k: v for k, v in dict(state).items() if k != LOSSES}
    ctx = _Context(model, collecting_losses(model), jnp.asarray(y), epoch)
    lo = jnp.clip(x - self.eps, 0.0, 1.0)
    hi = jnp.clip(x + self.eps, 0.0, 1.0)
    terms = self.goal.element(ctx, lo, hi, key).loss(ctx)
    loss = terms.value + terms.deep
    aux = {
        "logits": logits,
        "model_state": state,
        "point_loss": _ce(logits, ctx.y),
        "goal_loss": terms.value - terms.weighted_deep,
        "deep_loss": terms.weighted_deep + terms.deep,
    }
    if terms.abstract_loss is not None:
      aux["abstract_loss"] = terms.abstract_loss
      aux["certified"] = terms.certified
    return loss, aux
