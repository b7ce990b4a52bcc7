"""Continuous-depth blocks: ODE and SDE flows integrated by diffrax.

A residual network is the forward-Euler discretisation of ``dx/dt = F(x, t)``; an
EnResNet is the Euler–Maruyama discretisation of ``dx = F(x, t) dt + sigma dB``
(Wang et al. 2019).  This module keeps the flow continuous and hands it to diffrax:

* :func:`solve_ode` / :func:`solve_sde` are pure functions of a vector field
  ``f(t, x, args)`` (the diffrax convention: parameters passed through ``args`` receive
  gradients under every adjoint);
* :class:`ODEBlock` / :class:`SDEBlock` are Flax modules whose vector field is itself a
  Flax module, called as ``field(t, x)`` (or ``field(x)`` with
  ``time_dependent=False``);
* :func:`feynman_kac` is the Monte-Carlo estimate of the Feynman–Kac representation
  ``u(x0, 0) = E[f(x(T)) | x(0) = x0]`` of the backward convection–diffusion equation
  ``u_t + F . grad u + (sigma^2 / 2) Laplace u = 0``, ``u(., T) = f``, i.e. of what an
  ensemble of noisy ResNets approximates.

Solvers: ``"euler"``, ``"heun"``, ``"midpoint"``, ``"ralston"``, ``"rk4"`` (fixed steps)
and ``"bosh3"``, ``"tsit5"``, ``"dopri5"``, ``"dopri8"`` (adaptive with a
``PIDController`` by default; fixed steps with ``adaptive=False``; ``"heun"`` may also
take adaptive steps with its embedded Euler estimate).  :func:`ode_stats` turns a
solution into the numbers of steps (accepted, rejected) and of function evaluations,
and :class:`ODEBlock` sows them under :data:`ODE_STATS` on every call.  The SDE solver is
Euler–Maruyama (``diffrax.Euler`` on ``MultiTerm(ODETerm, ControlTerm)``, Itô) on a
``VirtualBrownianTree``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, NamedTuple

import diffrax
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from jaxdefense import _checks

Array = jax.Array
VectorField = Callable[[Array, Array, Any], Array]

class RK4(diffrax.AbstractERK):
  """The classical fourth-order Runge–Kutta method (4 stages, fixed steps only).

  diffrax has no classical RK4; this is its Butcher tableau on diffrax's explicit RK
  machinery.  It has no embedded error estimate (``b_error`` is zero), so it only takes
  fixed steps.
  """
  tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
      c=np.array([0.5, 0.5, 1.0]),
      b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
      b_error=np.zeros(4),
      a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])))
  interpolation_cls: ClassVar[Callable[..., Any]] = (
      diffrax.ThirdOrderHermitePolynomialInterpolation.from_k)

  def order(self, terms):
    del terms
    return 4


_FIXED_SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
    "rk4": RK4,
}
_ADAPTIVE_SOLVERS = {
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}
_EMBEDDED = ("heun", "bosh3", "tsit5", "dopri5", "dopri8")  # have an error estimate
_ADJOINTS = ("recursive", "backsolve", "direct", "unrolled")

#: Solver names accepted by ``ODEBlock(solver=...)``: the fixed-step ones, then the adaptive ones.
SOLVERS = tuple(sorted(_FIXED_SOLVERS)) + tuple(sorted(_ADAPTIVE_SOLVERS))
#: Gradient modes accepted by ``ODEBlock(adjoint=...)``.
ADJOINTS = _ADJOINTS

ODE_STATS = "ode_stats"
"""Flax collection where :class:`ODEBlock` sows its solver statistics
(``model.apply(..., mutable=[ODE_STATS])``): see :func:`ode_stats`."""


# ------------------------------------------------------------------------ checks
def _check_interval(t0: Any, t1: Any) -> tuple[float, float]:
  t0 = _checks.check_float(t0, "t0")
  t1 = _checks.check_float(t1, "t1")
  if not t1 > t0:
    raise ValueError(f"t1 must be > t0 (integration runs forward in time); got t0={t0}, "
                     f"t1={t1}.")
  return t0, t1


def _resolve_steps(t0: float, t1: float, n_steps: Any, dt: Any) -> int:
  """Number of fixed steps from ``n_steps`` or ``dt`` (``dt`` wins when given)."""
  if dt is not None:
    dt = _checks.check_float(dt, "dt", minimum=0.0, strict_min=True)
    return max(1, math.ceil((t1 - t0) / dt - 1e-9))
  return _checks.check_int(n_steps, "n_steps", minimum=1)


def _check_sigma(sigma: Any) -> Any:
  """Check a concrete ``sigma >= 0``; traced values pass through unchecked."""
  arr = _checks.as_concrete_numpy(sigma)
  if arr is None:
    return sigma
  if arr.ndim != 0:
    raise ValueError(f"sigma must be a scalar (additive isotropic noise); got "
                     f"{_checks._summary(sigma)}.")
  return _checks.check_float(float(arr), "sigma", minimum=0.0)


def _is_zero(sigma: Any) -> bool:
  return isinstance(sigma, float) and sigma == 0.0


def _solver(name: str, adaptive: bool | None) -> tuple[Any, bool]:
  _checks.check_choice(name, "solver", SOLVERS)
  if adaptive is None:
    adaptive = name in _ADAPTIVE_SOLVERS
  if adaptive and name not in _EMBEDDED:
    raise ValueError(f"solver={name!r} has no error estimate, so it cannot take adaptive "
                     f"steps; use adaptive=False or one of {list(_EMBEDDED)}.")
  cls = _FIXED_SOLVERS.get(name) or _ADAPTIVE_SOLVERS[name]
  return cls(), bool(adaptive)


DEFAULT_CHECKPOINTS = 16
"""Solver states that the discretise-then-optimise gradient (``adjoint="recursive"``)
stores by default.  diffrax's own default, ``sqrt(2 max_steps)`` (about 90 at
``max_steps = 4096``), allocates that many copies of the state on every call, most of
them unused by a solve of a few steps: a Dopri5 gradient of a 64 x 32 x 32 x 16 state
(4 steps) took 1.73 s with it and 1.30 s with 16 (2-core CPU; same gradient to the bit).
A solve of more than ``checkpoints`` steps recomputes (binomial checkpointing,
``O(n log n)`` time) instead of failing."""


def _check_checkpoints(checkpoints: Any) -> int | None:
  if checkpoints is None:
    return None
  return _checks.check_int(checkpoints, "checkpoints", minimum=1)


def _adjoint(name: str, checkpoints: int | None = DEFAULT_CHECKPOINTS) -> Any:
  _checks.check_choice(name, "adjoint", _ADJOINTS)
  if name == "backsolve":
    return diffrax.BacksolveAdjoint()
  if name == "direct":
    return diffrax.DirectAdjoint()
  if name == "unrolled":
    raise ValueError("adjoint='unrolled' is solve_ode's own fixed-step loop, not a "
                     "diffrax adjoint.")
  return diffrax.RecursiveCheckpointAdjoint(checkpoints=_check_checkpoints(checkpoints))


def _saveat(ts: Any) -> diffrax.SaveAt:
  if ts is None:
    return diffrax.SaveAt(t1=True)
  return diffrax.SaveAt(ts=jnp.asarray(ts))


def _check_state(x0: Any) -> Array:
  x0 = jnp.asarray(x0)
  _checks.check_floating(x0, "x0")
  return x0


# ------------------------------------------------------- hashable vector fields
# diffrax compiles once per (hashable) vector field: these small frozen wrappers
# compare equal across calls, so repeated eager solves reuse the compiled solver.
@dataclasses.dataclass(frozen=True)
class _Drift:
  """``f(t, y, (user_args, sigma)) = fn(t, y, user_args)``."""
  fn: Callable[..., Array]

  def __call__(self, t, y, args):
    return self.fn(t, y, args[0])


@dataclasses.dataclass(frozen=True)
class _AdditiveNoise:
  """``g(t, y, (user_args, sigma)) = sigma * I`` on states of ``structure``."""
  shape: tuple[int, ...]
  dtype: Any

  def __call__(self, t, y, args):
    structure = jax.ShapeDtypeStruct(self.shape, self.dtype)
    return args[1] * lx.IdentityLinearOperator(structure)


@dataclasses.dataclass(frozen=True)
class _ModuleField:
  """A Flax module as ``f(t, y, variables)``."""
  module: nn.Module
  time_dependent: bool

  def __call__(self, t, y, variables):
    if self.time_dependent:
      return self.module.apply(variables, jnp.asarray(t, y.dtype), y)
    return self.module.apply(variables, y)


@dataclasses.dataclass(frozen=True)
class _TimeDrift:
  """``F(t, x)`` as ``f(t, x, args)``."""
  fn: Callable[[Array, Array], Array]

  def __call__(self, t, y, args):
    return self.fn(t, y)


# -------------------------------------------------------------------- statistics
def _evaluations_per_step(solver: Any) -> tuple[int, int]:
  """``(new evaluations per attempted step, extra evaluations at the start)``.

  An explicit RK method with ``s`` stages evaluates the field ``s`` times per step; when
  its last stage is the next step's first (FSAL: Bosh3, Tsit5, Dopri5, Dopri8), diffrax
  reuses it, so each step costs ``s - 1`` and the first one more (after a rejected step
  the first stage at the same point is reused too).  Euler costs one per step.
  """
  tableau = getattr(solver, "tableau", None)
  if tableau is None:
    return 1, 0
  if tableau.fsal:
    return tableau.num_stages - 1, 1
  return tableau.num_stages, 0


def ode_stats(solution: diffrax.Solution, solver: str, adjoint: str = "recursive",
              adaptive: bool | None = None) -> dict[str, Array]:
  """Step and function-evaluation counts of a :func:`solve_ode` solution.

  Args:
    solution: ``solve_ode(..., full_output=True)``'s ``diffrax.Solution``.
    solver: the solver name it was solved with.
    adjoint: the gradient mode it was solved with.
    adaptive: as given to :func:`solve_ode`.

  Returns:
    A dict of int32 scalars (arrays, so it can be returned from ``jit`` and logged):
    ``num_steps`` (attempted steps), ``num_accepted``, ``num_rejected``, ``nfe`` (field
    evaluations of the forward solve: exact for every fixed-step solve and every solve
    whose first attempted step is accepted; an FSAL solver (Bosh3, Tsit5, Dopri5,
    Dopri8) evaluates its first stage again after each rejection that comes before the
    first accepted step, which ``nfe`` does not count, so it is then low by at most
    ``num_rejected``) and, for the ``"recursive"``, ``"direct"`` and ``"unrolled"``
    adjoints, ``nfe_backward``: the vector-Jacobian products of the field that a
    gradient through this solve evaluates (one per forward evaluation; the forward
    evaluations that recursive checkpointing recomputes are not counted).  Under
    ``"backsolve"`` the backward solve is a second adaptive solve whose statistics
    diffrax does not return, so there is no ``nfe_backward``.

  Raises:
    ValueError: an unknown solver or adjoint.
  """
  slv, _ = _solver(solver, adaptive)
  _checks.check_choice(adjoint, "adjoint", _ADJOINTS)
  per_step, start = _evaluations_per_step(slv)
  stats = solution.stats
  steps = jnp.asarray(stats["num_steps"], jnp.int32)
  accepted = jnp.asarray(stats["num_accepted_steps"], jnp.int32)
  rejected = jnp.asarray(stats["num_rejected_steps"], jnp.int32)
  nfe = per_step * steps + start
  if adjoint == "unrolled" and _fsal_stage_unused(getattr(slv, "tableau", None)):
    nfe = nfe - 1   # its last step skips the stage that would start the next one
  out = {"num_steps": steps, "num_accepted": accepted, "num_rejected": rejected, "nfe": nfe}
  if adjoint != "backsolve":
    out["nfe_backward"] = nfe
  return out


def _check_field_output(vector_field: VectorField, t0: float, x0: Array, args: Any) -> None:
  """The field must return an array of the state's shape (checked by tracing once)."""
  out = jax.eval_shape(vector_field, jnp.asarray(t0, x0.dtype), x0, args)
  shape = getattr(out, "shape", None)
  if shape != x0.shape:
    raise ValueError(f"the vector field must return dx/dt of the state's shape "
                     f"{tuple(x0.shape)}; it returned "
                     f"{tuple(shape) if shape is not None else type(out).__name__}.")


