"""Pseudo-spectral solver for the 2-D convection–diffusion equation (EnResNet, Fig. 2).

On the periodic unit square ``[0, 1)^2`` we solve

    u_t + v . grad u = (sigma^2 / 2) Laplace u            (form="advective")
    u_t + div(v u)   = (sigma^2 / 2) Laplace u            (form="conservative")

with FFTs in space.  Diffusion is integrated exactly by an integrating factor
``exp(-(sigma^2 / 2) |k|^2 t)``; advection by the classical fourth-order Runge–Kutta
scheme in the integrating-factor variables (IFRK4, Trefethen 2000, ch. 10), with the
products formed on the grid and de-aliased by the 2/3 rule.  With ``v = 0`` the solver
is exact (heat semigroup); with ``sigma = 0`` it is RK4 for pure transport.

The backward equation of the EnResNet paper, ``u_t + F . grad u + (sigma^2/2) Laplace u
= 0`` with ``u(., 1) = f``, is this forward problem for ``w(x, s) = u(x, 1 - s)`` with
``v = -F`` and ``w(., 0) = f``: its ``t = 0`` solution is
``solve_convection_diffusion(f, -F, sigma, 1.0, n_steps)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import _checks

Array = jax.Array

_FORMS = ("advective", "conservative")


def wavenumbers(n: int, length: float = 1.0, dtype: Any = jnp.float32) -> tuple[Array, Array]:
  """Angular wavenumbers ``(kx, ky)`` of an ``n x n`` periodic grid, each ``[n, n]``.

  Axis 0 of a field is ``x`` and axis 1 is ``y`` (``u[i, j] = u(i h, j h)`` with
  ``h = length / n``); ``k = 2 pi m / length`` with ``m`` the FFT frequency index.
  Computed in float64 and rounded once to ``dtype`` (a float32 ``k`` would cap a
  float64 solve's phase accuracy at about 1e-7).
  """
  n = _checks.check_int(n, "n", minimum=2)
  k = 2.0 * np.pi * np.fft.fftfreq(n, d=length / n)
  kx, ky = np.meshgrid(k, k, indexing="ij")
  return jnp.asarray(kx, dtype), jnp.asarray(ky, dtype)


def dealias_mask(n: int) -> Array:
  """The 2/3-rule dealiasing mask of an ``n x n`` periodic grid.

  ``mask[i, j] = 1`` where both FFT frequency indices satisfy ``|m_x|, |m_y| < n / 3``
  (``m`` as ordered by ``numpy.fft.fftfreq(n, 1 / n)``, matching :func:`wavenumbers`),
  else 0; multiply a spectrum by it before a quadratic product to remove aliasing.

  Args:
    n: grid size, an integer ``>= 2``.

  Returns:
    float32 ``[n, n]`` of zeros and ones.

  Raises:
    TypeError: ``n`` is not an integer.  ValueError: ``n < 2``.
  """
  n = _checks.check_int(n, "n", minimum=2)
  m = np.abs(np.fft.fftfreq(n, d=1.0 / n))
  keep = m < n / 3.0
  return jnp.asarray(np.outer(keep, keep), jnp.float32)


def grid(n: int, length: float = 1.0) -> tuple[Array, Array]:
  """Coordinates of the ``n x n`` periodic grid on ``[0, length)^2``.

  ``X[i, j] = i h`` and ``Y[i, j] = j h`` with ``h = length / n`` (axis 0 is ``x``, as in
  :func:`wavenumbers`); the point ``length`` itself is not included.

  Args:
    n: grid size, an integer ``>= 2``.
    length: side of the periodic square; default 1.0.

  Returns:
    ``(X, Y)``, each float32 ``[n, n]``.

  Raises:
    TypeError: ``n`` is not an integer.  ValueError: ``n < 2``.
  """
  n = _checks.check_int(n, "n", minimum=2)
  s = np.arange(n) * (length / n)
  x, y = np.meshgrid(s, s, indexing="ij")
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _check_field(u0: Any) -> Array:
  _checks.check_rank(u0, "u0", (2,), "a scalar field [N, N] on the periodic unit square")
  n0, n1 = u0.shape
  if n0 != n1:
    raise ValueError(f"u0 must be on a square grid [N, N]; got shape {tuple(u0.shape)}.")
  if n0 < 4 or n0 % 2:
    raise ValueError(f"u0 must have an even grid size N >= 4; got N = {n0}.")
  _checks.check_floating(u0, "u0")
  _checks.check_finite(u0, "u0")
  return jnp.asarray(u0)


def _check_velocity(velocity: Any, n: int) -> Any:
  if callable(velocity):
    return velocity
  v = jnp.asarray(velocity)
  if v.shape == (2,):
    v = jnp.broadcast_to(v[:, None, None], (2, n, n))
  if v.shape != (2, n, n):
    raise ValueError(f"velocity must have shape (2, {n}, {n}) (components v_x, v_y on the "
                     f"grid of u0) or (2,) for a constant field, or be a callable "
                     f"velocity(t) -> (2, {n}, {n}); got {_checks._summary(velocity)}.")
  _checks.check_finite(v, "velocity")
  return v


def solve_convection_diffusion(u0: Array, velocity: Any, sigma: float, t_final: float,
                               n_steps: int, *, form: str = "advective",
                               dealias: bool = True, save_every: int | None = None
                               ) -> Array:
  """Solve ``u_t + v . grad u = (sigma^2 / 2) Laplace u`` on the periodic unit square.

  Fourier pseudo-spectral discretisation in space; integrating-factor RK4 in time
  (diffusion exact, advection fourth order), 2/3-rule de-aliasing of the advection
  term (``dealias=True``: the initial field, the velocity and every advection term
  are projected onto the modes ``|m| < N / 3``).  One ``lax.scan`` over the steps, so
  it compiles once per grid size and step count.

  Args:
    u0: initial field ``[N, N]`` (``N`` even, >= 4), ``u0[i, j] = u(i/N, j/N)``.
    velocity: ``(2, N, N)`` array (``v_x``, ``v_y`` on the grid), a constant ``(2,)``
      velocity, or a callable ``velocity(t) -> (2, N, N)`` for a time-dependent field.
    sigma: diffusion coefficient (>= 0); the diffusivity is ``sigma^2 / 2``.
    t_final: final time (>= 0).
    n_steps: number of time steps (>= 1); ``dt = t_final / n_steps``.  RK4 is stable
      for ``dt * (2 pi N / 3) * max(|v_x| + |v_y|) <~ 2.8``: the kept wavenumbers fill
      a square with ``|k_x|, |k_y| < 2 pi N / 3``, so ``|k . v|`` reaches
      ``2 pi N / 3 * (|v_x| + |v_y|)`` along a diagonal velocity (without dealiasing,
      ``pi N`` in place of ``2 pi N / 3``).
    form: ``"advective"`` (``v . grad u``, the Kolmogorov / Feynman–Kac equation;
      conserves the mean of ``u`` when ``div v = 0``) or ``"conservative"``
      (``div(v u)``, conserves the mean for any ``v``).
    dealias: apply the 2/3 rule.
    save_every: if given, also return the field every ``save_every`` steps.

  Returns:
    ``u(t_final)`` as ``[N, N]``; with ``save_every``, ``[n_steps // save_every + 1, N,
    N]`` snapshots starting with ``u0`` (de-aliased) and ending at the last saved step.

  Raises:
    ValueError: a non-square or odd grid, ``sigma < 0``, ``t_final < 0``,
      ``n_steps < 1``, a velocity of the wrong shape, NaNs, an unknown ``form``,
      ``save_every`` not dividing ``n_steps``.
    TypeError: a non-floating ``u0``; non-integer ``n_steps``.
  """
  u0 = _check_field(u0)
  n = u0.shape[0]
  sigma = _checks.check_float(sigma, "sigma", minimum=0.0)
  t_final = _checks.check_float(t_final, "t_final", minimum=0.0)
  n_steps = _checks.check_int(n_steps, "n_steps", minimum=1)
  _checks.check_choice(form, "form", _FORMS)
  if save_every is not None:
    save_every = _checks.check_int(save_every, "save_every", minimum=1)
    if n_steps % save_every:
      raise ValueError(f"save_every must divide n_steps={n_steps}; got {save_every}.")
  velocity = _check_velocity(velocity, n)
  if callable(velocity):
    return _solve_static_velocity(u0, sigma, t_final, velocity, n_steps, form, dealias,
                                  save_every)
  return _solve_jit(u0, velocity, sigma, t_final, n_steps, form, dealias, save_every)


def _solve(u0: Array, velocity: Any, sigma: Any, t_final: Any, n_steps: int,
           form: str, dealias: bool, save_every: int | None) -> Array:
  n = u0.shape[0]
  dtype = u0.dtype
  kx, ky = wavenumbers(n, dtype=dtype)
  mask = dealias_mask(n).astype(dtype) if dealias else jnp.ones((n, n), dtype)
  dt = t_final / n_steps
  lap = (0.5 * sigma ** 2) * (kx ** 2 + ky ** 2)
  e_half = jnp.exp(-lap * (dt / 2))
  e_full = e_half * e_half
  fft, ifft = jnp.fft.fft2, lambda a: jnp.real(jnp.fft.ifft2(a))

  def project(v):  # band-limit the velocity so the products are alias-free
    return ifft(mask * fft(v)) if dealias else v

  if callable(velocity):
    def vel(t):
      v = jnp.asarray(velocity(t), dtype)
      return jax.vmap(project)(v)
  else:
    v_const = jax.vmap(project)(jnp.asarray(velocity, dtype))
    vel = lambda t: v_const

  def advection(uh, t):  # minus the transport term, in Fourier space
    vx, vy = vel(t)
    if form == "advective":
      ux, uy = ifft(1j * kx * uh), ifft(1j * ky * uh)
      return -mask * fft(vx * ux + vy * uy)
    u = ifft(uh)
    return -mask * (1j * kx * fft(vx * u) + 1j * ky * fft(vy * u))

  def step(uh, t):
    a = advection(uh, t)
    b = advection(e_half * (uh + 0.5 * dt * a), t + dt / 2)
    c = advection(e_half * uh + 0.5 * dt * b, t + dt / 2)
    d = advection(e_full * uh + dt * e_half * c, t + dt)
    return e_full * uh + (dt / 6) * (e_full * a + 2 * e_half * (b + c) + d)

  uh0 = mask * fft(u0)
  chunk = save_every or n_steps

  def run_chunk(uh, t_start):
    def body(carry, i):
      return step(carry, t_start + i * dt), None
    uh, _ = jax.lax.scan(body, uh, jnp.arange(chunk, dtype=dtype))
    return uh, ifft(uh)

  starts = jnp.arange(n_steps // chunk, dtype=dtype) * (chunk * dt)
  uh_final, snaps = jax.lax.scan(run_chunk, uh0, starts)
  if save_every is None:
    return ifft(uh_final).astype(dtype)
  return jnp.concatenate([ifft(uh0)[None], snaps], axis=0).astype(dtype)


# Compiled once per grid size, step count and options; sigma, t_final, u0 and an array
# velocity are traced (a callable velocity is static, compared by identity).
_solve_jit = jax.jit(_solve, static_argnums=(4, 5, 6, 7))
_solve_static_velocity = jax.jit(
    lambda u0, sigma, t_final, velocity, *static: _solve(u0, velocity, sigma, t_final,
                                                         *static),
    static_argnums=(3, 4, 5, 6, 7))
