"""Tests of jaxdefense.certify: soundness, exactness, abstract layers, pytrees, errors."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import hypothesis
import hypothesis.strategies
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
from jaxdefense import certify
from jaxdefense import nn as L
from jaxdefense.certify import _api
from jaxdefense.certify import Box, HybridZonotope
from jaxdefense.models import _diffai  # noqa: F401  (registers the DiffAI zoo)

DOMAINS = [("box", {}), ("zonotope", {}), ("deepz", {})]


# ------------------------------------------------------------------------ helpers
class RandomNet(nn.Module):
  """A small network whose architecture is drawn from ``seed``: every layer kind."""
  seed: int
  abstract_layers: bool = True
  num_classes: int = 5

  @nn.compact
  def __call__(self, x: Any, train: bool = False) -> Any:
    rng = np.random.RandomState(self.seed)
    x = L.Normalize((0.4,) * x.shape[-1], (0.3,) * x.shape[-1])(x)
    x = L.Conv(4, 3, strides=int(rng.choice([1, 2])), use_bias=True)(x)
    x = L.relu(x)
    ops = ["conv", "res", "res_relu_short", "bn", "pool", "sig", "tanh", "concat",
           "group", "pad"]
    if self.abstract_layers:
      ops += ["cmaxk", "cfix", "cpool", "dmin", "dall", "call"]
    for op in rng.choice(ops, size=4, replace=True):
      c = x.shape[-1]
      if op == "conv":
        x = L.relu(L.Conv(4, 3, use_bias=True)(x))
      elif op == "res":  # branch with a ReLU (new DeepZ symbols), identity shortcut
        y = L.relu(L.Conv(c, 3)(x))
        x = L.relu(L.add(x, L.Conv(c, 3)(y)))
      elif op == "res_relu_short":  # both branches create symbols
        a = L.relu(L.Conv(c, 1)(x))
        b = L.relu(L.Conv(c, 3)(x))
        x = L.add(a, L.scale_shift(b, -0.5))
      elif op == "bn":
        x = L.relu(L.BatchNorm()(x, train=False))
      elif op == "pool" and x.shape[1] >= 2:
        x = L.avg_pool(x, 2, 1)
      elif op == "sig":
        x = L.sigmoid(x)
      elif op == "tanh":
        x = L.tanh(x)
      elif op == "concat":
        x = L.concatenate([x, L.relu(L.Conv(2, 3)(x))], -1)
      elif op == "group" and c % 2 == 0:
        x = L.relu(L.Conv(4, 3, feature_group_count=2)(x))
      elif op == "pad" and x.shape[1] >= 2:
        x = L.PadShortcut(c + 2, 2)(x)
      elif op == "cmaxk":
        x = L.CorrelateMaxK(6)(x, train=train)
      elif op == "cfix":
        x = L.CorrelateFixed(5)(x, train=train)
      elif op == "cpool" and x.shape[1] >= 2:
        x = L.CorrelateMaxPool(2, 1)(x, train=train)
      elif op == "dmin":
        x = L.DecorrelateMinK(4)(x, train=train)
      elif op == "dall":
        x = L.Concretize()(x, train=train)
      elif op == "call":
        x = L.CorrelateAll()(x, train=train)
    x = L.flatten(x)
    x = L.relu(L.Dense(12)(x))
    return L.Dense(self.num_classes)(x)


def _init(model: nn.Module, x: Any, seed: int = 0, **kw: Any) -> Any:
  """Variables of ``model`` drawn with NumPy (fan-in scaled): no PRNG compilation."""
  rng = np.random.RandomState(seed)
  keys = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
  shapes = jax.eval_shape(lambda a: model.init(keys, a, **kw), x)

  def draw(path, leaf):
    name = getattr(path[-1], "key", "")
    if name in ("kernel",):
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.uniform(-1, 1, leaf.shape) * np.sqrt(3.0 / fan_in), jnp.float32)
    if name == "var":
      return jnp.asarray(rng.uniform(0.2, 2.0, leaf.shape), jnp.float32)
    if name == "scale":
      return jnp.asarray(rng.normal(size=leaf.shape), jnp.float32)
    return jnp.asarray(rng.normal(size=leaf.shape) * 0.1, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _uniform(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.RandomState(seed).uniform(size=shape), jnp.float32)


def _sample_points(seed: int, lo: jax.Array, hi: jax.Array, n: int) -> jax.Array:
  """``n`` points of the box ``[lo, hi]`` (one example): half corners, half uniform."""
  rng = np.random.RandomState(seed)
  u = rng.uniform(size=(n,) + lo.shape)
  u[: n // 2] = rng.randint(0, 2, size=(n // 2,) + lo.shape)
  u[0], u[1], u[2] = 0.0, 1.0, 0.5
  return lo + jnp.asarray(u, jnp.float32) * (hi - lo)


def _count_violations(model, variables, x, eps, results, seed, n, train=False) -> int:
  """Sample ``n`` points per example (vmapped, jitted) against every bound in results."""
  lo_in = jnp.clip(x - eps, 0, 1)
  hi_in = jnp.clip(x + eps, 0, 1)

  @jax.jit
  def outputs(pts):
    return jax.vmap(lambda p: model.apply(variables, p[None], train=train)[0])(pts)

  bad = 0
  for b in range(x.shape[0]):
    pts = _sample_points(seed * 1000 + b, lo_in[b], hi_in[b], n)
    out = outputs(pts)
    for lo, hi in results:
      tol = 1e-5 * (1.0 + float(jnp.max(jnp.abs(jnp.stack([lo, hi])))))
      bad += int(jnp.sum(out < lo[b] - tol)) + int(jnp.sum(out > hi[b] + tol))
  return bad


def _hz(seed, shape=(2, 4, 4, 2), m=3, mode="box") -> HybridZonotope:
  rng = np.random.RandomState(seed)
  f = lambda a: jnp.asarray(a, jnp.float32)
  return HybridZonotope(f(rng.normal(size=shape)), f(rng.uniform(size=shape)),
                        f(rng.normal(size=(m,) + shape) * 0.3), relu_mode=mode)


# ---------------------------------------------------------------------- soundness
@pytest.mark.parametrize("seed", range(4))
def test_random_nets_sound_in_every_domain(seed):
  """4 random nets x 2 inputs x 1250 points (half corners) = 10,000 points per domain."""
  model = RandomNet(seed)
  shape = (2, 6, 6, 1 + seed % 2)
  x = _uniform(seed, shape)
  x = x.at[0, 0, 0].set(0.0).at[1, 0, 0].set(1.0)   # clipping at the [0, 1] edges
  variables = _init(model, x, seed)
  eps = float(np.random.RandomState(seed).uniform(0.01, 0.3))
  domains = DOMAINS + [("deepz", {"relu_budget": 8})] if seed % 2 else DOMAINS
  results = [certify.bounds(model, variables, x, eps, d, **kw) for d, kw in domains]
  for lo, hi in results:
    assert lo.shape == hi.shape == (2, 5)
    assert bool(jnp.all(lo <= hi + 1e-6)) and bool(jnp.all(jnp.isfinite(lo)))
  assert _count_violations(model, variables, x, eps, results, seed, 1250) == 0


@pytest.mark.parametrize("name,shape,train", [
    ("conv_small", (2, 12, 12, 1), False),
    ("resnet_tiny_few_combo", (2, 5, 5, 3), True),
])
def test_zoo_nets_sound(name, shape, train):
  model = jd.models.create(name, num_classes=4, normalize=((0.5,) * shape[-1],
                                                           (0.25,) * shape[-1]))
  x = _uniform(7, shape)
  variables = _init(model, x, 7)
  eps = 0.08
  if name == "resnet_tiny_few_combo":   # abstract layers active (train=True), HBox start
    domains = [("zonotope", {"correlate_input": False})]
  else:
    domains = [("box", {}), ("deepz", {"relu_budget": 16})]
  results = [certify.bounds(model, variables, x, eps, d, train=train, **kw)
             for d, kw in domains]
  assert _count_violations(model, variables, x, eps, results, 7, 1250, train) == 0


def test_other_zoo_model_certifiable_and_sound():
  """A registry ResNet (batch norm in eval mode, Euler steps) runs abstractly too."""
  model = jd.models.create("resnet8", num_classes=4)
  x = _uniform(3, (1, 8, 8, 1))
  variables = _init(model, x, 3)
  results = [certify.bounds(model, variables, x, 0.03, "zonotope")]
  assert _count_violations(model, variables, x, 0.03, results, 3, 200) == 0


def _set_leaves(variables: Any, name: str, values: np.ndarray) -> Any:
  """``variables`` with the leaves called ``name`` replaced by ``values`` in order."""
  it = iter(values)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(next(it), leaf.dtype).reshape(leaf.shape)
      if getattr(path[-1], "key", "") == name else leaf, variables)


@pytest.mark.parametrize("name,shape,points", [("resnet_tiny", (2, 5, 5, 3), 1250),
                                               ("diffai_resnet18", (1, 4, 4, 1), 250)])
def test_damped_diffai_resnet_sound(name, shape, points):
  """A DiffAI ResNet whose blocks take Damped("lambda") steps (scalar coefficients):
  the damping really acts, and sampled points (half of them corners of the eps-box)
  stay inside the box and zonotope bounds."""
  model = jd.models.create(name, num_classes=4, step=jd.dynamics.Damped("lambda"))
  x = _uniform(11, shape)
  variables = _init(model, x, 11)
  n_lambda = sum(getattr(p[-1], "key", "") == "lambda"
                 for p, _ in jax.tree_util.tree_leaves_with_path(variables))
  assert n_lambda == {"resnet_tiny": 3, "diffai_resnet18": 4}[name]
  # lambda in [0.2, 0.6]: every damped block scales x by 1 - a and f by 1 + a, a > 0.
  lam = np.random.RandomState(11).uniform(0.2, 0.6, n_lambda)
  variables = _set_leaves(variables, "lambda", lam)
  euler = jd.models.create(name, num_classes=4)
  plain = {"params": jax.tree_util.tree_map(lambda a: a, variables["params"])}
  for block in plain["params"].values():
    if isinstance(block, dict):
      block.pop("lambda", None)
  assert not np.allclose(model.apply(variables, x), euler.apply(plain, x), atol=1e-4)
  eps = 0.02
  results = [certify.bounds(model, variables, x, eps, d) for d in ("box", "zonotope")]
  for lo, hi in results:
    assert bool(jnp.all(lo <= hi)) and bool(jnp.all(jnp.isfinite(hi)))
  assert _count_violations(model, variables, x, eps, results, 11, points) == 0


def test_bounds_under_vmap_match_batched():
  model = RandomNet(1, abstract_layers=False)
  x = _uniform(0, (3, 6, 6, 1))
  variables = _init(model, x)
  eps = jnp.array([0.01, 0.05, 0.1])
  for domain in ("box", "deepz"):
    fn = certify.make_bounds_fn(model, domain)
    lo, hi = certify.bounds(model, variables, x, eps, domain)
    vlo, vhi = jax.jit(jax.vmap(lambda xi, e: fn(variables, xi[None], e)))(x, eps)
    np.testing.assert_allclose(vlo[:, 0], lo, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vhi[:, 0], hi, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- exactness
class AffineNet(nn.Module):
  """Only affine layers: every transformer must be exact on a zonotope."""

  @nn.compact
  def __call__(self, x, train=False):
    x = L.Normalize((0.3, 0.5), (0.2, 0.4))(x)
    x = L.Conv(4, 3, strides=2, use_bias=True)(x)
    x = L.BatchNorm()(x, train=False)
    x = L.add(x, L.Conv(4, 3, feature_group_count=2)(x))
    x = L.concatenate([x, L.Conv(2, 1)(x)], -1)
    x = L.PadShortcut(8, 1)(x)
    x = L.avg_pool(x, 2, 1)
    y = L.global_avg_pool(x)
    x = L.Dense(7)(L.flatten(x))
    return x - 0.5 * L.Dense(7)(y)


def test_zonotope_exact_on_affine_networks():
  model = AffineNet()
  x = _uniform(0, (2, 6, 6, 2))
  x = x.at[0, 0, 0, 0].set(0.01)   # the box is clipped at 0 there
  variables = _init(model, x)
  eps = 0.05
  lo_in, hi_in = jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1)
  c, r = (lo_in + hi_in) / 2, (hi_in - lo_in) / 2
  f = lambda a: model.apply(variables, a[None])[0]
  jac_fn = jax.jit(jax.jacobian(f))
  for b in range(2):
    jac = jac_fn(c[b]).reshape(7, -1)
    want_lo = f(c[b]) - jnp.abs(jac) @ r[b].reshape(-1)
    want_hi = f(c[b]) + jnp.abs(jac) @ r[b].reshape(-1)
    for domain in ("zonotope",):
      lo, hi = certify.bounds(model, variables, x, eps, domain)
      np.testing.assert_allclose(lo[b], want_lo, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(hi[b], want_hi, rtol=1e-4, atol=1e-4)
  blo, bhi = certify.bounds(model, variables, x, eps, "box")
  zlo, zhi = certify.bounds(model, variables, x, eps, "zonotope")
  assert bool(jnp.all(blo <= zlo + 1e-5)) and bool(jnp.all(bhi >= zhi - 1e-5))
  assert float(jnp.sum(bhi - blo)) > float(jnp.sum(zhi - zlo)) * 1.01  # strictly looser


def test_box_exact_on_one_dense_layer():
  model = L.Sequential([L.Flatten(), L.Dense(3)])
  x = _uniform(1, (2, 4))
  variables = _init(model, x)
  lo, hi = certify.bounds(model, variables, x, 0.1, "box")
  w = variables["params"]["layers_1"]["kernel"]
  lo_in, hi_in = jnp.clip(x - 0.1, 0, 1), jnp.clip(x + 0.1, 0, 1)
  c, r = (lo_in + hi_in) / 2, (hi_in - lo_in) / 2
  out = model.apply(variables, c)
  np.testing.assert_allclose(lo, out - r @ jnp.abs(w), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(hi, out + r @ jnp.abs(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(2))
def test_zonotope_inside_box_without_abstract_layers(seed):
  """With DiffAI's box ReLU the hybrid zonotope is never looser than interval bounds."""
  model = RandomNet(seed + 10, abstract_layers=False)
  x = _uniform(100 + seed, (2, 6, 6, 1))
  variables = _init(model, x, seed)
  blo, bhi = certify.bounds(model, variables, x, 0.1, "box")
  for kw in ({}, {"correlate_input": False}):
    zlo, zhi = certify.bounds(model, variables, x, 0.1, "zonotope", **kw)
    tol = 1e-5 * (1 + float(jnp.max(jnp.abs(bhi))))
    assert bool(jnp.all(zlo >= blo - tol)) and bool(jnp.all(zhi <= bhi + tol))
  # Without input correlation and abstract layers the zonotope *is* the box.
  zlo, zhi = certify.bounds(model, variables, x, 0.1, "zonotope", correlate_input=False)
  np.testing.assert_allclose(zlo, blo, rtol=1e-5, atol=1e-5)