_MAX_STEPS_MESSAGE = (
    "The ODE solve ({solver}, rtol={rtol}, atol={atol}) used its whole step budget "
    "max_steps={max_steps} before reaching t1={t1}. Raise max_steps (solve_ode(..., "
    "max_steps=N), ODEBlock(max_steps=N) or a model's max_steps field), loosen rtol/atol, "
    "or check the field: a stiff field (large weights) or NaN states need many steps.")


def _raise_on_failure(ys: Array, sol: diffrax.Solution, message: str) -> Array:
  """Attach runtime checks to ``ys``: the step budget and any other solver failure."""
  ys = eqx.error_if(ys, sol.result == diffrax.RESULTS.max_steps_reached, message)
  failed = jnp.logical_and(sol.result != diffrax.RESULTS.successful,
                           sol.result != diffrax.RESULTS.max_steps_reached)
  return eqx.error_if(ys, failed, "The ODE solve failed (a non-finite state, or the step "
                      "size underflowed); the inputs or the field's weights may hold "
                      "NaN or inf.")


# ------------------------------------------------------------------------ solvers
def solve_ode(vector_field: VectorField, x0: Array, args: Any = None, *,
              t0: float = 0.0, t1: float = 1.0, solver: str = "euler",
              n_steps: int = 10, dt: float | None = None, adaptive: bool | None = None,
              rtol: float = 1e-3, atol: float = 1e-6, max_steps: int = 4096,
              adjoint: str = "recursive", checkpoints: int | None = DEFAULT_CHECKPOINTS,
              ts: Any = None, full_output: bool = False) -> Any:
  """Integrate ``dx/dt = vector_field(t, x, args)`` from ``t0`` to ``t1`` with diffrax.

  Fixed-step solvers take ``n_steps`` equal steps (``ConstantStepSize``), so forward
  Euler with ``n_steps = L`` is a ResNet with ``L`` blocks of residual ``dt * F``.
  Adaptive solvers start from ``dt0 = (t1 - t0) / n_steps`` and
  are controlled by ``PIDController(rtol, atol)``.

  Args:
    vector_field: ``f(t, x, args) -> dx/dt`` with ``t`` a scalar and ``x`` of the
      shape of ``x0`` (any shape; a batch is integrated as one state, sharing steps).
    x0: initial state, floating array of any shape.
    args: pytree handed to ``vector_field`` (put trainable parameters here: they then
      get gradients under every ``adjoint``).
    t0: initial time.
    t1: final time (> ``t0``).
    solver: one of ``euler, heun, midpoint, ralston, rk4, bosh3, tsit5, dopri5,
      dopri8``.
    n_steps: number of fixed steps (initial step ``(t1 - t0) / n_steps`` if adaptive).
    dt: step size; if given, overrides ``n_steps`` with ``ceil((t1 - t0) / dt)``.
    adaptive: adaptive step size control; default (``None``) True for
      bosh3/tsit5/dopri5/dopri8 and False otherwise.
    rtol: relative tolerance of the PID controller (adaptive only).
    atol: absolute tolerance of the PID controller (adaptive only).
    max_steps: step budget of adaptive solves (fixed solves use ``n_steps``).
    adjoint: ``"recursive"`` (discretise-then-optimise, default), ``"backsolve"``
      (continuous adjoint, O(1) memory), ``"direct"`` or ``"unrolled"``:
      discretise-then-optimise for fixed steps as straight-line code with every stage
      stored, so a gradient evaluates one vector-Jacobian product per field evaluation
      and nothing again (the fastest gradient of a short fixed-step solve, e.g. an RK4
      twin attacked in a transfer study; memory grows with ``n_steps x stages``).
    checkpoints: states stored for the backward pass of ``adjoint="recursive"``
      (default :data:`DEFAULT_CHECKPOINTS`, 16): a solve of at most that many steps
      is never recomputed, a longer one recomputes by binomial checkpointing; memory
      is ``checkpoints`` copies of the state.  ``None``: diffrax's default,
      ``sqrt(2 max_steps)``.  Ignored by the other adjoints.
    ts: optional increasing times in ``[t0, t1]`` at which to return the state; the
      result then has a leading axis ``len(ts)``.
    full_output: return the ``diffrax.Solution`` (``.ys``, ``.stats``; see
      :func:`ode_stats`) instead of the state (an :class:`UnrolledSolution` with the
      same two fields for ``adjoint="unrolled"``).

  Returns:
    ``x(t1)`` with the shape of ``x0`` (or ``[len(ts), *x0.shape]``), or the
    ``diffrax.Solution`` when ``full_output``.

  Raises:
    ValueError: ``t1 <= t0``, ``n_steps < 1``, ``dt <= 0``, ``rtol`` or ``atol <= 0``,
      ``checkpoints < 1``, an unknown solver or adjoint, ``adaptive=True`` with a solver that has no error
      estimate, a field whose output shape differs from the state's;
      ``adjoint="unrolled"`` with an adaptive solve or with ``ts``.
    equinox.EquinoxRuntimeError: (when the solve runs) an adaptive solve that uses up
      ``max_steps`` (the message names ``max_steps`` and how to raise it), or a solve
      that fails on non-finite values, instead of returning NaN.
    TypeError: a non-floating ``x0``; a non-callable ``vector_field``.
  """
  if not callable(vector_field):
    raise TypeError(f"vector_field must be callable f(t, x, args); got {vector_field!r}.")
  t0, t1 = _check_interval(t0, t1)
  n = _resolve_steps(t0, t1, n_steps, dt)
  x0 = _check_state(x0)
  slv, adaptive = _solver(solver, adaptive)
  _checks.check_choice(adjoint, "adjoint", _ADJOINTS)
  if adjoint == "unrolled":
    _check_unrolled(solver, adaptive)
    if ts is not None:
      raise ValueError("adjoint='unrolled' returns the state at t1 only; got ts. Use "
                       "adjoint='recursive' to save the state at several times.")
    _check_field_output(vector_field, t0, x0, args)
    return _unrolled(vector_field, slv, x0, args, t0, t1, n, full_output)
  if adaptive:
    _checks.check_float(rtol, "rtol", minimum=0.0, strict_min=True)
    _checks.check_float(atol, "atol", minimum=0.0, strict_min=True)
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    dt0 = (t1 - t0) / n
    budget = _checks.check_int(max_steps, "max_steps", minimum=1)
  else:  # diffrax clips the last step onto t1, so this is exactly n equal steps
    controller = diffrax.ConstantStepSize()
    dt0 = (t1 - t0) / n
    budget = n + 1
  _check_field_output(vector_field, t0, x0, args)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), slv, t0, t1, dt0, x0, args=args,
      saveat=_saveat(ts), stepsize_controller=controller, max_steps=budget,
      adjoint=_adjoint(adjoint, checkpoints), throw=False)
  message = _MAX_STEPS_MESSAGE.format(solver=solver, rtol=rtol, atol=atol,
                                      max_steps=budget, t1=t1)
  sol = eqx.tree_at(lambda s: s.ys, sol, _raise_on_failure(sol.ys, sol, message))
  if full_output:
    return sol
  return sol.ys if ts is not None else sol.ys[0]


