"""SONet: skew-symmetric fields (stability), solvers and their statistics, the zoo presets."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import models
from jaxdefense.dynamics import DEFAULT_CHECKPOINTS, ODE_STATS, ODEBlock, ode_stats, solve_ode
from jaxdefense.nn import SkewSymmetricConv, SkewSymmetricDense, skew_kernel

KEY = jax.random.key(0)


def _field_fn(field, variables):
  return lambda t, x, args: field.apply(args, x)


def _conv_setup(gamma=0.0, act="identity", use_bias=False, c=4, k=3):
  field = SkewSymmetricConv(gamma=gamma, act=act, use_bias=use_bias, kernel_size=k)
  x = jax.random.normal(KEY, (2, 6, 5, c))
  return field, field.init(jax.random.key(1), x), x


# ------------------------------------------------------------------ the operators
@pytest.mark.parametrize("k", [1, 3, 5])
def test_conv_field_is_skew_adjoint(k):
  field, v, _ = _conv_setup(k=k)
  u = jax.random.normal(jax.random.key(2), (2, 6, 5, 4))
  w = jax.random.normal(jax.random.key(3), (2, 6, 5, 4))
  su, sw = field.apply(v, u), field.apply(v, w)
  lhs, rhs = float(jnp.vdot(u, sw)), float(-jnp.vdot(su, w))
  assert abs(lhs - rhs) < 1e-4 * (1 + abs(lhs))
  assert abs(float(jnp.vdot(u, su))) < 1e-4 * float(jnp.vdot(u, u))  # <u, S u> = 0


def test_conv_transpose_is_the_adjoint_of_the_same_kernel():
  """K^T is the adjoint of K (by autodiff), not a second kernel."""
  kernel = jax.random.normal(KEY, (3, 3, 4, 4))
  x = jax.random.normal(jax.random.key(1), (1, 7, 6, 4))
  conv = lambda z, w: jax.lax.conv_general_dilated(z, w, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  kx = conv(x, kernel)
  _, vjp = jax.vjp(lambda z: conv(z, kernel), x)
  ktx = vjp(x)[0]
  np.testing.assert_allclose(conv(x, skew_kernel(kernel)), kx - ktx, atol=1e-4)


def test_dense_field_is_skew_minus_gamma():
  field = SkewSymmetricDense(gamma=0.3, act="identity", use_bias=False)
  x = jax.random.normal(KEY, (5, 6))
  v = field.init(KEY, x)
  w = v["params"]["kernel"]
  a = w - w.T - 0.3 * jnp.eye(6)
  np.testing.assert_allclose(field.apply(v, x), x @ a.T, atol=1e-5)
  np.testing.assert_allclose(field.apply(v, 0.7, x), field.apply(v, x))  # t is ignored


@pytest.mark.parametrize("make", ["dense", "conv"])
def test_flow_keeps_the_norm_without_damping(make):
  if make == "dense":
    field = SkewSymmetricDense(gamma=0.0, act="identity", use_bias=False)
    x0 = jax.random.normal(KEY, (3, 8))
  else:
    field = SkewSymmetricConv(gamma=0.0, act="identity", use_bias=False)
    x0 = jax.random.normal(KEY, (2, 5, 5, 3))
  v = field.init(jax.random.key(4), x0)
  v = jax.tree_util.tree_map(lambda p: 2.0 * p, v)  # a field that rotates noticeably
  xt = solve_ode(_field_fn(field, v), x0, v, t1=2.0, solver="dopri5", rtol=1e-7,
                 atol=1e-9, max_steps=20000)
  assert float(jnp.linalg.norm(xt - x0)) > 0.1  # it moved...
  np.testing.assert_allclose(float(jnp.linalg.norm(xt)), float(jnp.linalg.norm(x0)),
                             rtol=1e-5)  # ...on a sphere


@pytest.mark.parametrize("gamma", [0.2, 1.0])
def test_flow_contracts_at_rate_gamma(gamma):
  field = SkewSymmetricDense(gamma=gamma, act="identity", use_bias=False)
  x0 = jax.random.normal(KEY, (4, 10))
  v = field.init(jax.random.key(5), x0)
  T = 1.5
  xt = solve_ode(_field_fn(field, v), x0, v, t1=T, solver="dopri5", rtol=1e-7, atol=1e-9,
                 max_steps=20000)
  # (W - W^T) is normal and commutes with I: every row shrinks by exactly e^{-gamma T}
  np.testing.assert_allclose(jnp.linalg.norm(xt, axis=-1),
                             math.exp(-gamma * T) * jnp.linalg.norm(x0, axis=-1), rtol=1e-5)


def test_tanh_field_with_damping_is_stable():
  """Nonlinear fields with gamma > 0 do not blow up (input-output stability)."""
  field, v, x0 = _conv_setup(gamma=0.5, act="tanh", use_bias=True)
  v = jax.tree_util.tree_map(lambda p: 5.0 * p + 0.0, v)
  xt = solve_ode(_field_fn(field, v), x0, v, t1=5.0, solver="dopri5", rtol=1e-5, atol=1e-6)
  assert bool(jnp.all(jnp.isfinite(xt)))
  # |dx/dt| <= 1 (tanh), so the state moves at most T per entry
  assert float(jnp.max(jnp.abs(xt - x0))) <= 5.0 + 1e-4


# ---------------------------------------------------------------------- solvers
def _linear(t, x, a):
  return x @ a.T


def test_rk4_is_fourth_order():
  a = jnp.array([[0.0, -1.0], [1.0, -0.1]])
  x0 = jnp.array([[1.0, 0.5]])
  exact = x0 @ jax.scipy.linalg.expm(2.0 * a).T
  errs = [float(jnp.linalg.norm(solve_ode(_linear, x0, a, t1=2.0, solver="rk4", n_steps=n)
                                - exact)) for n in (4, 8, 16)]
  orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
  assert all(3.5 < o < 4.5 for o in orders), (errs, orders)


@pytest.mark.parametrize("solver,adaptive", [("euler", False), ("heun", True), ("rk4", False),
                                             ("bosh3", True), ("dopri5", True),
                                             ("tsit5", True), ("heun", False)])
def test_nfe_counts_every_evaluation(solver, adaptive):
  """ode_stats' nfe equals the evaluations counted on the host, steps add up."""
  calls = []
  a = jnp.array([[0.0, -3.0], [3.0, -0.5]])

  def field(t, x, args):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.tanh(x @ args.T)

  sol = solve_ode(field, jnp.array([[1.0, -0.4]]), a, t1=2.0, solver=solver,
                  adaptive=adaptive, n_steps=3, rtol=1e-5, atol=1e-6, full_output=True)
  jax.block_until_ready(sol.ys)
  stats = ode_stats(sol, solver, adaptive=adaptive)
  nfe, rejected = int(stats["nfe"]), int(stats["num_rejected"])
  if rejected == 0 or solver not in ("bosh3", "dopri5", "tsit5"):
    assert nfe == len(calls)
  else:  # FSAL: rejections before the first accepted step re-evaluate the first stage
    assert nfe <= len(calls) <= nfe + rejected
  assert int(stats["num_accepted"]) + int(stats["num_rejected"]) == int(stats["num_steps"])
  assert int(stats["nfe_backward"]) == int(stats["nfe"])
  if not adaptive:
    assert int(stats["num_steps"]) == 3 and int(stats["num_rejected"]) == 0
  if solver == "dopri5":
    assert int(stats["num_steps"]) > 3  # the tolerance needs more than the initial steps
  assert "nfe_backward" not in ode_stats(sol, solver, "backsolve", adaptive)