def test_margins_in_domain_tighter_than_interval_subtraction():
  model = jd.models.create("conv_small", num_classes=4)
  x = _uniform(5, (3, 12, 12, 1))
  y = jnp.array([0, 1, 2])
  variables = _init(model, x, 5)
  mask = jax.nn.one_hot(y, 4) == 0

  @jax.jit
  def margins(variables, x):
    z = certify.abstract_logits(model, variables, x, 0.02, "zonotope")
    lo, hi = z.concretize()
    return certify.margin_lower_bounds(z, y), lo[jnp.arange(3), y][:, None] - hi

  low, naive = margins(variables, x)
  assert bool(jnp.all(jnp.where(mask, low >= naive - 1e-5, True)))
  assert float(jnp.sum(jnp.where(mask, low - naive, 0))) > 0  # strictly better somewhere
  m = certify.certified_margins(model, variables, x, y, 0.02, "zonotope", sound=False)
  np.testing.assert_allclose(m, jnp.min(low, -1), rtol=1e-5, atol=1e-6)
  # the default rounds outwards for the float32 network: never a larger margin
  m_sound = certify.certified_margins(model, variables, x, y, 0.02, "zonotope")
  assert bool(jnp.all(m_sound <= m))
  # A box is its own best case: in-domain margins equal interval subtraction.
  zb = certify.input_set(x, 0.02, "box")
  zb = model.apply(variables, zb)
  lo, hi = zb.concretize()
  np.testing.assert_allclose(jnp.where(mask, certify.margin_lower_bounds(zb, y), 0),
                             jnp.where(mask, lo[jnp.arange(3), y][:, None] - hi, 0),
                             rtol=1e-5, atol=1e-5)