class UnrolledSolution(NamedTuple):
  """What ``solve_ode(..., adjoint="unrolled", full_output=True)`` returns: ``ys``
  (``[1, *x0.shape]``, the state at ``t1``, as a ``diffrax.Solution`` saving ``t1``)
  and ``stats`` (diffrax's step counts: ``num_steps``, ``num_accepted_steps``,
  ``num_rejected_steps``, ``max_steps``), which :func:`ode_stats` reads."""
  ys: Array
  stats: dict


def _fsal_stage_unused(tableau: Any) -> bool:
  """Whether an FSAL tableau's last stage has no weight in the solution (it only
  starts the next step), so the last step of an unrolled solve can skip it."""
  return bool(tableau is not None and tableau.fsal and float(tableau.b_sol[-1]) == 0.0)


def _rk_update(y: Array, h: float, weights: np.ndarray, ks: list) -> Array:
  """``y + h sum_m w_m k_m`` over the non-zero weights (``y`` itself when all are 0)."""
  terms = [float(w) * ks[m] for m, w in enumerate(weights) if w != 0.0]
  return y + h * sum(terms[1:], terms[0]) if terms else y


def _check_unrolled(solver: str, adaptive: bool) -> None:
  """``adjoint="unrolled"`` needs a fixed number of steps."""
  if adaptive:
    raise ValueError(f"adjoint='unrolled' takes a fixed number of steps; solver={solver!r} "
                     "is adaptive here: pass adaptive=False (n_steps equal steps) or use "
                     "adjoint='recursive'.")