def test_checkpoints_change_memory_not_the_gradient():
  """A solve of more steps than checkpoints recomputes; the gradient is the same."""
  a = jnp.array([[0.0, -3.0], [3.0, -0.5]])
  x0 = jnp.array([[1.0, -0.4], [0.3, 0.2]])

  def grad(checkpoints):
    def loss(x, a):
      return jnp.sum(solve_ode(lambda t, y, m: jnp.tanh(y @ m.T), x, a, t1=2.0,
                               solver="dopri5", rtol=1e-6, atol=1e-6,
                               checkpoints=checkpoints) ** 2)
    return jax.grad(loss, argnums=(0, 1))(x0, a)

  sol = solve_ode(lambda t, y, m: jnp.tanh(y @ m.T), x0, a, t1=2.0, solver="dopri5",
                  rtol=1e-6, atol=1e-6, full_output=True)
  assert int(sol.stats["num_steps"]) > 8  # more steps than 2 checkpoints hold
  ref = grad(None)
  for c in (1, 2, DEFAULT_CHECKPOINTS):
    for g, r in zip(grad(c), ref):
      np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-7)
  block = ODEBlock(SkewSymmetricDense(), solver="dopri5", checkpoints=3)
  x = jnp.ones((2, 4))
  v = block.init(KEY, x)
  np.testing.assert_allclose(block.apply(v, x), block.clone(checkpoints=None).apply(v, x))
  assert models.create("sonet_small", checkpoints=4).checkpoints == 4
  for bad in (0, -2, 1.5):
    with pytest.raises((ValueError, TypeError), match="checkpoints"):
      ODEBlock(SkewSymmetricDense(), checkpoints=bad)
  with pytest.raises((ValueError, TypeError), match="checkpoints"):
    solve_ode(_linear, x0, a, solver="dopri5", checkpoints=0)