def test_verified_examples_resist_pgd_and_sampling():
  key = jax.random.PRNGKey(11)
  model = jd.models.create("conv_small", num_classes=4)
  x = _uniform(11, (16, 12, 12, 1))
  variables = _init(model, x, 11)
  logits_fn = lambda a: model.apply(variables, a)
  y = jnp.argmax(logits_fn(x), -1)
  eps = 0.01
  ok = certify.verify(model, variables, x, y, eps, "deepz")
  assert int(jnp.sum(ok)) >= 2, "test needs certified examples"
  ok = ok | certify.verify(model, variables, x, y, eps, "box")
  adv = jax.jit(lambda a, b: jd.attacks.pgd(logits_fn, a, b, key=key, eps=eps,
                                            step_size=eps / 4, steps=30))(x, y)
  still = jnp.argmax(logits_fn(adv), -1) == y
  assert bool(jnp.all(jnp.where(ok, still, True)))
  assert float(jnp.max(jnp.abs(adv - x))) <= eps + 1e-6


# ------------------------------------------------------------------- transformers
def test_relu_modes():
  z = HybridZonotope(jnp.array([[-2.0, 2.0, 0.5]]), jnp.array([[0.5, 0.5, 0.0]]),
                     jnp.array([[[0.5, 0.5, 1.0]]]))
  lo, hi = z.concretize()
  np.testing.assert_allclose(lo, [[-3.0, 1.0, -0.5]])
  box = z.relu()
  blo, bhi = box.concretize()
  np.testing.assert_allclose(blo, [[0.0, 1.0, 0.0]])
  np.testing.assert_allclose(bhi, [[0.0, 3.0, 1.5]])
  assert box.num_generators == 1
  np.testing.assert_allclose(box.generators[0], [[0.0, 0.5, 0.0]])  # crossing -> box
  dz = z.replace(relu_mode="deepz").relu()
  assert dz.num_generators == 1 + 3 and len(dz.segments) == 2
  lam, mu = 1.5 / 2.0, 1.5 * 0.5 / 2 / 2.0 * 2  # u / (u - l), -lam l / 2
  mu = -lam * -0.5 / 2
  np.testing.assert_allclose(dz.center()[0, 2], lam * 0.5 + mu, rtol=1e-6)
  np.testing.assert_allclose(dz.generators[3, 0, 2], mu, rtol=1e-6)
  dlo, dhi = dz.concretize()
  np.testing.assert_allclose(dhi[0, 2], 1.5, rtol=1e-6)        # upper bound kept
  np.testing.assert_allclose(dlo[0, 2], lam * -0.5, rtol=1e-6)  # minimal-area lower
  budget = z.replace(relu_mode="deepz", relu_budget=1).relu()
  assert budget.num_generators == 2
  np.testing.assert_allclose(budget.concretize()[1], dz.concretize()[1], rtol=1e-6)