def _unrolled(f: VectorField, solver: Any, x0: Array, args: Any, t0: float, t1: float,
              n: int, full_output: bool) -> Any:
  """``n`` equal explicit Runge–Kutta steps as straight-line code (no loop).

  Reverse-mode differentiation then stores every stage and evaluates one vector-Jacobian
  product per field evaluation (diffrax's checkpointed loops re-run each step and each
  stage in the backward pass: about three field evaluations per forward one), and the
  field's operations run outside any loop, where XLA:CPU takes its fast convolution
  paths.  Memory: every stage of every step is kept for the backward pass.  FSAL
  tableaus (Dopri5...) reuse the last stage as the next step's first, as diffrax does,
  and the last step skips it (one evaluation fewer than diffrax's fixed-step solve).
  """
  h = (t1 - t0) / n
  dtype = x0.dtype
  tableau = getattr(solver, "tableau", None)
  y = x0
  if tableau is None:  # Euler
    for i in range(n):
      y = y + h * f(jnp.asarray(t0 + i * h, dtype), y, args)
  else:
    a = [np.asarray(row, np.float64) for row in tableau.a_lower]
    b = np.asarray(tableau.b_sol, np.float64)
    c = np.asarray(tableau.c, np.float64)
    first = None
    last_unused = _fsal_stage_unused(tableau)
    for i in range(n):
      t = t0 + i * h
      ks = [f(jnp.asarray(t, dtype), y, args) if first is None else first]
      # an FSAL tableau's last stage only serves the next step (and the error
      # estimate): the final step does not evaluate it
      rows = a[:-1] if last_unused and i == n - 1 else a
      for j, row in enumerate(rows):
        ks.append(f(jnp.asarray(t + c[j] * h, dtype), _rk_update(y, h, row, ks), args))
      y = _rk_update(y, h, b, ks)
      first = ks[-1] if tableau.fsal else None
  if not full_output:
    return y
  steps = jnp.asarray(n, jnp.int32)
  return UnrolledSolution(ys=y[None], stats={
      "num_steps": steps, "num_accepted_steps": steps,
      "num_rejected_steps": jnp.zeros((), jnp.int32), "max_steps": n})


