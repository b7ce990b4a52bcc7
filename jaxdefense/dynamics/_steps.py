"""Residual step rules: one discretisation of ``dx/dt = F(x, t)`` per method.

A residual network is ``x_{n+1} = step(x_n, f_n(x_n))``.  A step rule is a small,
frozen, hashable dataclass chosen by configuration, and a *pure* function: it holds no
reference to the network that calls it.  It declares what it needs from its block,

* :meth:`param_specs` -- its trainable parameters (name -> ``(init, shape)``), created
  in the block's scope (the damping coefficient of In-ResNet), and
* :meth:`needs_noise` -- whether the block draws a key from its ``"noise"`` RNG stream
  (the Brownian increment of EnResNet),

and :func:`apply_step` (the only place that touches a block's scope) creates them and
calls ``rule(x, fx, ctx, params=..., key=..., perturbation=...)``.  Every rule accepts
an additive ``perturbation`` (LAD's layer-wise perturbation; ``None`` means zeros).

Rules run on arrays and, when deterministic, on abstract values
(:class:`jaxdefense.nn.AbstractValue`): Euler and Damped with a scalar coefficient are
affine in ``(x, f)``; a noisy or input-gated rule raises a clear error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdefense import _checks
from jaxdefense.nn import _layers as L
from jaxdefense.nn._abstract import is_abstract

Array = jax.Array


class StepContext(NamedTuple):
  """Where a step sits in the network.

  Attributes:
    index: 0-based index of the residual block in the whole network.
    transition: True for a block that changes resolution or width (projection or
      padding shortcut).
    train: training mode.
  """
  index: int
  transition: bool
  train: bool


def _add_perturbation(out: Any, perturbation: Any) -> Any:
  return out if perturbation is None else L.add(out, perturbation)


def _not_certifiable(rule: Any, why: str) -> ValueError:
  return ValueError(f"{rule!r} is not certifiable: {why}. Use a deterministic step "
                    "(Euler, EulerMaruyama(coef=0), Damped with a scalar coefficient) "
                    "for abstract (Box / HybridZonotope) execution.")


ParamSpecs = Mapping[str, tuple[Callable[..., Array], tuple[int, ...]]]


class _Rule:
  """Defaults of the step-rule protocol: no parameters, no noise."""

  def param_specs(self, ctx: StepContext, x: Any) -> ParamSpecs:
    """Trainable parameters of the block at ``ctx`` for input ``x``: name -> (init, shape)."""
    del ctx, x
    return {}

  def needs_noise(self, ctx: StepContext) -> bool:
    """Whether the block at ``ctx`` needs a key from the ``"noise"`` RNG stream."""
    del ctx
    return False


@dataclasses.dataclass(frozen=True)
class Euler(_Rule):
  """Forward Euler, the plain ResNet step: ``x_{n+1} = x_n + f_n(x_n)``.

  Call: ``Euler()(x, fx, ctx, params={}, key=None, perturbation=None)`` returns
  ``x + fx (+ perturbation)``, on arrays or abstract values of one shape.  Inside a
  network it is applied through :func:`apply_step`.
  """

  def __call__(self, x: Any, fx: Any, ctx: StepContext, *, params: Mapping[str, Any] = None,
               key: Array | None = None, perturbation: Any = None) -> Any:
    del ctx, params, key
    return _add_perturbation(L.add(x, fx), perturbation)


_STD_MODES = ("batch", "sample", "fixed")


@dataclasses.dataclass(frozen=True)
class EulerMaruyama(_Rule):
  """Euler–Maruyama step of ``dx = F dt + sigma dB`` (EnResNet, Wang et al. 2019).

  ``x_{n+1} = x_n + f_n(x_n) + coef * s * xi_n``, ``xi_n ~ N(0, I)``, where ``s`` is

  * ``std="batch"`` (default, as the authors' code): one scalar, the standard
    deviation of the whole batch tensor ``x_n + f_n(x_n)``;
  * ``std="sample"``: the standard deviation of each example's tensor;
  * ``std="fixed"``: 1, so ``coef`` is the absolute noise scale sigma.

  The noise is drawn from the ``"noise"`` RNG stream (``rngs={"noise": key}``), in
  training and, unless ``at_test=False``, at test time, as in the paper.  With
  ``coef == 0`` the rule is exactly :class:`Euler`.

  Attributes:
    coef: the noise coefficient ``a`` (>= 0), 0.1 in the paper.
    std: ``"batch"``, ``"sample"`` or ``"fixed"``.
    at_test: draw noise in evaluation mode too.

  Raises:
    ValueError: bad ``coef``/``std``; noise needed but no ``"noise"`` key given; an
      abstract input while noise is on.
  """
  coef: float = 0.1
  std: str = "batch"
  at_test: bool = True

  def __post_init__(self):
    _checks.check_float(self.coef, "EulerMaruyama.coef", minimum=0.0)
    _checks.check_choice(self.std, "EulerMaruyama.std", _STD_MODES)

  def active(self, train: bool) -> bool:
    """Whether noise is drawn in this mode."""
    return self.coef > 0 and (train or self.at_test)

  def needs_noise(self, ctx: StepContext) -> bool:
    """Noise is drawn when :meth:`active` in the block's mode."""
    return self.active(ctx.train)

  def __call__(self, x: Any, fx: Any, ctx: StepContext, *, params: Mapping[str, Any] = None,
               key: Array | None = None, perturbation: Any = None) -> Any:
    """``x + fx + coef * s * N(0, I) (+ perturbation)``; ``key`` draws the noise."""
    del params
    out = L.add(x, fx)
    if self.active(ctx.train):
      if is_abstract(out):
        raise _not_certifiable(self, "it injects Gaussian noise (coef > 0)")
      if key is None:
        raise ValueError(
            f"{self!r} draws noise but got no key: pass rngs={{'noise': key}} to "
            "model.apply (or use coef=0 / at_test=False for a deterministic net).")
      xi = jax.random.normal(key, out.shape, out.dtype)
      if self.std == "batch":
        s = jnp.std(out)
      elif self.std == "sample":
        s = jnp.std(out.reshape(out.shape[0], -1), axis=1).reshape(
            (-1,) + (1,) * (out.ndim - 1))
      else:
        s = 1.0
      out = out + self.coef * s * xi
    return _add_perturbation(out, perturbation)


_DAMPED_KINDS = ("relu", "lambda", "sig", "gating", "gating_sig")


@dataclasses.dataclass(frozen=True)
class Damped(_Rule):
  """Damped residual step of ``dx/dt = -lambda x + rho(lambda) f`` (In-ResNet).

  With ``a = act(lambda_n)``:

  * ``kind="relu"`` (In-ResNet, rho = 1):        ``x_{n+1} = (1 - a) x_n + f_n(x_n)``, act = relu
  * ``kind="lambda"`` (lambda-In-ResNet):        ``x_{n+1} = (1 - a) x_n + (1 + a) f_n(x_n)``, act = relu
  * ``kind="sig"`` (In-ResNet-sig):              as ``"relu"`` with act = sigmoid
  * ``kind="gating"`` / ``"gating_sig"``:        ``lambda_n = W_d x_n + b_d`` with act relu /
    sigmoid.  We read ``W_d`` as a 1x1 convolution (per position and channel), the
    shortcut-only gating of He et al. (2016) that the paper cites; a dense map on
    rank-2 features.  ``W_d`` starts at zero and ``b_d`` in ``init_range``.

  ``lambda = 0`` recovers the ResNet step and ``lambda = 1`` (relu kinds) a plain
  CNN.  One trainable scalar ``lambda`` per block, initialised uniformly in
  ``init_range`` (the authors use U(0.2, 0.25) for 110 layers, U(0.1, 0.2) for 164).
  As in the authors' code, the first block and the stage-transition blocks stay
  plain residual (``skip_first``, ``skip_transitions``).

  Attributes:
    kind: one of relu, lambda, sig, gating, gating_sig.
    init_range: ``(low, high)`` of the uniform initialisation of lambda (or b_d).
    skip_first: keep block 0 a plain ResNet step.
    skip_transitions: keep stage-transition blocks plain ResNet steps.
  """
  kind: str = "relu"
  init_range: tuple[float, float] = (0.2, 0.25)
  skip_first: bool = True
  skip_transitions: bool = True

  def __post_init__(self):
    _checks.check_choice(self.kind, "Damped.kind", _DAMPED_KINDS)
    lo, hi = self.init_range
    if not lo <= hi:
      raise ValueError(f"Damped.init_range must be (low, high) with low <= high; "
                       f"got {self.init_range}.")
    object.__setattr__(self, "init_range", (float(lo), float(hi)))

  def _init(self, key, shape, dtype=jnp.float32):
    lo, hi = self.init_range
    return jax.random.uniform(key, shape, dtype, lo, hi)

  def damped(self, ctx: StepContext) -> bool:
    """Whether the block at ``ctx`` uses the damped rule (else plain Euler)."""
    return not ((self.skip_first and ctx.index == 0)
                or (self.skip_transitions and ctx.transition))

  def param_specs(self, ctx: StepContext, x: Any) -> ParamSpecs:
    """``lambda`` (a scalar), or ``gate_kernel`` / ``gate_bias`` for the gating kinds."""
    if not self.damped(ctx):
      return {}
    if self.kind.startswith("gating"):
      c = x.shape[-1]
      kernel = (1, 1, c, c) if len(x.shape) == 4 else (c, c)
      return {"gate_kernel": (nn.initializers.zeros_init(), kernel),
              "gate_bias": (self._init, (c,))}
    return {"lambda": (self._init, ())}

  def __call__(self, x: Any, fx: Any, ctx: StepContext, *, params: Mapping[str, Any] = None,
               key: Array | None = None, perturbation: Any = None) -> Any:
    """The damped update with the parameters of :meth:`param_specs` in ``params``."""
    del key
    if not self.damped(ctx):
      return _add_perturbation(L.add(x, fx), perturbation)
    params = {} if params is None else params
    missing = sorted(set(self.param_specs(ctx, x)) - set(params))
    if missing:
      raise ValueError(f"{self!r} needs the parameters {missing} (created by apply_step); "
                       f"got {sorted(params)}.")
    act = jax.nn.sigmoid if self.kind in ("sig", "gating_sig") else jax.nn.relu
    if self.kind.startswith("gating"):
      if is_abstract(x):
        raise _not_certifiable(self, "its coefficient lambda = W_d x + b_d depends on the input")
      d = params["gate_kernel"]
      if x.ndim == 4:
        lam = jax.lax.conv_general_dilated(x, d, (1, 1), "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
      else:
        lam = x @ d
      lam = lam + params["gate_bias"]
    else:
      lam = params["lambda"]
    a = act(lam)
    rho = 1.0 + a if self.kind == "lambda" else None
    out = L.add(L.scale_shift(x, 1.0 - a), fx if rho is None else L.scale_shift(fx, rho))
    return _add_perturbation(out, perturbation)


def is_stochastic(step: Any, train: bool = False) -> bool:
  """True when ``step`` draws noise in the given mode.

  Args:
    step: a step rule (any object; rules without noise need not define anything).
    train: the mode asked about; default ``False`` (evaluation).

  Returns:
    ``bool(step.active(train))`` when ``step`` has a callable ``active`` (e.g.
    :class:`EulerMaruyama`: ``coef > 0`` and, at test time, ``at_test``), else
    ``False`` (:class:`Euler`, :class:`Damped`, ``None``).  Never raises for a rule
    without ``active``.
  """
  active = getattr(step, "active", None)
  return bool(active(train)) if callable(active) else False


def apply_step(block: nn.Module, step: Any, x: Any, fx: Any, ctx: StepContext,
               perturbation: Any = None) -> Any:
  """Apply ``step`` inside ``block``: the one place a step rule meets a module's scope.

  Creates the rule's parameters (:meth:`param_specs`) with ``block.param`` and, when
  the rule :meth:`needs_noise`, draws a key from the block's ``"noise"`` RNG stream, then
  returns ``step(x, fx, ctx, params=..., key=..., perturbation=...)``.

  Args:
    block: the calling Flax module (inside its ``@nn.compact`` method).
    step: a step rule (:class:`Euler`, :class:`EulerMaruyama`, :class:`Damped`, or any
      object with ``param_specs``, ``needs_noise`` and that call signature).
    x: the shortcut ``x_n`` (array or abstract value).
    fx: the residual branch ``f_n(x_n)`` (same shape).
    ctx: the block's :class:`StepContext`.
    perturbation: optional additive perturbation of the block's output.

  Returns:
    ``x_{n+1}``.

  Raises:
    ValueError: the rule needs noise but ``model.apply`` got no ``"noise"`` key.
    TypeError: ``step`` does not follow the step-rule protocol.
  """
  if not (hasattr(step, "param_specs") and hasattr(step, "needs_noise") and callable(step)):
    raise TypeError(f"step must be a step rule of jaxdefense.dynamics (Euler(), "
                    f"EulerMaruyama(...), Damped(...)); got {step!r}.")
  params = {name: block.param(name, init, shape)
            for name, (init, shape) in step.param_specs(ctx, x).items()}
  key = None
  if step.needs_noise(ctx) and not is_abstract(x):
    if not block.has_rng("noise"):
      raise ValueError(
          f"{step!r} draws noise but model.apply got no noise key: pass "
          "rngs={'noise': key} (or use coef=0 / at_test=False for a deterministic net).")
    key = block.make_rng("noise")
  return step(x, fx, ctx, params=params, key=key, perturbation=perturbation)
