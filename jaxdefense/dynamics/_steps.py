"""Residual step rules: one discretisation of ``dx/dt = F(x, t)`` per method.

A residual network is ``x_{n+1} = step(x_n, f_n(x_n))``.  A step rule is a small,
frozen, hashable dataclass chosen by configuration, and a *pure* function: it holds no
reference to the network that calls it.  It declares what it needs from its block,

* :meth:`param_specs` -- its trainable parameters (name -> ``(init, shape)``), created
  in the block's scope (the damping coefficient of In-ResNet), and
* :meth:`needs_noise` -- whether the block draws a key from its ``"noise"`` RNG stream
  (the Brownian increment of EnResNet),

and :func:`apply_step` (the only place that touches a block's scope) creates them and
calls ``rule(x, fx, ctx, params=..., key=..., perturbation=...)``; for a damped block it
also sows the effective coefficient (``rule.coefficient``) into the ``"intermediates"``
collection when that collection is mutable.  Every rule accepts
an additive ``perturbation`` (LAD's layer-wise perturbation; ``None`` means zeros).

Rules run on arrays and, when deterministic, on abstract values
(:class:`jaxdefense.nn.AbstractValue`): Euler and Damped with a scalar coefficient are
affine in ``(x, f)``; a noisy or input-gated rule raises a clear error.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import _checks
from jaxdefense.dynamics import _noise
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
    sampler: ``"jax"`` (default: ``jax.random.normal`` with the key's implementation)
      or ``"fast"`` (:func:`~jaxdefense.dynamics.fast_normal`: a counter-based hash
      that XLA fuses into the step, no noise buffer; several times cheaper on CPU;
      other values than ``"jax"`` for the same key) or ``"rademacher"`` (random signs
      from the same hash: the simplified weak Euler scheme, not Gaussian; see
      :func:`~jaxdefense.dynamics.fast_rademacher`).

  Raises:
    ValueError: bad ``coef``/``std``; noise needed but no ``"noise"`` key given; an
      abstract input while noise is on.
  """
  coef: float = 0.1
  std: str = "batch"
  at_test: bool = True
  sampler: str = "jax"

  def __post_init__(self):
    _checks.check_float(self.coef, "EulerMaruyama.coef", minimum=0.0)
    _checks.check_choice(self.std, "EulerMaruyama.std", _STD_MODES)
    _checks.check_choice(self.sampler, "EulerMaruyama.sampler", _noise.SAMPLERS)

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
      xi = _noise.normal(key, out.shape, out.dtype, self.sampler)
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
_SIGMOID_KINDS = ("sig", "gating_sig")
_DAMPED_STORAGES = ("authors", "lambda")

#: Default initial range of the *effective* coefficient ``lambda = act(.)`` per kind of
#: :class:`Damped`: the paper's tuned 110-layer range U(0.2, 0.25) for every kind (the
#: paper tunes the variants' intervals but does not print them; 0.2 keeps the sigmoid
#: kinds near the interpolation regime instead of ``sigmoid(0.2) ~ 0.55``).  The
#: authors' 164-layer range is ``Damped(init_range=(0.1, 0.2))``.
DAMPED_INIT_RANGES: Mapping[str, tuple[float, float]] = types.MappingProxyType(
    {kind: (0.2, 0.25) for kind in _DAMPED_KINDS})

#: Name under which :func:`apply_step` sows a damped block's effective coefficient
#: (:meth:`Damped.coefficient`) into the ``"intermediates"`` collection.
DAMPING_INTERMEDIATE = "damping"
_INTERMEDIATES = "intermediates"