def solve_sde(drift: VectorField, x0: Array, sigma: Any, key: Array, args: Any = None, *,
              t0: float = 0.0, t1: float = 1.0, n_steps: int = 10,
              dt: float | None = None, tol: float | None = None,
              adjoint: str = "recursive", ts: Any = None,
              full_output: bool = False) -> Any:
  """Euler–Maruyama solve of the Itô SDE ``dx = drift(t, x, args) dt + sigma dB``.

  Additive isotropic noise: ``B`` is a standard Brownian motion with the shape of
  ``x0`` (every entry independent), sampled by a ``diffrax.VirtualBrownianTree`` from
  ``key``, so a fixed key gives a fixed path whatever the step size.  Each step is
  ``x_{n+1} = x_n + dt * drift(t_n, x_n) + sigma * (B(t_{n+1}) - B(t_n))``.

  Args:
    drift: ``f(t, x, args) -> dx/dt``, as in :func:`solve_ode`.
    x0: initial state, floating array of any shape.
    sigma: noise scale, a scalar ``>= 0`` (a Python number or a 0-d array, possibly
      traced, e.g. a trainable parameter).
    key: PRNG key of the Brownian path.
    args: pytree handed to ``drift``.
    t0: initial time.
    t1: final time (> ``t0``).
    n_steps: number of equal steps.
    dt: step size; if given, overrides ``n_steps`` with ``ceil((t1 - t0) / dt)``.
    tol: resolution of the Brownian tree; default ``dt / 4``.
    adjoint: ``"recursive"`` (default) or ``"direct"``; see :func:`solve_ode`.
    ts: optional times at which to return the state (leading axis ``len(ts)``).
    full_output: return the ``diffrax.Solution``.

  Returns:
    ``x(t1)`` with the shape of ``x0`` (or ``[len(ts), *x0.shape]``), or the solution.

  Raises:
    ValueError: ``sigma < 0`` or not a scalar, ``t1 <= t0``, ``n_steps < 1``,
      ``dt <= 0``, ``tol <= 0``, an unknown adjoint (``"backsolve"`` is not supported
      for SDEs here).
    TypeError: a non-floating ``x0``; a non-callable ``drift``.
  """
  if not callable(drift):
    raise TypeError(f"drift must be callable f(t, x, args); got {drift!r}.")
  sigma = _check_sigma(sigma)
  t0, t1 = _check_interval(t0, t1)
  n = _resolve_steps(t0, t1, n_steps, dt)
  x0 = _check_state(x0)
  _checks.check_choice(adjoint, "adjoint", ("recursive", "direct"))
  step = (t1 - t0) / n
  tol = step / 4 if tol is None else _checks.check_float(tol, "tol", minimum=0.0,
                                                          strict_min=True)
  brownian = diffrax.VirtualBrownianTree(
      t0, t1, tol=tol, shape=jax.ShapeDtypeStruct(x0.shape, x0.dtype), key=key)
  diffusion = _AdditiveNoise(tuple(x0.shape), x0.dtype)
  terms = diffrax.MultiTerm(diffrax.ODETerm(_Drift(drift)),
                            diffrax.ControlTerm(diffusion, brownian))
  sigma = jnp.asarray(sigma, x0.dtype)
  sol = diffrax.diffeqsolve(
      terms, diffrax.Euler(), t0, t1, step, x0, args=(args, sigma), saveat=_saveat(ts),
      stepsize_controller=diffrax.ConstantStepSize(), max_steps=n + 1,
      adjoint=_adjoint(adjoint))
  if full_output:
    return sol
  return sol.ys if ts is not None else sol.ys[0]


