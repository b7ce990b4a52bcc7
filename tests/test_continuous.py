"""Continuous-depth blocks, Feynman–Kac estimator and the pseudo-spectral solver.

Each test checks a piece of mathematics: Euler = residual blocks, solver orders,
sigma -> 0 strong convergence of the SDE block, Ornstein–Uhlenbeck moments,
closed-form Feynman–Kac expectations, exact heat decay, exact transport, mass
conservation, and clear errors for bad inputs.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense.dynamics import (ODEBlock, SDEBlock, dealias_mask, feynman_kac, grid,
                                 solve_convection_diffusion, solve_ode, solve_sde,
                                 wavenumbers)

KEY = jax.random.key(0)


class Linear(fnn.Module):
  """``F(t, x) = -theta * x`` (no parameters): an Ornstein–Uhlenbeck drift."""
  theta: float = 1.0

  def __call__(self, t, x):
    return -self.theta * x


class TanhField(fnn.Module):
  """A small trainable time-dependent field ``tanh(W x + b + t c)`` on ``[B, d]``."""

  @fnn.compact
  def __call__(self, t, x):
    c = self.param("c", fnn.initializers.normal(1.0), (x.shape[-1],))
    return jnp.tanh(fnn.Dense(x.shape[-1])(x) + t * c)


def _linear_rhs(t, x, a):
  return a @ x


A = jnp.array([[-0.5, 1.0], [-1.0, -0.5]])
X0 = jnp.array([1.0, 0.5])


def _exact_linear(t):
  return jax.scipy.linalg.expm(A * t) @ X0


def _residual_net(p, x, n, T):
  """``n`` weight-shared residual blocks ``x <- x + (T / n) F(t_i, x)``."""
  for i in range(n):
    x = x + (T / n) * TanhField().apply(p, i * T / n, x)
  return x


_residual_net = jax.jit(_residual_net, static_argnums=(2, 3))


# ----------------------------------------------------------------------- ODE
def test_euler_block_is_a_residual_network_with_gradients():
  # forward Euler with n steps = n weight-shared residual blocks x <- x + (T/n) F(t, x)
  x = jax.random.normal(KEY, (3, 4))
  field = TanhField()
  p = field.init(KEY, 0.0, x)
  v = {"params": {"field": p["params"]}}
  n, T = 5, 2.0
  block = ODEBlock(field, t1=T, n_steps=n)
  ref = _residual_net(p, x, n, T)
  np.testing.assert_allclose(block.apply(v, x), ref, rtol=1e-5, atol=1e-6)
  # gradients reach the field's parameters; central differences agree
  loss = jax.jit(lambda v: jnp.sum(block.apply(v, x) ** 2))
  g = jax.jit(jax.grad(loss))(v)
  assert all(float(jnp.linalg.norm(a)) > 0 for a in jax.tree_util.tree_leaves(g))
  eps = 1e-2
  c = v["params"]["field"]["c"]
  shifted = lambda d: {"params": {"field": {**v["params"]["field"], "c": c.at[0].add(d)}}}
  fd = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
  np.testing.assert_allclose(g["params"]["field"]["c"][0], fd, rtol=2e-2, atol=1e-3)
  # init creates the parameters under params/field
  assert jax.tree_util.tree_structure(block.init(KEY, x)) == jax.tree_util.tree_structure(v)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_fixed_step_solver_order(solver, order):
  ns = [8, 32]
  errs = [float(jnp.linalg.norm(solve_ode(_linear_rhs, X0, A, t1=2.0, solver=solver,
                                          n_steps=n) - _exact_linear(2.0))) for n in ns]
  slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
  assert abs(slope - order) < 0.2, (errs, slope)


@pytest.mark.parametrize("solver", ["tsit5", "dopri5"])
def test_adaptive_solvers_meet_tolerance(solver):
  ts = jnp.linspace(0.5, 2.0, 4)
  sol = solve_ode(_linear_rhs, X0, A, t1=2.0, solver=solver, rtol=1e-6, atol=1e-8, ts=ts,
                  full_output=True)
  assert sol.ys.shape == (4, 2)
  for t, y in zip(ts, sol.ys):
    np.testing.assert_allclose(y, _exact_linear(t), atol=1e-5)
  assert int(sol.stats["num_steps"]) > 2  # really adaptive, not one big step


def test_dt_overrides_n_steps():
  a = solve_ode(_linear_rhs, X0, A, t1=1.0, dt=0.25)
  b = solve_ode(_linear_rhs, X0, A, t1=1.0, n_steps=4)
  np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.slow
def test_backsolve_adjoint_gradients_are_close_to_recursive():
  x = jax.random.normal(KEY, (3, 4))
  v = ODEBlock(TanhField()).init(KEY, x)

  def loss(v, adjoint):
    return jnp.sum(ODEBlock(TanhField(), solver="heun", n_steps=8, adjoint=adjoint)
                   .apply(v, x) ** 2)
  g = jax.grad(loss)(v, "recursive")
  g_back = jax.grad(loss)(v, "backsolve")  # continuous adjoint: close, not equal
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_back)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=1e-2)


def test_autonomous_field():
  class Neg(fnn.Module):
    def __call__(self, x):
      return -x
  x = jnp.ones((2, 3))
  out = ODEBlock(Neg(), time_dependent=False, solver="tsit5", rtol=1e-6,
                 atol=1e-8).apply({}, x)
  np.testing.assert_allclose(out, np.exp(-1.0) * np.ones((2, 3)), rtol=1e-5)


# ----------------------------------------------------------------------- SDE
def test_sde_block_noise_is_keyed_and_off_without_sigma():
  x = jax.random.normal(KEY, (3, 4))
  v = ODEBlock(TanhField(), n_steps=6).init(KEY, x)
  ode = ODEBlock(TanhField(), n_steps=6).apply(v, x)
  np.testing.assert_allclose(SDEBlock(TanhField(), sigma=0.0, n_steps=6).apply(v, x), ode,
                             rtol=1e-6)  # no noise key needed
  np.testing.assert_allclose(
      SDEBlock(TanhField(), sigma=0.3, n_steps=6, at_test=False).apply(v, x), ode, rtol=1e-6)
  block = SDEBlock(TanhField(), sigma=0.3, n_steps=6)
  f = jax.jit(lambda v, x, k: block.apply(v, x, rngs={"noise": k}))
  a = f(v, x, jax.random.key(1))
  b = f(v, x, jax.random.key(1))
  c = f(v, x, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3
  assert float(jnp.max(jnp.abs(a - ode))) > 1e-2
  with pytest.raises(ValueError, match="noise key"):
    block.apply(v, x)


def test_sde_converges_strongly_to_ode_linearly_in_sigma():
  x = jax.random.normal(KEY, (16, 4))
  p = TanhField().init(KEY, 0.0, x)
  field = lambda t, y, q: TanhField().apply(q, t, y)
  sigmas = jnp.array([1e-1, 3e-2, 1e-2, 3e-3, 0.0])
  # one compiled solve, vmapped over a traced sigma, the same Brownian path (key) for all
  outs = jax.jit(jax.vmap(lambda s: solve_sde(field, x, s, KEY, p, n_steps=20)))(sigmas)
  ode = outs[-1]  # sigma = 0: forward Euler of the ODE
  np.testing.assert_allclose(ode, _residual_net(p, x, 20, 1.0), rtol=1e-5, atol=1e-5)
  errs = np.sqrt(np.mean((np.asarray(outs[:-1]) - np.asarray(ode)) ** 2, axis=(1, 2)))
  slope = np.polyfit(np.log(sigmas[:-1]), np.log(errs), 1)[0]
  assert abs(slope - 1.0) < 0.1, (errs, slope)
  assert errs[-1] < 1e-2


def test_ornstein_uhlenbeck_moments():
  # dx = -theta x dt + sigma dB: every entry of the [P, 1] state is an independent path.
  theta, sigma, T, n, x0, paths = 1.5, 0.8, 1.0, 50, 2.0, 4000
  block = SDEBlock(Linear(theta), sigma=sigma, t1=T, n_steps=n)
  x = jnp.full((paths, 1), x0)
  out = np.asarray(block.apply({}, x, rngs={"noise": KEY}))[:, 0]
  dt = T / n
  r = 1 - theta * dt  # exact moments of the Euler–Maruyama recursion
  mean_em = x0 * r ** n
  var_em = sigma ** 2 * dt * (1 - r ** (2 * n)) / (1 - r ** 2)
  se_mean = np.sqrt(var_em / paths)
  se_var = var_em * np.sqrt(2 / (paths - 1))
  assert abs(out.mean() - mean_em) < 4 * se_mean
  assert abs(out.var(ddof=1) - var_em) < 4 * se_var
  # and the continuous OU moments, up to the O(dt) bias of the scheme
  mean_ou = x0 * np.exp(-theta * T)
  var_ou = sigma ** 2 / (2 * theta) * (1 - np.exp(-2 * theta * T))
  assert abs(out.mean() - mean_ou) < 4 * se_mean + 2 * theta * dt * abs(mean_ou)
  assert abs(out.var(ddof=1) - var_ou) < 4 * se_var + 2 * theta * dt * var_ou


# --------------------------------------------------------------- Feynman–Kac
def test_feynman_kac_matches_closed_forms():
  # Constant drift b: x(T) ~ N(x0 + b T, s2 I) with s2 = sigma^2 T (EM is exact), so
  #   E|x(T)|^2 = |x0 + b T|^2 + d s2                       (heat equation, quadratic f)
  #   E exp(-|x(T)|^2 / 2) = (1 + s2)^{-d/2} exp(-|x0 + b T|^2 / (2 (1 + s2)))
  #   E x(T)_0 = x0_0 + b_0 T
  d, T = 3, 2.0
  x0 = jnp.array([0.3, -1.0, 0.5])
  f = lambda x: jnp.stack([jnp.sum(x ** 2), jnp.exp(-jnp.sum(x ** 2) / 2), x[0]])

  @jax.jit
  def estimate(b, sigma):  # one compile for every drift and sigma (both traced)
    return feynman_kac(f, lambda t, x: b, x0, sigma, KEY, n_paths=4000, n_steps=4, T=T,
                       batch_size=1000)
  for b in (jnp.zeros(d), jnp.array([0.2, 0.1, -0.4])):
    for sigma in (0.5, 0.0):
      est, se = estimate(b, sigma)
      assert est.shape == se.shape == (3,)
      m = x0 + b * T
      s2 = sigma ** 2 * T
      exact = np.array([float(jnp.sum(m ** 2)) + d * s2,
                        (1 + s2) ** (-d / 2) * np.exp(-float(jnp.sum(m ** 2)) / (2 * (1 + s2))),
                        float(m[0])])
      if sigma == 0:  # the transport solution: f along the characteristic, no spread
        np.testing.assert_allclose(est, exact, rtol=1e-5)
        assert float(jnp.max(se)) < 1e-5
      else:
        assert np.all(np.asarray(se) > 0)
        assert float(se[0]) < 0.05 * exact[0]
        assert np.all(np.abs(np.asarray(est) - exact) < 4 * np.asarray(se)), (est, se, exact)


# ------------------------------------------------------------------ errors
def test_bad_inputs_are_clear_errors():
  f = lambda t, y, a: -y
  x = jnp.ones(3)
  with pytest.raises(ValueError, match="sigma must be >= 0"):
    solve_sde(f, x, -0.1, KEY)
  with pytest.raises(ValueError, match="sigma must be a scalar"):
    solve_sde(f, x, jnp.ones(3), KEY)
  with pytest.raises(ValueError, match="n_steps must be >= 1"):
    solve_ode(f, x, n_steps=0)
  with pytest.raises(TypeError, match="n_steps must be an integer"):
    solve_ode(f, x, n_steps=2.5)
  with pytest.raises(ValueError, match="dt must be > 0"):
    solve_ode(f, x, dt=0.0)
  with pytest.raises(ValueError, match="t1 must be > t0"):
    solve_ode(f, x, t0=1.0, t1=1.0)
  with pytest.raises(ValueError, match="solver must be one of"):
    solve_ode(f, x, solver="rk45")
  with pytest.raises(ValueError, match="no error estimate"):
    solve_ode(f, x, solver="euler", adaptive=True)
  with pytest.raises(ValueError, match="adjoint must be one of"):
    solve_ode(f, x, adjoint="magic")
  with pytest.raises(TypeError, match="x0 must be a floating"):
    solve_ode(f, jnp.ones(3, jnp.int32))
  with pytest.raises(TypeError, match="vector_field must be callable"):
    solve_ode(None, x)
  with pytest.raises(ValueError, match="sigma must be >= 0"):
    SDEBlock(Linear(), sigma=-1.0).apply({}, x[None], rngs={"noise": KEY})
  with pytest.raises(ValueError, match="n_steps must be >= 1"):
    SDEBlock(Linear(), n_steps=0).apply({}, x[None], rngs={"noise": KEY})
  g = lambda x: x[0]
  drift = lambda t, x: -x
  with pytest.raises(ValueError, match="sigma must be >= 0"):
    feynman_kac(g, drift, x, -1.0, KEY)
  with pytest.raises(ValueError, match="n_paths must be >= 2"):
    feynman_kac(g, drift, x, 0.1, KEY, n_paths=1)
  with pytest.raises(ValueError, match="n_steps must be >= 1"):
    feynman_kac(g, drift, x, 0.1, KEY, n_steps=0)
  with pytest.raises(ValueError, match="T must be > 0"):
    feynman_kac(g, drift, x, 0.1, KEY, T=0.0)
  with pytest.raises(ValueError, match="batch_size must divide"):
    feynman_kac(g, drift, x, 0.1, KEY, n_paths=10, batch_size=3)
  with pytest.raises(TypeError, match="f_terminal must be callable"):
    feynman_kac(1.0, drift, x, 0.1, KEY)


# ------------------------------------------------------------ pseudo-spectral
N = 32


def _mode(mx, my, shift=(0.0, 0.0)):
  X, Y = (np.asarray(a) for a in grid(N))
  return np.cos(2 * np.pi * (mx * (X - shift[0]) + my * (Y - shift[1]))).astype(np.float32)


def test_heat_equation_fourier_mode_decays_exactly():
  sigma, t = 0.2, 0.7
  for mx, my in [(1, 0), (2, 3), (-4, 1)]:
    u = solve_convection_diffusion(_mode(mx, my), jnp.zeros(2), sigma, t, 3)
    k2 = (2 * np.pi) ** 2 * (mx ** 2 + my ** 2)
    np.testing.assert_allclose(u, np.exp(-0.5 * sigma ** 2 * k2 * t) * _mode(mx, my),
                               atol=1e-6)


def test_constant_advection_is_a_shift():
  v = np.array([0.3, -0.7])
  t = 0.9

  def exact(s):  # a few modes, shifted by v s
    sh = tuple(v * s)
    return _mode(2, 1, sh) + 0.5 * _mode(1, 3, sh) - 0.25 * _mode(-5, 2, sh)
  u = solve_convection_diffusion(exact(0.0), jnp.asarray(v), 0.0, t, 100)
  np.testing.assert_allclose(u, exact(t), atol=1e-4)
  # advection + diffusion of a mode: shifted and decayed
  sigma = 0.1
  u = solve_convection_diffusion(_mode(2, 1), jnp.asarray(v), sigma, t, 100)
  decay = np.exp(-0.5 * sigma ** 2 * (2 * np.pi) ** 2 * 5 * t)
  np.testing.assert_allclose(u, decay * _mode(2, 1, shift=v * t), atol=1e-4)


def _smooth_random(rng, shape):
  """A smooth random periodic field (Gaussian filter, inside the 2/3 band), NumPy."""
  kx, ky = (np.asarray(k) for k in wavenumbers(N))
  filt = np.exp(-(kx ** 2 + ky ** 2) / (2 * (2 * np.pi * 3) ** 2)) * np.asarray(dealias_mask(N))
  z = rng.standard_normal(shape)
  return (np.real(np.fft.ifft2(np.fft.fft2(z) * filt)) * N).astype(np.float32)


def test_mass_is_conserved():
  rng = np.random.default_rng(0)
  u0 = _smooth_random(rng, (N, N)) + 1.0
  v = _smooth_random(rng, (2, N, N))
  v = v / np.max(np.abs(v))
  m0 = float(np.mean(u0))
  u = solve_convection_diffusion(u0, v, 0.05, 0.5, 100, form="conservative")
  assert abs(float(jnp.mean(u)) - m0) < 1e-5 * abs(m0)
  # advective form with a divergence-free velocity v = grad^perp psi
  kx, ky = (np.asarray(k) for k in wavenumbers(N))
  ph = np.fft.fft2(_smooth_random(rng, (N, N)))
  vdf = np.stack([np.real(np.fft.ifft2(1j * ky * ph)), -np.real(np.fft.ifft2(1j * kx * ph))])
  vdf = (vdf / np.max(np.abs(vdf))).astype(np.float32)
  snaps = np.asarray(solve_convection_diffusion(u0, vdf, 0.0, 0.5, 100, save_every=25))
  assert snaps.shape == (5, N, N)
  np.testing.assert_allclose(snaps.mean(axis=(1, 2)), m0, rtol=1e-5)
  # and, sigma = 0 with div v = 0, the L2 norm too (alias-free Galerkin transport)
  l2 = np.sqrt(np.mean(snaps.astype(np.float64) ** 2, axis=(1, 2)))
  np.testing.assert_allclose(l2, l2[0], rtol=1e-3)


def test_time_dependent_velocity():
  # v(t) = (cos t, 0): the shift is (sin T, 0).
  t = 1.2
  vel = lambda s: jnp.stack([jnp.full((N, N), jnp.cos(s)), jnp.zeros((N, N))])  # traced
  u = solve_convection_diffusion(_mode(1, 2), vel, 0.0, t, 100)
  np.testing.assert_allclose(u, _mode(1, 2, shift=(np.sin(t), 0.0)), atol=1e-4)


def test_spectral_bad_inputs_are_clear_errors():
  u = jnp.zeros((N, N))
  with pytest.raises(ValueError, match="square grid"):
    solve_convection_diffusion(jnp.zeros((N, N // 2)), jnp.zeros(2), 0.1, 1.0, 10)
  with pytest.raises(ValueError, match="rank 2"):
    solve_convection_diffusion(jnp.zeros((1, N, N)), jnp.zeros(2), 0.1, 1.0, 10)
  with pytest.raises(ValueError, match="even grid size"):
    solve_convection_diffusion(jnp.zeros((31, 31)), jnp.zeros(2), 0.1, 1.0, 10)
  with pytest.raises(ValueError, match="sigma must be >= 0"):
    solve_convection_diffusion(u, jnp.zeros(2), -0.1, 1.0, 10)
  with pytest.raises(ValueError, match="n_steps must be >= 1"):
    solve_convection_diffusion(u, jnp.zeros(2), 0.1, 1.0, 0)
  with pytest.raises(ValueError, match="t_final must be >= 0"):
    solve_convection_diffusion(u, jnp.zeros(2), 0.1, -1.0, 10)
  with pytest.raises(ValueError, match="velocity must have shape"):
    solve_convection_diffusion(u, jnp.zeros((2, N, N + 2)), 0.1, 1.0, 10)
  with pytest.raises(ValueError, match="form must be one of"):
    solve_convection_diffusion(u, jnp.zeros(2), 0.1, 1.0, 10, form="flux")
  with pytest.raises(ValueError, match="NaN"):
    solve_convection_diffusion(u.at[0, 0].set(jnp.nan), jnp.zeros(2), 0.1, 1.0, 10)
  with pytest.raises(TypeError, match="floating"):
    solve_convection_diffusion(jnp.zeros((N, N), jnp.int32), jnp.zeros(2), 0.1, 1.0, 10)
  with pytest.raises(ValueError, match="save_every must divide"):
    solve_convection_diffusion(u, jnp.zeros(2), 0.1, 1.0, 10, save_every=3)


_X64_ADVECTION = r"""
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from jaxdefense.dynamics import solve_convection_diffusion
n = 64
x, y = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
mode = lambda s: np.cos(2 * np.pi * (20 * (x - s[0]) + 7 * (y - s[1])))
v = np.array([0.3, -0.7])
for steps in (400, 1600):
  u = solve_convection_diffusion(jnp.asarray(mode((0.0, 0.0))), jnp.asarray(v), 0.0, 1.0, steps)
  assert u.dtype == jnp.float64
  print(steps, float(jnp.max(jnp.abs(u - mode(v)))))
"""


def test_float64_advection_is_fourth_order_in_time():
  """A float64 solve is not capped by float32 wavenumbers, and its time error is O(dt^4)."""
  from conftest import run_python
  proc = run_python(["-c", _X64_ADVECTION])
  assert proc.returncode == 0, proc.stderr[-2000:]
  errors = dict(map(float, line.split()) for line in proc.stdout.split("\n") if line.strip())
  assert errors[1600.0] < 1e-9, errors  # float32 wavenumbers gave 1.4e-7 here
  assert errors[400.0] / errors[1600.0] > 100, errors  # 4^4 = 256 for a 4th-order method