def test_monotone_and_box_ops():
  b = Box.from_bounds(jnp.array([[-1.0, 0.5]]), jnp.array([[2.0, 0.7]]))
  lo, hi = b.monotone(jnp.tanh).concretize()
  np.testing.assert_allclose(lo, jnp.tanh(jnp.array([[-1.0, 0.5]])), rtol=1e-6)
  np.testing.assert_allclose(hi, jnp.tanh(jnp.array([[2.0, 0.7]])), rtol=1e-6)
  lo, hi = b.relu().concretize()
  np.testing.assert_allclose(lo, [[0.0, 0.5]])
  lo, hi = (b * -2.0 + 1.0).concretize()
  np.testing.assert_allclose(lo, [[-3.0, -0.4]], rtol=1e-6)
  np.testing.assert_allclose(hi, [[3.0, 0.0]], atol=1e-6)
  z = _hz(0)
  mixed = L.add(Box.from_bounds(z.center(), z.center() + 1), z)
  assert isinstance(mixed, HybridZonotope)
  cat = L.concatenate([z, z.relu().replace(relu_mode="box")], -1)
  assert cat.shape == (2, 4, 4, 4)


def test_box_and_zonotope_meet_through_one_promotion():
  """A box is a zonotope without generators: box + box is a box; box + zonotope (either
  order, add or concatenate) is the zonotope with the box's radius in its box part and
  the zonotope's configuration; linear_bounds agree on a box and on its zonotope."""
  z = _hz(0, mode="deepz").replace(relu_budget=3)
  b = Box.from_bounds(z.center() - 0.5, z.center() + 0.25)
  bb = b + b
  assert type(bb) is Box
  np.testing.assert_allclose(bb.radius, 2 * b.radius)
  for s in (b + z, z + b, L.add(b, z), L.add(z, b)):
    assert isinstance(s, HybridZonotope)
    assert (s.relu_mode, s.relu_budget, s.segments) == ("deepz", 3, z.segments)
    np.testing.assert_allclose(s.center(), b.center() + z.center(), rtol=1e-6)
    np.testing.assert_allclose(s.box, b.radius + z.box, rtol=1e-6)
    np.testing.assert_array_equal(s.generators, z.generators)
  diff = b - z
  np.testing.assert_allclose(diff.center(), b.center() - z.center(), rtol=1e-6)
  np.testing.assert_allclose(diff.generators, -z.generators)
  for values, zero in (([b, z], slice(0, 2)), ([z, b], slice(2, 4))):
    cat = L.concatenate(values, -1)
    assert isinstance(cat, HybridZonotope) and cat.relu_mode == "deepz"
    assert cat.shape == (2, 4, 4, 4) and cat.num_generators == 3
    np.testing.assert_array_equal(cat.generators[..., zero], 0.0)
    want = [jnp.concatenate([v.concretize()[i] for v in values], -1) for i in (0, 1)]
    for got, w in zip(cat.concretize(), want):
      np.testing.assert_allclose(got, w, rtol=1e-6)
  assert type(HybridZonotope.concatenate([b, b], -1)) is Box
  matrix = jnp.asarray(np.random.RandomState(0).normal(size=(5, 32)), jnp.float32)
  flat = b.reshape((2, 32))
  for got, want in zip(certify.linear_bounds(flat, matrix),
                       certify.linear_bounds(flat.to_zonotope(), matrix)):
    np.testing.assert_array_equal(got, want)
  lo, hi = flat.concretize()
  c, r = (lo + hi) / 2, (hi - lo) / 2
  np.testing.assert_allclose(certify.linear_bounds(flat, matrix)[1],
                             c @ matrix.T + r @ jnp.abs(matrix).T, rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match="abstract values only"):
    Box.concatenate([b, b.center()], -1)