# ------------------------------------------------------------------------ modules
class ODEBlock(nn.Module):
  """A continuous-depth block ``x -> x(T)`` with ``dx/dt = field(t, x)``, ``x(0) = x``.

  The vector field is any Flax module called as ``field(t, x)`` (``t`` a scalar
  array) or ``field(x)`` when ``time_dependent=False``, returning an array of the
  shape of ``x``.  Its parameters live under ``params/field`` and are passed to diffrax
  through ``args``, so they get gradients under every adjoint.  The field must be
  stateless at apply time (no mutable batch statistics, no RNG streams).

  Forward Euler with ``n_steps = L`` is exactly ``L`` residual blocks
  ``x <- x + (T / L) * field(t, x)`` with shared weights.

  Attributes:
    field: the vector-field module.
    t1: final time ``T`` (> 0); integration runs on ``[0, T]``.
    solver: diffrax solver name (see :func:`solve_ode`), default ``"euler"``.
    n_steps: number of steps (fixed solvers) or ``T / dt0`` (adaptive).
    dt: step size overriding ``n_steps`` when given.
    adaptive: see :func:`solve_ode`.
    rtol: PID relative tolerance.
    atol: PID absolute tolerance.
    max_steps: adaptive step budget.
    adjoint: ``"recursive"``, ``"backsolve"`` or ``"direct"``.
    checkpoints: solver states stored for a ``"recursive"`` gradient (default 16;
      ``None`` for diffrax's ``sqrt(2 max_steps)``); see :func:`solve_ode`.
    time_dependent: call ``field(t, x)`` (True) or ``field(x)``.

  Statistics: every call sows :func:`ode_stats` (``num_steps``, ``num_accepted``,
  ``num_rejected``, ``nfe`` and, unless ``adjoint="backsolve"``, ``nfe_backward``) into
  the :data:`ODE_STATS` collection: ``logits, state = model.apply(variables, x,
  mutable=[ODE_STATS])`` gives them as ``state["ode_stats"][...]["nfe"]`` (a tuple with
  one entry per call), ready to log.  Without ``mutable`` nothing is stored.

  Call: ``block.apply(variables, x, train=False)`` (``train`` is accepted for a
  uniform model interface and ignored by the ODE).

  Raises:
    ValueError / TypeError: as :func:`solve_ode` (at construction for bad solver
      settings); a field whose output shape differs from its input.
  """
  field: nn.Module
  t1: float = 1.0
  solver: str = "euler"
  n_steps: int = 10
  dt: float | None = None
  adaptive: bool | None = None
  rtol: float = 1e-3
  atol: float = 1e-6
  max_steps: int = 4096
  adjoint: str = "recursive"
  checkpoints: int | None = DEFAULT_CHECKPOINTS
  time_dependent: bool = True

  def __post_init__(self):
    _check_interval(0.0, self.t1)
    _resolve_steps(0.0, self.t1, self.n_steps, self.dt)
    _, adaptive = _solver(self.solver, self.adaptive)
    _checks.check_choice(self.adjoint, "adjoint", _ADJOINTS)
    if self.adjoint == "unrolled":
      _check_unrolled(self.solver, adaptive)
    _checks.check_float(self.rtol, "rtol", minimum=0.0, strict_min=True)
    _checks.check_float(self.atol, "atol", minimum=0.0, strict_min=True)
    _checks.check_int(self.max_steps, "max_steps", minimum=1)
    _check_checkpoints(self.checkpoints)
    super().__post_init__()

  def _vector_field(self, x: Array) -> tuple[VectorField, Any]:
    """The field as a pure function ``f(t, x, variables)`` plus its variables."""
    field = self.field
    if self.is_initializing():  # create the field's parameters outside the solver
      t = jnp.zeros((), x.dtype)
      field(t, x) if self.time_dependent else field(x)
    module, variables = field.unbind()
    if self.adjoint == "unrolled" and getattr(module, "loop_conv", False):
      module = module.clone(loop_conv=False)   # no solver loop: the plain conv rule
    return _ModuleField(module, bool(self.time_dependent)), variables

  def _ode(self, x: Array, f: VectorField, variables: Any) -> Array:
    sol = solve_ode(f, x, variables, t0=0.0, t1=self.t1, solver=self.solver,
                    n_steps=self.n_steps, dt=self.dt, adaptive=self.adaptive,
                    rtol=self.rtol, atol=self.atol, max_steps=self.max_steps,
                    adjoint=self.adjoint, checkpoints=self.checkpoints,
                    full_output=True)
    if not self.is_initializing():  # statistics are not variables of the model
      for name, value in ode_stats(sol, self.solver, self.adjoint, self.adaptive).items():
        self.sow(ODE_STATS, name, value)
    return sol.ys[0]

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    f, variables = self._vector_field(x)
    return self._ode(x, f, variables)