@dataclasses.dataclass(frozen=True)
class Damped(_Rule):
  """Damped residual step of ``dx/dt = -lambda x + rho(lambda) f`` (In-ResNet).

  With ``a`` the effective coefficient of the block (:meth:`coefficient`):

  * ``kind="relu"`` (In-ResNet, rho = 1):    ``x_{n+1} = (1 - a) x_n + f_n(x_n)``
  * ``kind="lambda"`` (lambda-In-ResNet):    ``x_{n+1} = (1 - a) x_n + (1 + a) f_n(x_n)``
  * ``kind="sig"`` (In-ResNet-sig):          as ``"relu"`` with ``a = sigmoid(lambda_n)``
  * ``kind="gating"`` / ``"gating_sig"``:    as ``"relu"`` with ``a = act(W_d x_n + b_d)``,
    act relu / sigmoid.  We read ``W_d`` as a 1x1 convolution (per position and
    channel), the shortcut-only gating of He et al. (2016) that the paper cites; a
    dense map on rank-2 features.  ``W_d`` starts at zero, so the initial gate is the
    per-channel constant ``act(b_d)``.

  ``a = 0`` recovers the ResNet step and ``a = 1`` the plain CNN step
  (``x_{n+1} = f_n(x_n)``; ``2 f_n(x_n)`` for ``"lambda"``) for every kind; the sigmoid
  kinds reach 0 and 1 only in the limit (stored parameter -> -inf / +inf).

  **Stored parameter** (``storage``), and where weight decay (which shrinks every stored
  parameter toward 0) pulls the effective coefficient:

  * ``storage="authors"`` (default): the authors' code for ``"relu"`` and ``"lambda"``
    (issue 11, NOTES.md section 2); for the other kinds, whose storage nothing public
    pins down, our reading of the paper's eq. (21), ``act(d(x_n))``:

    - ``"relu"``: a scalar ``k`` with ``a = relu(1 - k)`` (shortcut weight
      ``1 - relu(1 - k)``); decay pulls In-ResNet toward the plain CNN (``a -> 1``).
    - ``"lambda"``: the scalar ``lambda`` itself, ``a = relu(lambda)``; decay pulls
      lambda-In-ResNet toward the ResNet (``a -> 0``).
    - ``"sig"``: the scalar ``lambda`` (``lambda_n`` of the paper's eq. 21), ``a =
      sigmoid(lambda)``; decay pulls ``a`` toward 1/2.
    - ``"gating"`` / ``"gating_sig"``: ``gate_kernel`` (W_d) and ``gate_bias`` (b_d);
      decay pulls ``a`` toward ``act(0)``: 0 (ResNet) / 1/2.

  * ``storage="lambda"``: the paper's ``lambda_n`` under ``act`` for every kind, i.e.
    ``"relu"`` stores a scalar ``lambda`` with ``a = relu(lambda)`` (decay toward the
    ResNet).  This is how every kind was stored before the authors' storage became the
    default: variables (checkpoints) of an older ``"relu"`` net load with
    ``Damped("relu", storage="lambda")``.  The other kinds store the same parameters as
    with ``"authors"``.

  **Initialisation.**  ``init_range = (low, high)`` is a range of the *effective*
  coefficient ``a``: ``a ~ U(low, high)``, converted to the stored parameter
  (``k = 1 - a``; ``lambda = a``; ``lambda = logit(a)`` for ``"sig"``; ``b_d = a`` or
  ``logit(a)`` for the gating kinds, with ``W_d = 0``).  ``None`` (default) takes the
  kind's default from :data:`DAMPED_INIT_RANGES`, U(0.2, 0.25) as the authors'
  110-layer nets: ``Damped("relu")`` stores ``k ~ U(0.75, 0.8)`` and ``Damped("lambda")``
  ``lambda ~ U(0.2, 0.25)``, as the authors.  The authors' 164-layer nets use
  ``Damped(init_range=(0.1, 0.2))``.  The range must be one the kind can represent:
  ``a >= 0`` for the relu kinds (``relu``, ``lambda``, ``gating``; ``a > 1`` is allowed,
  a negative shortcut weight), ``0 < a < 1`` for the sigmoid kinds.

  As in the authors' code, the first block and the stage-transition blocks stay
  plain residual (``skip_first``, ``skip_transitions``).  Inside a network,
  :func:`apply_step` sows each damped block's :meth:`coefficient` into the
  ``"intermediates"`` collection (name :data:`DAMPING_INTERMEDIATE`) when that
  collection is mutable; :func:`jaxdefense.analysis.damping_coefficients` reads them.

  Attributes:
    kind: one of ``relu``, ``lambda``, ``sig``, ``gating``, ``gating_sig``.
    init_range: ``(low, high)`` of the uniform initialisation of the effective
      coefficient, or ``None`` for the kind's default (:data:`DAMPED_INIT_RANGES`).
    skip_first: keep block 0 a plain ResNet step.
    skip_transitions: keep stage-transition blocks plain ResNet steps.
    storage: ``"authors"`` (default) or ``"lambda"``, see above.

  Raises:
    ValueError: unknown ``kind`` or ``storage``; ``init_range`` not finite, with
      ``low > high``, or outside what the kind can represent (the message names the
      field, the value and the kind).
    TypeError: ``init_range`` not a pair of real numbers.
  """
  kind: str = "relu"
  init_range: tuple[float, float] | None = None
  skip_first: bool = True
  skip_transitions: bool = True
  storage: str = "authors"

  def __post_init__(self):
    _checks.check_choice(self.kind, "Damped.kind", _DAMPED_KINDS)
    _checks.check_choice(self.storage, "Damped.storage", _DAMPED_STORAGES)
    if self.init_range is not None:
      object.__setattr__(self, "init_range", self._checked_range(self.init_range))

  # ------------------------------------------------------------------ parametrisation
  @property
  def gating(self) -> bool:
    """True for the input-gated kinds (``gating``, ``gating_sig``)."""
    return self.kind.startswith("gating")

  @property
  def lambda_init_range(self) -> tuple[float, float]:
    """The initial range of the effective coefficient: ``init_range`` or the kind's
    default from :data:`DAMPED_INIT_RANGES`."""
    return self.init_range if self.init_range is not None else DAMPED_INIT_RANGES[self.kind]

  def _checked_range(self, value: Any) -> tuple[float, float]:
    where = f"Damped.init_range (kind={self.kind!r})"
    if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__")
        or len(value) != 2):
      raise TypeError(f"{where} must be a pair (low, high) of effective coefficients, or "
                      f"None for the kind's default; got {value!r}.")
    pair = []
    for v in value:
      if isinstance(v, bool) or not isinstance(v, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{where} must hold real numbers; got {value!r}.")
      pair.append(float(v))
    lo, hi = pair
    if not (np.isfinite(lo) and np.isfinite(hi)):
      raise ValueError(f"{where} must be finite; got {value!r}.")
    if not lo <= hi:
      raise ValueError(f"{where} must be (low, high) with low <= high; got {value!r}.")
    if self.kind in _SIGMOID_KINDS:
      if not (0.0 < lo and hi < 1.0):
        raise ValueError(
            f"{where} must lie inside (0, 1): the coefficient sigmoid(.) of kind "
            f"{self.kind!r} takes only values strictly between 0 and 1; got {value!r}.")
    elif lo < 0.0:
      raise ValueError(
          f"{where} must lie in [0, inf): the coefficient relu(.) of kind {self.kind!r} "
          f"cannot be negative; got {value!r}.")
    return (lo, hi)

  def param_names(self) -> tuple[str, ...]:
    """Names of a damped block's rule parameters in its variable scope.

    ``("k",)`` for ``kind="relu"`` with ``storage="authors"``, ``("gate_kernel",
    "gate_bias")`` for the gating kinds, ``("lambda",)`` otherwise.
    """
    if self.gating:
      return ("gate_kernel", "gate_bias")
    if self.kind == "relu" and self.storage == "authors":
      return ("k",)
    return ("lambda",)

  def _act(self, z: Any) -> Array:
    return jax.nn.sigmoid(z) if self.kind in _SIGMOID_KINDS else jax.nn.relu(z)

  def parameter_for(self, coefficient: Any) -> Array:
    """The stored parameter whose effective coefficient is ``coefficient``.

    ``1 - a`` (``"relu"``, ``storage="authors"``), ``logit(a)`` (sigmoid kinds; for the
    gating kinds this is the bias ``b_d`` that gives ``a`` when ``W_d = 0``), ``a``
    otherwise.  Elementwise on any shape; the sigmoid kinds map 0 and 1 to -inf and
    +inf.  The inverse of :meth:`coefficient` on the representable range (the relu kinds
    map every stored value at or below the kink to 0).

    Args:
      coefficient: an effective coefficient ``a`` (float or array), ``a >= 0`` for the
        relu kinds, ``0 <= a <= 1`` for the sigmoid kinds (not checked).

    Returns:
      A float array of the shape of ``coefficient``.
    """
    a = jnp.asarray(coefficient, jnp.result_type(float, coefficient))
    if self.kind in _SIGMOID_KINDS:
      return jnp.log(a) - jnp.log1p(-a)
    if self.kind == "relu" and self.storage == "authors":
      return 1.0 - a
    return a

  def _init(self, key, shape, dtype=jnp.float32):
    lo, hi = self.lambda_init_range
    return self.parameter_for(jax.random.uniform(key, shape, dtype, lo, hi)).astype(dtype)

  def damped(self, ctx: StepContext) -> bool:
    """Whether the block at ``ctx`` uses the damped rule (else plain Euler)."""
    return not ((self.skip_first and ctx.index == 0)
                or (self.skip_transitions and ctx.transition))

  def param_specs(self, ctx: StepContext, x: Any) -> ParamSpecs:
    """``k`` or ``lambda`` (a scalar, see :meth:`param_names`), or ``gate_kernel``
    (``[1, 1, C, C]`` on NHWC features, ``[C, C]`` on rank-2 ones, zeros) and
    ``gate_bias`` (``[C]``) for the gating kinds; ``{}`` for a block that is not damped."""
    if not self.damped(ctx):
      return {}
    if self.gating:
      c = x.shape[-1]
      kernel = (1, 1, c, c) if len(x.shape) == 4 else (c, c)
      return {"gate_kernel": (nn.initializers.zeros_init(), kernel),
              "gate_bias": (self._init, (c,))}
    return {self.param_names()[0]: (self._init, ())}

  def coefficient(self, x: Any, ctx: StepContext | None,
                  params: Mapping[str, Any] | None) -> Array:
    """The effective damping coefficient ``a = act(lambda_n)`` of a damped block.

    A pure function of the block's parameters (and, for the gating kinds, of its input);
    :meth:`__call__` uses it, and :func:`apply_step` sows it.

    Args:
      x: the block's shortcut input ``x_n``, ``[B, H, W, C]`` or ``[B, C]``; used by the
        gating kinds only (the scalar kinds accept ``None``).
      ctx: the block's :class:`StepContext`, or ``None`` to skip the check that the block
        is damped (reading stored variables).
      params: the block's rule parameters (:meth:`param_names`).

    Returns:
      Scalar kinds: ``relu(1 - k)``, ``relu(lambda)`` or ``sigmoid(lambda)`` with the
      stored parameter's shape (``()`` in one network).  Gating kinds: ``act(W_d x + b_d)``
      with the shape of ``x``.

    Raises:
      ValueError: the block at ``ctx`` is not damped; a parameter is missing; a gating
        kind without ``x``, or with an abstract ``x`` (not certifiable).
    """
    if ctx is not None and not self.damped(ctx):
      raise ValueError(f"{self!r}: block {ctx.index} (transition={ctx.transition}) is a "
                       "plain residual block (skip_first / skip_transitions); it has no "
                       "damping coefficient.")
    params = {} if params is None else params
    missing = [name for name in self.param_names() if name not in params]
    if missing:
      raise ValueError(f"{self!r} needs the parameters {missing} (created by apply_step); "
                       f"got {sorted(params)}.")
    if not self.gating:
      p = jnp.asarray(params[self.param_names()[0]])
      if self.kind == "relu" and self.storage == "authors":
        return jax.nn.relu(1.0 - p)
      return self._act(p)
    if x is None:
      raise ValueError(f"{self!r}: the coefficient act(W_d x_n + b_d) of kind "
                       f"{self.kind!r} depends on the block input; got x=None.")
    if is_abstract(x):
      raise _not_certifiable(self, "its coefficient lambda = W_d x + b_d depends on the input")
    d = params["gate_kernel"]
    if x.ndim == 4:
      lam = jax.lax.conv_general_dilated(x, d, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      lam = x @ d
    return self._act(lam + params["gate_bias"])

  def __call__(self, x: Any, fx: Any, ctx: StepContext, *, params: Mapping[str, Any] = None,
               key: Array | None = None, perturbation: Any = None) -> Any:
    """The damped update with the parameters of :meth:`param_specs` in ``params``:
    ``(1 - a) x + fx`` (``(1 - a) x + (1 + a) fx`` for ``"lambda"``), ``a`` from
    :meth:`coefficient`; plain ``x + fx`` for a block that is not damped.

    Raises:
      ValueError: a parameter missing; a gating kind on an abstract input.
    """
    del key
    if not self.damped(ctx):
      return _add_perturbation(L.add(x, fx), perturbation)
    a = self.coefficient(x, ctx, params)
    branch = L.scale_shift(fx, 1.0 + a) if self.kind == "lambda" else fx
    out = L.add(L.scale_shift(x, 1.0 - a), branch)
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

  For a rule with ``damped(ctx)`` and ``coefficient(x, ctx, params)`` (:class:`Damped`)
  and a damped block, the block's effective coefficient is also sown into the
  ``"intermediates"`` collection under :data:`DAMPING_INTERMEDIATE` (a tuple with one
  entry per call: a scalar, or an array of the shape of ``x`` for the gating kinds).
  ``flax`` sows only when that collection is mutable, e.g.
  ``model.apply(variables, x, mutable=["intermediates"])``; otherwise nothing is computed
  or stored.

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
  params = {name: L.param(block, name, init, shape)
            for name, (init, shape) in step.param_specs(ctx, x).items()}
  coefficient, damped = getattr(step, "coefficient", None), getattr(step, "damped", None)
  if (callable(coefficient) and callable(damped) and damped(ctx)
      and block.is_mutable_collection(_INTERMEDIATES)):
    block.sow(_INTERMEDIATES, DAMPING_INTERMEDIATE, coefficient(x, ctx, params))
  key = None
  if step.needs_noise(ctx) and not is_abstract(x):
    if not block.has_rng("noise"):
      raise ValueError(
          f"{step!r} draws noise but model.apply got no noise key: pass "
          "rngs={'noise': key} (or use coef=0 / at_test=False for a deterministic net).")
    key = block.make_rng("noise")
  return step(x, fx, ctx, params=params, key=key, perturbation=perturbation)