def test_residual_deepz_symbols_stay_distinct():
  z = _hz(1, m=2, mode="deepz")
  a, b = z.relu(), (-z).relu()
  assert a.segments[0] == b.segments[0] and a.segments[1] != b.segments[1]
  s = a + b
  p = 4 * 4 * 2
  assert s.num_generators == 2 + p + p
  # relu(x) + relu(-x) = |x|: sound on sampled points of z (share the input symbols).
  e = _uniform(2, (500, 2)) * 2 - 1
  beta = _uniform(3, (500,) + z.shape) * 2 - 1
  pts = z.center() + z.box * beta + jnp.einsum("nm,m...->n...", e, z.generators)
  lo, hi = s.concretize()
  assert bool(jnp.all(jnp.abs(pts) >= lo - 1e-5)) and bool(jnp.all(jnp.abs(pts) <= hi + 1e-5))


@jax.jit
def _relu_check(c, b, e, noise, beta):
  """Max violation of relu(points) against both ReLU transformers, for sampled points."""
  worst = []
  for mode in ("box", "deepz"):
    z = HybridZonotope(c, b, e, relu_mode=mode)
    lo, hi = z.relu().concretize()
    pts = jax.nn.relu(c + b * beta + jnp.einsum("nm,mbk->nbk", noise, e))
    worst.append(jnp.maximum(jnp.max(lo - pts), jnp.max(pts - hi)))
  return jnp.max(jnp.stack(worst))


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(seed=hypothesis.strategies.integers(0, 2**31 - 1),
                  scale=hypothesis.strategies.floats(0.01, 10.0))
def test_relu_transformers_sound_property(seed, scale):
  rng = np.random.RandomState(seed)
  f = lambda a: jnp.asarray(a, jnp.float32)
  c = f(rng.normal(size=(2, 6)) * scale)
  b = f(np.abs(rng.normal(size=(2, 6))) * scale * rng.randint(0, 2))
  e = f(rng.normal(size=(3, 2, 6)) * scale)
  noise = rng.uniform(-1, 1, (300, 3))
  noise[:8] = np.sign(rng.normal(size=(8, 3)))          # corners of the noise cube
  beta = rng.uniform(-1, 1, (300, 2, 6))
  beta[:8] = np.sign(rng.normal(size=(8, 2, 6)))
  assert float(_relu_check(c, b, e, f(noise), f(beta))) <= 1e-5 * (1 + scale)


# ----------------------------------------------------------------- abstract layers
ABSTRACT_CORRELATE = [
    (L.CorrelateAll(), 4 * 4 * 2),
    (L.CorrelateFixed(5), 5),
    (L.CorrelateMaxK(7), 7),
    (L.CorrelateMaxPool(2), 2 * 2 * 2),
    (L.CorrelateMaxPool((2, 2, 2), strides=1, by="center"), 3 * 3),
]


@pytest.mark.parametrize("layer,added", ABSTRACT_CORRELATE)
def test_correlation_layers_keep_the_set(layer, added):
  z = _hz(3)
  out = layer.apply({}, z)
  assert out.num_generators == z.num_generators + added
  np.testing.assert_allclose(out.center(), z.center())
  for a, b in zip(out.concretize(), z.concretize()):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Same set: any linear functional has the same range.
  w = _uniform(4, (32, 3)) * 2 - 1
  lin = lambda v: v.affine(lambda a: a.reshape(a.shape[0], -1) @ w,
                           lambda a: a.reshape(a.shape[0], -1) @ jnp.abs(w))
  for a, b in zip(lin(out).concretize(), lin(z).concretize()):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(jnp.sum(lin(out).radius())) <= float(jnp.sum(lin(z).radius())) + 1e-4
  new = out.generators[z.num_generators:].reshape(added, 2, -1)
  assert bool(jnp.all(jnp.sum(new != 0, -1) <= 1))  # one variable per new generator
  # Identity on arrays, on boxes, and (only_train) at evaluation.
  x = jnp.ones((2, 4, 4, 2))
  assert layer.apply({}, x) is x
  b = Box(z.center(), z.box)
  assert layer.apply({}, b) is b
  lazy = layer.clone(only_train=True)
  assert lazy.apply({}, z, train=False) is z
  assert lazy.apply({}, z, train=True).num_generators == out.num_generators


def test_decorrelation_layers_as_defined():
  z = _hz(5, m=5)
  total = jnp.sum(jnp.abs(z.generators.reshape(5, 2, -1)), -1)   # [m, B]
  out = L.DecorrelateMinK(2).apply({}, z)
  assert out.num_generators == 2
  for b in range(2):
    keep = np.sort(np.argsort(-np.asarray(total[:, b]))[:2])
    np.testing.assert_allclose(out.generators[:, b], z.generators[keep, b])
  for a, b in zip(out.concretize(), z.concretize()):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  allz = L.DecorrelateAll().apply({}, z)
  assert allz.num_generators == 0
  np.testing.assert_allclose(allz.box, z.radius(), rtol=1e-6)
  assert L.Concretize().apply({}, z).num_generators == 0
  assert L.DecorrelateMinK(9).apply({}, z) is z
  # Decorrelating enlarges the set: a linear functional's range can only grow.
  w = _uniform(6, (32, 3)) * 2 - 1
  lin = lambda v: v.affine(lambda a: a.reshape(a.shape[0], -1) @ w,
                           lambda a: a.reshape(a.shape[0], -1) @ jnp.abs(w))
  for dec in (out, allz):
    lo, hi = lin(dec).concretize()
    lo0, hi0 = lin(z).concretize()
    assert bool(jnp.all(lo <= lo0 + 1e-5)) and bool(jnp.all(hi >= hi0 - 1e-5))