class SDEBlock(ODEBlock):
  """A stochastic continuous-depth block: ``dx = field(t, x) dt + sigma dB`` on ``[0, T]``.

  The continuous counterpart of a stage of EnResNet blocks: solved by Euler–Maruyama
  (``diffrax.Euler`` on ``MultiTerm(ODETerm, ControlTerm)``) in ``n_steps`` equal steps,
  on a ``VirtualBrownianTree`` keyed from the ``"noise"`` RNG stream
  (``rngs={"noise": key}``): a fixed key gives a fixed output.  The noise is additive,
  isotropic, with absolute scale ``sigma``.

  With ``sigma == 0`` (or in evaluation mode with ``at_test=False``) the block is the
  :class:`ODEBlock` with the configured ``solver`` and needs no key.

  The other attributes are those of :class:`ODEBlock`; ``solver``, ``adaptive``, the
  tolerances and ``adjoint="backsolve"`` only apply to the noiseless solve, the SDE
  solve differentiates with ``"recursive"``.

  Attributes:
    sigma: diffusion coefficient (>= 0), default 0.1.
    at_test: also draw noise when ``train=False`` (the EnResNet convention).
    tol: Brownian-tree resolution; default ``dt / 4``.

  Raises:
    ValueError: ``sigma < 0``; noise needed but no ``"noise"`` key given; as
      :func:`solve_sde` / :func:`solve_ode`.
  """
  sigma: float = 0.1
  at_test: bool = True
  tol: float | None = None

  def active(self, train: bool) -> bool:
    """Whether noise is drawn in this mode."""
    sigma = _check_sigma(self.sigma)
    return not _is_zero(sigma) and (train or self.at_test)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    f, variables = self._vector_field(x)
    if not self.active(train):
      return self._ode(x, f, variables)
    if not self.has_rng("noise"):
      raise ValueError(
          f"SDEBlock(sigma={self.sigma}) draws a Brownian path but apply got no noise key: "
          "pass rngs={'noise': key} (or use sigma=0 / at_test=False for a deterministic "
          "block).")
    adjoint = "recursive" if self.adjoint == "backsolve" else self.adjoint
    return solve_sde(f, x, self.sigma, self.make_rng("noise"), variables, t0=0.0,
                     t1=self.t1, n_steps=self.n_steps, dt=self.dt, tol=self.tol,
                     adjoint=adjoint)