def test_step_budget_exceeded_is_a_clear_error():
  a = 200.0 * jnp.array([[0.0, -1.0], [1.0, 0.0]])  # fast rotation: many steps
  with pytest.raises(Exception, match=r"max_steps=5 .*Raise max_steps"):
    jax.block_until_ready(solve_ode(_linear, jnp.ones((1, 2)), a, solver="dopri5",
                                    rtol=1e-6, atol=1e-6, max_steps=5))


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="gamma"):
    SkewSymmetricConv(gamma=-0.1)
  with pytest.raises(ValueError, match="gamma"):
    SkewSymmetricDense(gamma=-1.0)
  with pytest.raises(ValueError, match="kernel_size must be odd"):
    SkewSymmetricConv(kernel_size=2)
  with pytest.raises(ValueError, match="act"):
    SkewSymmetricConv(act="swish")
  f = SkewSymmetricDense()
  with pytest.raises(ValueError, match="rtol"):
    ODEBlock(f, solver="dopri5", rtol=0.0)
  with pytest.raises(ValueError, match="atol"):
    ODEBlock(f, solver="dopri5", atol=-1e-3)
  with pytest.raises(ValueError, match="n_steps"):
    ODEBlock(f, n_steps=0)
  with pytest.raises(ValueError, match="solver"):
    ODEBlock(f, solver="rk45")
  with pytest.raises(ValueError, match="adjoint"):
    ODEBlock(f, adjoint="adjoint")
  with pytest.raises(ValueError, match="adaptive"):
    ODEBlock(f, solver="rk4", adaptive=True)
  with pytest.raises(ValueError, match="solver"):
    models.create("sonet_small", solver="dopri4")
  with pytest.raises(ValueError, match="gamma"):
    models.create("sonet_resnet8", gamma=-0.5)

  class Shrink(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(x.shape[-1] - 1)(x)

  with pytest.raises(ValueError, match=r"state's shape \(2, 4\).*returned \(2, 3\)"):
    ODEBlock(Shrink(), time_dependent=False).init(KEY, jnp.ones((2, 4)))


# ----------------------------------------------------------------------- models
X = jax.random.uniform(KEY, (4, 12, 12, 1))


@pytest.mark.parametrize("name", ["sonet_small", "sonet_resnet8", "sonet_resnet20"])
def test_presets_run_and_sow_their_statistics(name):
  model = models.create(name, num_classes=7)
  v = model.init(jax.random.key(1), X)
  assert ODE_STATS not in v  # statistics are not variables
  logits, state = model.apply(v, X, mutable=[ODE_STATS])
  assert logits.shape == (4, 7) and bool(jnp.all(jnp.isfinite(logits)))
  stats = state[ODE_STATS]
  assert sorted(stats) == [f"ode{i}" for i in range(len(model.ode_widths))]
  for block in stats.values():
    assert int(block["nfe"][0]) == 6 * int(block["num_steps"][0]) + 1  # Dopri5, FSAL


def test_fixed_step_twin_shares_the_weights_and_converges():
  model = models.create("sonet_small")
  v = model.init(jax.random.key(2), X)
  tight = models.with_solver(model, rtol=1e-6, atol=1e-6).apply(v, X)
  twin = models.fixed_step_twin(model, "rk4", n_steps=16)
  assert twin.solver == "rk4" and twin.adaptive is False
  np.testing.assert_allclose(twin.apply(v, X), tight, atol=1e-4)
  coarse = models.fixed_step_twin(model, "euler", n_steps=1).apply(v, X)
  assert float(jnp.max(jnp.abs(coarse - tight))) > 1e-4  # it is another discretisation
  with pytest.raises(ValueError, match="solver settings"):
    models.with_solver(model, gamma=0.3)
  with pytest.raises(ValueError, match="SONet"):
    models.fixed_step_twin(models.create("resnet8"))


def test_gradient_modes_agree():
  """Discretise-then-optimise and the continuous adjoint give the same input gradient
  (to the solver's tolerance) on a smooth field."""
  base = models.create("sonet_small", rtol=1e-6, atol=1e-6)
  v = base.init(jax.random.key(3), X)

  def grad(adjoint):
    m = models.with_solver(base, adjoint=adjoint)
    return jax.grad(lambda x: jnp.sum(m.apply(v, x) ** 2))(X)

  g_rec, g_back = grad("recursive"), grad("backsolve")
  assert float(jnp.linalg.norm(g_rec)) > 0
  np.testing.assert_allclose(g_back, g_rec, rtol=1e-3, atol=1e-3 * float(jnp.max(
      jnp.abs(g_rec))))


def test_sonet_is_deterministic_and_jits_once():
  model = models.create("sonet_small")
  v = model.init(jax.random.key(4), X)
  f = jax.jit(lambda vv, x: model.apply(vv, x))
  a = f(v, X)
  b = f(v, X + 0.0)
  np.testing.assert_array_equal(a, b)
  assert f._cache_size() == 1
  f(jax.tree_util.tree_map(lambda p: p * 1.01, v), X)
  assert f._cache_size() == 1


def test_same_conv_derivatives_match_the_plain_convolution():
  from jaxdefense.nn._skew import same_conv
  x = jax.random.normal(KEY, (2, 7, 6, 3))
  k = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
  plain = lambda a, b: jax.lax.conv_general_dilated(
      a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(same_conv(x, k), plain(x, k), atol=1e-5)
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
  for g, h in zip(jax.grad(loss(same_conv), (0, 1))(x, k), jax.grad(loss(plain), (0, 1))(x, k)):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-4)
  tx, tk = jax.random.normal(jax.random.key(2), x.shape), jax.random.normal(KEY, k.shape)
  np.testing.assert_allclose(jax.jvp(same_conv, (x, k), (tx, tk))[1],
                             jax.jvp(plain, (x, k), (tx, tk))[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "rk4", "dopri5", "tsit5"])
def test_unrolled_adjoint_equals_the_diffrax_solve(solver):
  """adjoint="unrolled": the same fixed-step state and gradients as diffrax's solve;
  one host-counted evaluation per nfe forward, and exactly nfe vector-Jacobian
  products in a gradient (no stage evaluated again)."""
  a = jnp.array([[0.0, -3.0], [3.0, -0.5]])
  x0 = jnp.array([[1.0, -0.4], [0.3, 0.2]])
  field = lambda t, x, m: jnp.tanh(x @ m.T) * (1.0 + 0.2 * t)

  def loss(x, m, adjoint):
    return jnp.sum(solve_ode(field, x, m, t1=2.0, solver=solver, adaptive=False, n_steps=5,
                             adjoint=adjoint) ** 2)
  np.testing.assert_allclose(
      solve_ode(field, x0, a, t1=2.0, solver=solver, adaptive=False, n_steps=5,
                adjoint="unrolled"),
      solve_ode(field, x0, a, t1=2.0, solver=solver, adaptive=False, n_steps=5),
      rtol=1e-4, atol=1e-6)   # float32 rounding of the tableau (float64: 3e-15 apart)
  for g, r in zip(jax.grad(loss, argnums=(0, 1))(x0, a, "unrolled"),
                  jax.grad(loss, argnums=(0, 1))(x0, a, "recursive")):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  forward, backward = [], []

  @jax.custom_vjp
  def counted(x, m):
    return jnp.tanh(x @ m.T)

  def fwd(x, m):
    jax.debug.callback(lambda: forward.append(1))
    return counted(x, m), (x, m)

  def bwd(res, g):
    jax.debug.callback(lambda: backward.append(1))
    return jax.vjp(lambda x, m: jnp.tanh(x @ m.T), *res)[1](g)
  counted.defvjp(fwd, bwd)
  sol = solve_ode(lambda t, x, m: counted(x, m), x0, a, t1=2.0, solver=solver,
                  adaptive=False, n_steps=5, adjoint="unrolled", full_output=True)
  stats = ode_stats(sol, solver, "unrolled", adaptive=False)
  jax.block_until_ready(jax.grad(lambda x: jnp.sum(solve_ode(
      lambda t, y, m: counted(y, m), x, a, t1=2.0, solver=solver, adaptive=False, n_steps=5,
      adjoint="unrolled") ** 2))(x0))
  assert len(forward) == len(backward) == int(stats["nfe"]) == int(stats["nfe_backward"])
  assert int(stats["num_steps"]) == 5 and int(stats["num_rejected"]) == 0


def test_unrolled_adjoint_bad_uses_and_blocks():
  a = jnp.array([[0.0, -1.0], [1.0, 0.0]])
  x0 = jnp.array([[1.0, 0.5]])
  with pytest.raises(ValueError, match="adaptive=False"):
    solve_ode(_linear, x0, a, solver="dopri5", adjoint="unrolled")
  with pytest.raises(ValueError, match="ts"):
    solve_ode(_linear, x0, a, solver="rk4", adjoint="unrolled", ts=[0.5, 1.0])
  with pytest.raises(ValueError, match="unrolled"):
    ODEBlock(SkewSymmetricDense(), solver="dopri5", adjoint="unrolled")
  block = ODEBlock(SkewSymmetricConv(), solver="rk4", n_steps=3, adjoint="unrolled")
  x = jax.random.normal(KEY, (2, 6, 6, 4))
  v = block.init(KEY, x)
  out, state = block.apply(v, x, mutable=["ode_stats"])
  ref = block.clone(adjoint="recursive").apply(v, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  assert int(jax.tree_util.tree_leaves(state["ode_stats"])[0]) >= 0
  assert int(state["ode_stats"]["nfe"][0]) == 12


def test_unrolled_twin_and_plain_conv_rule_give_the_same_gradients():
  """fixed_step_twin defaults to adjoint="unrolled" (and the plain conv rule inside):
  its input gradient, what a transfer attack uses, equals the recursive twin's."""
  model = models.create("sonet_small", num_classes=3)
  x = jax.random.uniform(KEY, (2, 8, 8, 1))
  v = model.init(KEY, x)
  fast = models.fixed_step_twin(model, "rk4", n_steps=3)
  slow = models.fixed_step_twin(model, "rk4", n_steps=3, adjoint="recursive")
  assert fast.adjoint == "unrolled" and slow.adjoint == "recursive"
  grad = lambda m: jax.grad(lambda a: jnp.sum(jax.nn.log_softmax(m.apply(v, a))[:, 0]))(x)
  np.testing.assert_allclose(fast.apply(v, x), slow.apply(v, x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad(fast), grad(slow), rtol=1e-4, atol=1e-7)
  field = SkewSymmetricConv()
  s = jax.random.normal(KEY, (2, 6, 6, 4))
  fv = field.init(KEY, s)
  plain = field.clone(loop_conv=False)
  np.testing.assert_allclose(plain.apply(fv, s), field.apply(fv, s), rtol=1e-6, atol=1e-6)
  ga = jax.grad(lambda p, s: jnp.sum(field.apply(p, s) ** 3), argnums=(0, 1))(fv, s)
  gb = jax.grad(lambda p, s: jnp.sum(plain.apply(p, s) ** 3), argnums=(0, 1))(fv, s)
  for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    # kernel gradients of size ~7: im2col vs convolution sums, float32 rounding
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