def test_deep_loss_matches_quadratic_definition_and_is_sown():
  lo = jnp.round((_uniform(8, (3, 17)) * 2 - 1) * 4) / 2          # ties included
  hi = lo + jnp.round(_uniform(9, (3, 17)) * 4) / 2
  got = L.deep_loss(lo, hi)
  def naive(l, u):   # j != i (DiffAI section 3.3: the *other* dimensions)
    other = ~jnp.eye(l.shape[0], dtype=bool)
    lb = jnp.max(jnp.where((l[None, :] <= l[:, None]) & other,
                           jax.nn.relu(u[None, :] - l[:, None]), 0), 1)
    ub = jnp.max(jnp.where((u[:, None] <= u[None, :]) & other,
                           jax.nn.relu(u[:, None] - l[None, :]), 0), 1)
    return (jnp.sum(lb) + jnp.sum(ub)) / (2 * l.shape[0])
  np.testing.assert_allclose(got, jax.vmap(naive)(lo, hi), rtol=1e-6)
  box = Box.from_bounds(lo, hi)
  layer = L.DeepLoss(weight=0.5)
  out, state = layer.apply({}, box, train=True, mutable=["losses"])
  assert out is box
  np.testing.assert_allclose(state["losses"]["deep_loss"][0], 0.5 * jnp.mean(got), rtol=1e-6)
  _, state = layer.apply({}, box, train=False, mutable=["losses"])   # only_train
  assert not state.get("losses")


# ------------------------------------------------------------------------ pytrees
def test_domains_are_pytrees_through_jit_vmap_grad():
  z = _hz(9, mode="deepz").replace(relu_budget=4)
  leaves, tree = jax.tree_util.tree_flatten(z)
  assert len(leaves) == 3
  back = jax.tree_util.tree_unflatten(tree, leaves)
  assert back.relu_mode == "deepz" and back.relu_budget == 4 and back.segments == z.segments
  out = jax.jit(lambda v: v.relu())(z)
  assert isinstance(out, HybridZonotope) and out.num_generators == 3 + 4
  assert out.relu_mode == "deepz" and out.segments[:1] == z.segments
  # vmap over a stack of zonotopes (a leading axis on every leaf).
  zs = jax.tree_util.tree_map(lambda *a: jnp.stack(a), z, z * 2.0)
  his = jax.jit(jax.vmap(lambda v: v.relu().concretize()[1]))(zs)
  np.testing.assert_allclose(his[1], jax.jit(lambda v: v.relu().concretize()[1])(z * 2.0),
                             rtol=1e-5)
  # vmap over the batch axis itself (generators carry it on axis 1).
  per = jax.jit(jax.vmap(lambda v: v.concretize()[1], in_axes=(z.batch_axes(),)))(z)
  np.testing.assert_allclose(per, z.concretize()[1], rtol=1e-6)
  # grad w.r.t. the abstract value and w.r.t. parameters.
  g = jax.jit(jax.grad(lambda v: jnp.sum(v.relu().concretize()[1])))(z)
  assert isinstance(g, HybridZonotope) and bool(jnp.all(jnp.isfinite(g.generators)))
  b = Box(z.center(), z.box)
  gb = jax.jit(jax.grad(lambda v: jnp.sum(v.relu().concretize()[1])))(b)
  assert isinstance(gb, Box)
  model = jd.models.create("ffnn", num_classes=3)
  x = _uniform(0, (2, 3, 3, 1))
  variables = _init(model, x)
  for domain in ("box", "deepz"):
    fn = certify.make_bounds_fn(model, domain)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(fn({"params": p}, x, 0.05)[1])))(
        variables["params"])
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


def test_no_retracing_across_batches():
  model = jd.models.create("conv_small", num_classes=3)
  variables = _init(model, jnp.zeros((4, 12, 12, 1)))
  fn = certify.make_bounds_fn(model, "zonotope")
  traced = jax.jit(chex.assert_max_traces(fn, n=1))
  for i in range(3):
    x = _uniform(i, (4, 12, 12, 1))
    traced(variables, x, 0.01 * (i + 1))
    certify.verify(model, variables, x, jnp.zeros(4, jnp.int32), 0.01 * (i + 1))
  jitted = _api._jitted("verify", model, "zonotope", "box", None, True, False, True)  # sound
  assert jitted._cache_size() == 1


def test_count_neurons_and_input_set():
  model = RandomNet(0, abstract_layers=False)
  x = jnp.full((1, 6, 6, 1), 0.5)
  variables = _init(model, x)
  assert certify.count_neurons(model, variables, x) > 12
  z = certify.input_set(jnp.array([[0.0, 0.5, 1.0]]), 0.2, "zonotope")
  lo, hi = z.concretize()
  np.testing.assert_allclose(lo, [[0.0, 0.3, 0.8]], atol=1e-6)
  np.testing.assert_allclose(hi, [[0.2, 0.7, 1.0]], atol=1e-6)
  assert z.num_generators == 3 and z.segments == ((0, 3),)
  hb = certify.input_set(jnp.array([[0.5]]), 0.1, "zonotope", correlate_input=False)
  assert hb.num_generators == 0