# ------------------------------------------------------------------ Feynman–Kac
def feynman_kac(f_terminal: Callable[[Array], Array], drift: Callable[[Array, Array], Array],
                x0: Array, sigma: float, key: Array, n_paths: int = 1000,
                n_steps: int = 20, T: float = 1.0, *,
                batch_size: int | None = None) -> tuple[Array, Array]:
  """Monte-Carlo Feynman–Kac estimate of ``u(x0, 0) = E[f(x(T)) | x(0) = x0]``.

  ``u`` solves the backward convection–diffusion (Kolmogorov) equation

      u_t + drift(t, x) . grad u + (sigma^2 / 2) Laplace u = 0,   u(x, T) = f(x),

  and ``x(t)`` is the Itô process ``dx = drift(t, x) dt + sigma dB``, simulated on
  ``n_paths`` independent paths (``vmap``) by :func:`solve_sde`.  This is what an
  ensemble of EnResNets approximates (Wang et al. 2019, Eq. 10), with the network's
  blocks as the drift and the softmax layer as ``f``: an average of probabilities.
  :class:`~jaxdefense.models.Ensemble` averages logits instead, as the authors' code
  does, which is ``softmax(E[logits])``, not this expectation.

  The estimate carries the Euler–Maruyama bias (weak order 1 in ``T / n_steps``; zero
  for a constant or zero drift) and a Monte-Carlo error of about one standard error.

  Args:
    f_terminal: ``f(x) -> array`` (any shape, e.g. a scalar or class probabilities),
      applied to one path's terminal state of the shape of ``x0``.
    drift: ``F(t, x) -> dx/dt`` of the shape of ``x``.
    x0: starting point, floating array of any shape (one point; ``vmap`` the function
      over a batch of points).
    sigma: diffusion coefficient (>= 0).
    key: PRNG key; path ``i`` uses ``jax.random.split(key, n_paths)[i]``.
    n_paths: number of Monte-Carlo paths (>= 2 for a standard error).
    n_steps: Euler–Maruyama steps per path (>= 1).
    T: terminal time (> 0).
    batch_size: simulate the paths in chunks of this many (``lax.map``) to bound
      memory; default all at once.

  Returns:
    ``(estimate, stderr)``: the sample mean of ``f(x(T))`` over paths and its standard
    error ``std / sqrt(n_paths)`` (``ddof=1``), both of the shape of ``f``'s output.

  Raises:
    ValueError: ``sigma < 0``, ``n_paths < 2``, ``n_steps < 1``, ``T <= 0``,
      ``batch_size`` not dividing ``n_paths``.
    TypeError: non-callable ``f_terminal`` or ``drift``; a non-floating ``x0``.
  """
  if not callable(f_terminal):
    raise TypeError(f"f_terminal must be callable f(x) -> array; got {f_terminal!r}.")
  if not callable(drift):
    raise TypeError(f"drift must be callable F(t, x) -> dx/dt; got {drift!r}.")
  sigma = _check_sigma(sigma)
  n_paths = _checks.check_int(n_paths, "n_paths", minimum=2)
  n_steps = _checks.check_int(n_steps, "n_steps", minimum=1)
  T = _checks.check_float(T, "T", minimum=0.0, strict_min=True)
  x0 = _check_state(x0)
  if batch_size is not None:
    batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
    if n_paths % batch_size:
      raise ValueError(f"batch_size must divide n_paths={n_paths}; got {batch_size}.")

  def one_path(k):
    xt = solve_sde(_TimeDrift(drift), x0, sigma, k, t1=T, n_steps=n_steps)
    return f_terminal(xt)

  keys = jax.random.split(key, n_paths)
  if batch_size is None or batch_size == n_paths:
    values = jax.vmap(one_path)(keys)
  else:
    chunks = keys.reshape((n_paths // batch_size, batch_size) + keys.shape[1:])
    values = jax.lax.map(jax.vmap(one_path), chunks)
    values = values.reshape((n_paths,) + values.shape[2:])
  mean = jnp.mean(values, axis=0)
  stderr = jnp.std(values, axis=0, ddof=1) / math.sqrt(n_paths)
  return mean, stderr
