"""The IBP-style certified objective: schedules, bounds, gradients, training signal."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdefense as jd
from jaxdefense import certify
from jaxdefense.models import ModelFn, bind
from jaxdefense.models import _diffai  # noqa: F401  (registers the DiffAI zoo)
from jaxdefense.objectives._certified import CertifiedObjective, Lin


def _data(n=32, seed=0):
  """Two separable classes of 6x6 images (bright left half vs bright right half)."""
  rng = np.random.RandomState(seed)
  y = rng.randint(0, 2, n).astype(np.int32)
  x = rng.uniform(0, 0.3, (n, 6, 6, 1)).astype(np.float32)
  for i in range(n):
    x[i, :, :3] += 0.6 * (y[i] == 0)
    x[i, :, 3:] += 0.6 * (y[i] == 1)
  return jnp.asarray(x), jnp.asarray(y)


@pytest.fixture(scope="module")
def setup():
  model = jd.models.create("ffnn", num_classes=2)
  x, y = _data()
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), x), x, y


def test_lin_schedule():
  s = Lin(0.0, 1.0, 2.0, 4.0)
  np.testing.assert_allclose([s(t) for t in (0, 2, 3, 6, 10)], [0, 0, 0.25, 1, 1])
  np.testing.assert_allclose([Lin(1.0, 0.5, 1.0)(t) for t in (0.5, 1.0)], [1.0, 0.5])
  assert float(jax.jit(s)(jnp.float32(4.0))) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    Lin(0, 1, -1, 1)


def _deep_loss_by_definition(lower, upper):
  """DiffAI's DeepLoss per example, straight from the formula (all pairs, O(n^2)).

  ``L_lb,i = max{relu(u_j - l_i) : j != i, l_j <= l_i}``, ``L_ub,i = max{relu(u_i - l_j) :
  j != i, u_i <= u_j}`` (0 for an empty set), ``L = (sum_i L_lb,i + L_ub,i) / (2 n)``.
  """
  lo = np.asarray(lower, np.float64).reshape(len(lower), -1)
  hi = np.asarray(upper, np.float64).reshape(len(upper), -1)
  gap_lb = np.maximum(hi[:, None, :] - lo[:, :, None], 0)   # [b, i, j]: relu(u_j - l_i)
  gap_ub = np.maximum(hi[:, :, None] - lo[:, None, :], 0)   # [b, i, j]: relu(u_i - l_j)
  other = ~np.eye(lo.shape[1], dtype=bool)[None]
  lb = np.max(np.where((lo[:, None, :] <= lo[:, :, None]) & other, gap_lb, 0.0), axis=2)
  ub = np.max(np.where((hi[:, :, None] <= hi[:, None, :]) & other, gap_ub, 0.0), axis=2)
  return (lb.sum(1) + ub.sum(1)) / (2 * lo.shape[1])


class _DeepLossNet(fnn.Module):
  """DeepLoss on the (abstract) input, then dense 16 - relu - dense 2."""
  weight: float

  @fnn.compact
  def __call__(self, x, train=False):
    x = jd.nn.DeepLoss(weight=self.weight)(x, train=train)
    x = jd.nn.Flatten()(x)
    x = jd.nn.ReLU()(jd.nn.Dense(16)(x))
    return jd.nn.Dense(2)(x)


def test_mix_endpoints_and_aux(setup):
  model, v, x, y = setup
  apply_fn = bind(model, v, train=True)
  logits = model.apply(v, x)
  point = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  obj = jax.jit(CertifiedObjective(eps=0.1))
  loss, aux = obj(apply_fn, x, y, jax.random.PRNGKey(0), epoch=0.0)
  np.testing.assert_allclose(aux["logits"], logits, rtol=1e-5)
  assert aux["model_state"] == {}
  assert float(aux["mix"]) == 0 and float(aux["eps"]) == 0
  np.testing.assert_allclose(loss, point, rtol=1e-5)
  np.testing.assert_allclose(aux["abstract_loss"], point, rtol=1e-5)  # eps = 0: a point
  loss, aux = obj(apply_fn, x, y, jax.random.PRNGKey(0), epoch=100.0)
  assert float(aux["mix"]) == pytest.approx(0.5) and float(aux["eps"]) == pytest.approx(0.1)
  loss_end, _ = obj(apply_fn, x, y, jax.random.PRNGKey(0))   # no epoch: end of schedules
  np.testing.assert_allclose(loss_end, loss, rtol=1e-6)
  assert float(aux["abstract_loss"]) > float(aux["point_loss"])
  np.testing.assert_allclose(loss, 0.5 * aux["point_loss"] + 0.5 * aux["abstract_loss"],
                             rtol=1e-5)
  assert 0 <= float(aux["certified"]) <= 1
  assert float(aux["deep_loss"]) == 0   # the FFNN has no DeepLoss layer
  # A DeepLoss layer on the abstract input adds weight * DeepLoss(lower, upper) (DiffAI
  # section 3.3) to the loss, at full weight (not scaled by mix), in both domains.
  for domain in ("box", "zonotope"):
    obj = jax.jit(CertifiedObjective(eps=0.1, domain=domain))
    runs = {}
    for weight in (0.0, 0.5):
      deep_net = _DeepLossNet(weight)
      dv = jax.jit(deep_net.init)(jax.random.PRNGKey(3), x)
      runs[weight] = obj(bind(deep_net, dv, train=True), x, y, jax.random.PRNGKey(0),
                         epoch=100.0)
    (loss0, aux0), (loss, aux) = runs[0.0], runs[0.5]
    lo, hi = np.clip(np.asarray(x) - 0.1, 0, 1), np.clip(np.asarray(x) + 0.1, 0, 1)
    expected = 0.5 * np.mean(_deep_loss_by_definition(lo, hi))
    assert expected > 0.05
    np.testing.assert_allclose(aux["deep_loss"], expected, rtol=1e-5)
    assert float(aux0["deep_loss"]) == 0
    for k in ("point_loss", "abstract_loss"):   # the layer is the identity on the values
      np.testing.assert_allclose(aux[k], aux0[k], rtol=1e-6)
    np.testing.assert_allclose(
        loss, 0.5 * aux["point_loss"] + 0.5 * aux["abstract_loss"] + expected, rtol=1e-5)
    np.testing.assert_allclose(loss - loss0, expected, rtol=1e-4)
  with pytest.raises(ValueError, match="eps"):
    CertifiedObjective(eps=-1.0)
  with pytest.raises(ValueError, match="domain"):
    CertifiedObjective(domain="interval")


def test_worst_case_loss_bounds_sampled_losses(setup):
  model, v, x, y = setup
  eps = 0.05
  ce_fn = jax.jit(lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(v, p), y))
  for domain in ("box", "zonotope"):
    worst_fn = jax.jit(lambda v: optax.softmax_cross_entropy_with_integer_labels(
        certify.worst_case_logits(certify.abstract_logits(model, v, x, eps, domain), y), y))
    worst = worst_fn(v)
    rng = np.random.RandomState(1)
    for _ in range(20):
      pts = jnp.clip(x + jnp.asarray(rng.uniform(-eps, eps, x.shape), jnp.float32), 0, 1)
      assert bool(jnp.all(ce_fn(pts) <= worst + 1e-5))


def test_training_raises_certified_accuracy_without_retracing():
  model = jd.models.create("ffnn", num_classes=2)
  x, y = _data(64)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
  obj = CertifiedObjective(eps=0.05, eps_schedule=Lin(0.0, 1.0, 0.0, 2.0),
                           mix=Lin(0.0, 0.5, 0.0, 2.0))
  tx = optax.adam(3e-3)
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, epoch):
    traces.append(1)
    fn = lambda p: obj(bind(model, {"params": p}, train=True), x, y,
                       jax.random.PRNGKey(0), epoch=epoch)
    (loss, aux), g = jax.value_and_grad(fn, has_aux=True)(params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, aux

  for i in range(60):
    params, state, aux = step(params, state, jnp.float32(i / 20))
  assert len(traces) == 1
  ok = certify.verify(model, {"params": params}, x, y, 0.05, "box")
  assert float(jnp.mean(ok)) > 0.8


def test_zonotope_domain_and_deep_loss_collection():
  model = _diffai.DiffAINet(dense=(8, 8), num_classes=2,
                            abstract=(("dense0", _diffai.Abstract.of("deep_loss", weight=0.5)),))
  x, y = _data(8)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  apply_fn = bind(model, v, train=True)   # the objective makes "losses" mutable
  obj = CertifiedObjective(eps=0.05, domain="zonotope", eps_schedule=1.0, mix=1.0)
  loss, aux = jax.jit(lambda x, y: obj(apply_fn, x, y, None))(x, y)
  assert float(aux["deep_loss"]) > 0
  np.testing.assert_allclose(loss, aux["abstract_loss"] + aux["deep_loss"], rtol=1e-5)
  assert aux["model_state"] == {}   # the point pass sows nothing
  assert aux["logits"].shape == (8, 2)
  g = jax.jit(jax.grad(lambda p: obj(bind(model, {"params": p}, train=True),
                             x, y, None)[0]))(v["params"])
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree_util.tree_leaves(g))
  with pytest.raises(TypeError, match="abstract"):
    obj(ModelFn.wrap(lambda a: jnp.zeros((8, 2))), x, y, None)
  with pytest.raises(TypeError, match="ModelFn"):
    obj(lambda a: model.apply(v, a, train=True), x, y, None)