# -------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def small():
  model = jd.models.create("ffnn", num_classes=3)
  x = jnp.full((2, 4, 4, 1), 0.5)
  return model, _init(model, x), x


def test_bad_inputs_raise_clear_errors(small):
  model, variables, x = small
  with pytest.raises(ValueError, match="eps"):
    certify.bounds(model, variables, x, -0.1)
  with pytest.raises(ValueError, match="eps"):
    certify.verify(model, variables, x, jnp.zeros(2, jnp.int32), 2.0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    certify.bounds(model, variables, x * 3, 0.1)
  with pytest.raises(TypeError, match="floating"):
    certify.bounds(model, variables, jnp.ones((2, 4, 4, 1), jnp.int32), 0.1)
  with pytest.raises(ValueError, match="domain"):
    certify.bounds(model, variables, x, 0.1, domain="polytope")
  with pytest.raises(ValueError, match="relu"):
    certify.bounds(model, variables, x, 0.1, domain="zonotope", relu="sigmoid")
  with pytest.raises(ValueError, match="eps"):
    certify.bounds(model, variables, x, jnp.array([0.1, 0.1, 0.1]))
  with pytest.raises(ValueError, match="y"):
    certify.verify(model, variables, x, jnp.zeros(3, jnp.int32), 0.1)
  with pytest.raises(TypeError, match="flax"):
    certify.bounds(lambda a: a, variables, x, 0.1)
  with pytest.raises(ValueError, match="relu_mode"):
    HybridZonotope(x, x, relu_mode="nope")
  with pytest.raises(ValueError, match="relu_budget"):
    HybridZonotope(x, x, relu_budget=0)


class NoisyNet(nn.Module):
  """One residual step with the library's EulerMaruyama rule (noise on)."""
  coef: float = 0.1

  @nn.compact
  def __call__(self, x, train=False):
    step = jd.dynamics.EulerMaruyama(coef=self.coef)
    fx = L.Conv(x.shape[-1], 3)(x)
    x = jd.dynamics.apply_step(self, step, x, fx, jd.dynamics.StepContext(0, False, train))
    return L.Dense(2)(L.flatten(x))


def test_stochastic_and_training_mode_models_are_not_certifiable():
  x = jnp.full((2, 4, 4, 1), 0.5)
  model = NoisyNet()
  variables = _init(model, x)
  with pytest.raises(ValueError, match="not certifiable"):
    certify.bounds(model, variables, x, 0.1)
  lo, hi = certify.bounds(NoisyNet(coef=0.0), variables, x, 0.1)   # noise off: fine
  assert bool(jnp.all(lo <= hi))
  bn = L.Sequential([L.BatchNorm(), L.Flatten(), L.Dense(2)])
  variables = _init(bn, x)
  with pytest.raises(ValueError, match="BatchNorm"):
    certify.bounds(bn, variables, x, 0.1, train=True)


def test_certified_accuracy_and_report(small):
  from jaxdefense.evaluation._certified import certified_accuracy
  model, variables, _ = small
  x = np.asarray(_uniform(4, (7, 4, 4, 1)))
  y = np.asarray(jnp.argmax(model.apply(variables, x), -1)).astype(np.int32)
  acc, mask = certified_accuracy(model, variables, (x, y), 0.001, "box", batch_size=3,
                                 progress=False, return_mask=True)
  want = certify.verify(model, variables, x, y, 0.001, "box")
  np.testing.assert_array_equal(mask, np.asarray(want))
  assert acc == pytest.approx(float(np.mean(want)))
  rep = certify.report(model, variables, x, y, 0.001, domains=("box",), batch_size=4,
                       pgd_steps=2)
  assert rep["standard"] == 1.0 and rep["n"] == 7
  assert rep["certified_box"] <= rep["pgd"] <= rep["standard"]
  with pytest.raises(TypeError, match="data"):
    certified_accuracy(model, variables, x, 0.1)


@pytest.mark.parametrize("name,domain", [("conv_small", "zonotope"), ("conv_small", "deepz"),
                                         ("resnet8", "box"), ("ffnn", "zonotope")])
def test_prepared_variables_give_the_same_bounds(name, domain):
  """certify.prepare precomputes |W| once; bounds are identical bit for bit, the stored
  |W| is what the layers use, and a stale one of another shape is a clear error."""
  x = _uniform(3, (4, 28, 28, 1))
  model = jd.models.create(name, num_classes=10)
  v = model.init(jax.random.PRNGKey(0), x)
  prepared = certify.prepare(v)
  assert set(prepared) == set(v) | {"abs_kernels"}
  for a, b in zip(certify.bounds(model, v, x, 0.02, domain),
                  certify.bounds(model, prepared, x, 0.02, domain)):
    assert bool(jnp.array_equal(a, b))
  zeros = {**prepared, "abs_kernels": jax.tree_util.tree_map(jnp.zeros_like,
                                                            prepared["abs_kernels"])}
  lo, hi = certify.bounds(model, zeros, x, 0.02, "box")
  ref_lo, ref_hi = certify.bounds(model, v, x, 0.02, "box")
  assert float(jnp.sum(hi - lo)) < float(jnp.sum(ref_hi - ref_lo))   # |W| = 0 was used
  first = sorted(prepared["abs_kernels"])[0]
  bad = {**prepared, "abs_kernels": {**prepared["abs_kernels"], first: {
      "kernel": prepared["abs_kernels"][first]["kernel"][..., :1]}}}
  with pytest.raises(ValueError, match="prepare the variables again"):
    certify.bounds(model, bad, x, 0.02, "box")
  with pytest.raises(TypeError, match="params"):
    certify.prepare([1, 2])
  y = jnp.arange(4) % 10
  np.testing.assert_array_equal(   # verify_dataset prepares by itself: same answers
      _api.verify_dataset(model, v, x, y, 0.001, domain, batch_size=2),
      np.asarray(certify.verify(model, v, x, y, 0.001, domain)))


def _full_copy(z: HybridZonotope) -> HybridZonotope:
  """The same set with its generators held as the full ``[m, B, ...]`` tensor."""
  return HybridZonotope(z.center(), z.box, z.generators, relu_mode=z.relu_mode,
                        relu_budget=z.relu_budget, segments=z.segments, sound=z.sound)


def _conv_batches(fn, *args) -> list[int]:
  """Batch sizes of every convolution's input in ``fn``'s jaxpr (sub-jaxprs included)."""
  sizes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        sizes.append(int(eqn.invars[0].aval.shape[0]))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return sizes


@pytest.mark.parametrize("name,domain,sound", [("conv_small", "zonotope", False),
                                               ("conv_small", "deepz", True),
                                               ("ffnn", "zonotope", True)])
def test_diagonal_input_generators_match_the_full_tensor(name, domain, sound, monkeypatch):
  """The per-pixel input zonotope is kept as its diagonal through normalisation and maps
  the basis images once per batch in the first layer; the bounds equal those of the
  same set held as a full generator tensor, and the first convolution sees p + B images,
  not p * B + B."""
  batch = 3
  x = _uniform(4, (batch, 12, 12, 1))
  model = jd.models.create(name, num_classes=10)
  v = model.init(jax.random.PRNGKey(1), x)
  z = certify.input_set(x, 0.05, domain, sound=sound)
  assert z._diagonal and z.num_generators == 144
  d = z._gens
  full = (jnp.eye(144)[:, None, :] * d[None]).reshape((144,) + x.shape)
  np.testing.assert_array_equal(z.generators, full)
  zf = _full_copy(z)
  assert not zf._diagonal
  for a, b in zip(z.concretize(), zf.concretize()):
    np.testing.assert_array_equal(a, b)
  scaled = L.scale_shift(z, 2.0, 0.5).reshape((batch, 144))
  assert scaled._diagonal
  np.testing.assert_allclose(scaled.generators,
                             L.scale_shift(zf, 2.0, 0.5).reshape((batch, 144)).generators)
  run = jax.jit(lambda val: model.apply(v, val).concretize())
  for a, b in zip(run(z), run(zf)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  if name == "conv_small":
    from jaxdefense.nn import _layers  # XLA's convolution for every batch: count images
    monkeypatch.setattr(_layers, "_PATCHES_MIN_BATCH", 10**9)
    first = _conv_batches(lambda val: model.apply(v, val).concretize(), z)[0]
    assert first == 144 + batch
    assert _conv_batches(lambda val: model.apply(v, val).concretize(), zf)[0] == (
        144 * batch + batch)
  # through vmap over the batch axis, grad, and the box start's correlation layer
  per = jax.jit(jax.vmap(lambda val: val.concretize()[1], in_axes=(z.batch_axes(),)))(z)
  np.testing.assert_allclose(per, z.concretize()[1], rtol=1e-6)
  if not sound:   # the sound path's nextafter has no derivative: it is not for training
    g = jax.grad(lambda val: jnp.sum(model.apply(v, val).concretize()[1]))(z)
    gf = jax.grad(lambda val: jnp.sum(model.apply(v, val).concretize()[1]))(zf)
    np.testing.assert_allclose(g.box, gf.box, rtol=1e-5, atol=1e-6)
    # the diagonal's gradient is the diagonal of the full tensor's gradient
    dense = gf.generators.reshape(144, batch, 144)
    np.testing.assert_allclose(g._gens, jnp.diagonal(dense, axis1=0, axis2=2),
                               rtol=1e-5, atol=1e-6)
  box_start = certify.input_set(x, 0.05, domain, correlate_input=False)
  assert box_start.num_generators == 0
  corr = box_start.correlate_all()
  assert corr._diagonal and corr.num_generators == 144
  again = corr.correlate_all()                 # generators present: appended, full tensor
  assert not again._diagonal and again.num_generators == 288


@pytest.mark.parametrize("kernel,strides,padding", [(3, 1, None), ((4, 2), 2, 1),
                                                    (4, (2, 1), "SAME"), (3, 2, "VALID"),
                                                    (2, 1, ((0, 1), (1, 0)))])
def test_one_channel_convolution_as_patches_matches_the_convolution(kernel, strides,
                                                                    padding):
  """On CPU a one-input-channel convolution on an abstract batch of >= 16 runs as
  patches times a matrix: the same values as XLA's convolution, every padding form."""
  from jaxdefense.nn import _layers
  x = _uniform(5, (_layers._PATCHES_MIN_BATCH, 11, 10, 1))
  layer = L.Conv(6, kernel, strides=strides, padding=padding, use_bias=True)
  v = layer.init(jax.random.PRNGKey(0), x)
  pads = layer._padding(_layers._pair(kernel))   # the layer's own padding rule
  ref = _layers._conv_plain(x, v["params"]["kernel"], _layers._pair(strides), pads, 1)
  got = _layers._conv_patches(x, v["params"]["kernel"], _layers._pair(strides), pads)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  z = Box.from_bounds(x - 0.1, x + 0.1)
  lo, hi = layer.apply(v, z).concretize()
  y = layer.apply(v, x)
  assert bool(jnp.all(lo <= y + 1e-6)) and bool(jnp.all(y <= hi + 1e-6))
  assert _conv_batches(lambda val: layer.apply(v, val).concretize(), z) == []
  small = Box.from_bounds(x[:2] - 0.1, x[:2] + 0.1)   # below the batch threshold: XLA's
  assert _conv_batches(lambda val: layer.apply(v, val).concretize(), small) == [2, 2]
