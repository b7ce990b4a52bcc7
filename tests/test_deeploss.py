"""DiffAI's DeepLoss (issue 14 section 2): the term, its schedule, and that it trains.

The term follows Mirman, Singh & Vechev (2019) section 3.3 with ``j != i``; the
certified objective scales the collected terms by its ``deep_weight`` schedule and
mixes them with the base loss; the training step differentiates through them and keeps
the transient ``"losses"`` collection out of the state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdefense.models import _diffai
from jaxdefense.nn import _abstract_layers as A
from jaxdefense.objectives import parse
from jaxdefense.objectives._certified import CertifiedObjective, Lin
from jaxdefense.training import create_train_state, make_train_step


def _naive(l, u):
  """The paper's formula with j != i, O(n^2), float64; max of an empty set is 0."""
  l, u = np.asarray(l, np.float64), np.asarray(u, np.float64)
  n = l.size
  lb = [max([max(u[j] - l[i], 0.0) for j in range(n) if j != i and l[j] <= l[i]] or [0.0])
        for i in range(n)]
  ub = [max([max(u[i] - l[j], 0.0) for j in range(n) if j != i and u[i] <= u[j]] or [0.0])
        for i in range(n)]
  return (sum(lb) + sum(ub)) / (2 * n)


def test_deep_loss_equals_hand_computation():
  # l = (0, 1, 2), u = (3, 1.5, 2.5):
  #   L_lb = (none -> 0, relu(3 - 1) = 2, max(relu(3 - 2), relu(1.5 - 2)) = 1)  sum 3
  #   L_ub = (none -> 0, max(relu(1.5 - 0), relu(1.5 - 2)) = 1.5, relu(2.5 - 0) = 2.5)  sum 4
  #   L = (3 + 4) / (2 * 3) = 7 / 6   (with j = i included it would be 19 / 6)
  got = A.deep_loss(jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[3.0, 1.5, 2.5]]))
  np.testing.assert_allclose(got, [7 / 6], rtol=1e-6)
  # Ties: l = (1, 1), u = (2, 3): L_lb = (relu(3 - 1), relu(2 - 1)) = (2, 1),
  # L_ub = (relu(2 - 1), none) = (1, 0): L = 4 / 4.
  got = A.deep_loss(jnp.array([[1.0, 1.0]]), jnp.array([[2.0, 3.0]]))
  np.testing.assert_allclose(got, [1.0], rtol=1e-6)
  # One variable: no other dimension, no loss; disjoint intervals: no overlap.
  assert float(A.deep_loss(jnp.array([[0.0]]), jnp.array([[5.0]]))[0]) == 0.0
  assert float(A.deep_loss(jnp.array([[0.0, 2.0]]), jnp.array([[1.0, 3.0]]))[0]) == 0.0


def test_deep_loss_matches_definition_on_random_bounds_with_ties():
  rng = np.random.RandomState(0)
  for n in (1, 2, 3, 7, 16):
    lo = np.round(rng.uniform(-2, 2, (5, n)) * 2) / 2          # many ties
    hi = lo + np.round(rng.uniform(0, 2, (5, n)) * 2) / 2
    got = jax.jit(A.deep_loss)(jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32))
    np.testing.assert_allclose(got, [_naive(a, b) for a, b in zip(lo, hi)],
                               rtol=1e-6, atol=1e-7)
  # NHWC bounds are flattened per example.
  lo = rng.uniform(-1, 1, (2, 2, 2, 3)).astype(np.float32)
  hi = lo + rng.uniform(0, 1, lo.shape).astype(np.float32)
  np.testing.assert_allclose(A.deep_loss(lo, hi),
                             [_naive(a.ravel(), b.ravel()) for a, b in zip(lo, hi)], rtol=1e-5)


# ------------------------------------------------------------------ the train step
def _model(with_deep: bool = True) -> _diffai.DiffAINet:
  abstract = (("conv0", _diffai.Abstract.of("deep_loss", weight=1.0)),) if with_deep else ()
  return _diffai.DiffAINet(convs=((4, 3, 2, 1),), dense=(8,), num_classes=3,
                           abstract=abstract)


def _grad_recorder() -> optax.GradientTransformation:
  """An 'optimizer' whose state is the last gradient (parameters unchanged)."""
  zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
  return optax.GradientTransformation(zeros, lambda g, s, p=None: (zeros(g), g))


@pytest.fixture(scope="module")
def batch():
  x = jnp.asarray(np.random.RandomState(1).uniform(size=(4, 8, 8, 1)), jnp.float32)
  return x, jnp.array([0, 1, 2, 0], jnp.int32)


def _step_grads(model, objective, x, y, steps_per_epoch=4):
  state = create_train_state(model, _grad_recorder(), x, jax.random.PRNGKey(0))
  step = make_train_step(objective, steps_per_epoch=steps_per_epoch, donate=False)
  new_state, metrics = step(state, x, y)
  return new_state, jax.device_get(metrics)


def test_deep_loss_trains_through_the_real_train_step(batch):
  x, y = batch
  base = dict(eps=0.1, eps_schedule=1.0, mix=0.5)
  runs = {w: _step_grads(_model(), CertifiedObjective(**base, deep_weight=w), x, y)
          for w in (0.0, 0.5, 1.0)}
  plain_state, plain_m = _step_grads(_model(False), CertifiedObjective(**base), x, y)
  grads = {w: s.opt_state for w, (s, _) in runs.items()}
  # The term is there, and weighted.
  for w, (_, m) in runs.items():
    assert m["deep_loss"] / m["count"] > 0
    np.testing.assert_allclose(m["deep_weight"] / m["count"], w)
  # Zero weight: no contribution, bit for bit (same loss and gradient as no DeepLoss).
  assert runs[0.0][1]["loss"] == plain_m["loss"]
  for a, b in zip(jax.tree_util.tree_leaves(grads[0.0]),
                  jax.tree_util.tree_leaves(plain_state.opt_state)):
    np.testing.assert_array_equal(a, b)
  # Non-zero weight: the layers before the DeepLoss point get a non-zero gradient from
  # the term, proportional to the weight; the layers after it get none.
  d_half = jax.tree_util.tree_map(lambda a, b: a - b, grads[0.5], grads[0.0])
  d_one = jax.tree_util.tree_map(lambda a, b: a - b, grads[1.0], grads[0.0])
  conv = d_half["Conv_0"]["kernel"]
  assert float(jnp.max(jnp.abs(conv))) > 1e-4
  np.testing.assert_allclose(d_one["Conv_0"]["kernel"], 2 * conv, rtol=1e-3, atol=1e-6)
  for name in ("Dense_0", "Dense_1"):
    for leaf in jax.tree_util.tree_leaves(d_half[name]):
      np.testing.assert_allclose(leaf, 0.0, atol=1e-6)
  # The loss reported by the step is the mixed loss.
  m = runs[0.5][1]
  np.testing.assert_allclose(
      m["loss"], 0.5 * m["point_loss"] + 0.5 * m["abstract_loss"] + 0.5 * m["deep_loss"],
      rtol=1e-5)


def test_gradient_of_the_term_matches_autodiff_of_the_definition(batch):
  """The step's extra gradient equals grad of w * mean DeepLoss(bounds after conv0)."""
  x, y = batch
  model = _model()
  obj = CertifiedObjective(eps=0.1, eps_schedule=1.0, mix=0.5, deep_weight=0.7)
  (s1, _), (s0, _) = (_step_grads(model, obj, x, y),
                      _step_grads(model, CertifiedObjective(eps=0.1, eps_schedule=1.0,
                                                            mix=0.5, deep_weight=0.0), x, y))
  params = create_train_state(model, _grad_recorder(), x, jax.random.PRNGKey(0)).params
  from jaxdefense import certify, nn as jnn

  def term(kernel, bias):
    box = certify.input_set(x, 0.1, "box")
    conv = jnn.Conv(4, 3, strides=2, padding=1, use_bias=True)
    z = jnn.relu(conv.apply({"params": {"kernel": kernel, "bias": bias}}, box))
    lo, hi = z.concretize()
    return 0.7 * jnp.mean(A.deep_loss(lo, hi))
  gk, gb = jax.grad(term, argnums=(0, 1))(params["Conv_0"]["kernel"], params["Conv_0"]["bias"])
  np.testing.assert_allclose(s1.opt_state["Conv_0"]["kernel"] - s0.opt_state["Conv_0"]["kernel"],
                             gk, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(s1.opt_state["Conv_0"]["bias"] - s0.opt_state["Conv_0"]["bias"],
                             gb, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("objective", ["certified", "language"])
def test_losses_collection_never_reaches_the_state(batch, objective):
  x, y = batch
  model = _model()
  obj = (CertifiedObjective(eps=0.1, eps_schedule=1.0, mix=0.5) if objective == "certified"
         else parse("Mix(Point, Box, 0.5)", eps=0.1))
  state = create_train_state(model, optax.sgd(0.1), x, jax.random.PRNGKey(0))
  assert "losses" not in state.model_state
  step = make_train_step(obj, steps_per_epoch=4, donate=False)
  s1, m1 = step(state, x, y)
  s2, _ = step(s1, x, y)

  def paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  for s in (s1, s2):
    assert s.model_state == {}
    assert not any("losses" in p for p in paths(s.to_tree()))
    assert not any("losses" in p for p in paths(s.variables))
  # A state that carries a stale "losses" collection (e.g. a model initialised on an
  # abstract value in training mode): the stale terms are neither added to this step's
  # loss nor kept.
  stale = state.replace(model_state={"losses": {"Stale": {"deep_loss": (jnp.float32(1e3),)}}})
  s3, m3 = make_train_step(obj, steps_per_epoch=4, donate=False)(stale, x, y)
  assert s3.model_state == {}
  np.testing.assert_allclose(m3["deep_loss"], m1["deep_loss"], rtol=1e-6)
  np.testing.assert_allclose(m3["loss"], m1["loss"], rtol=1e-6)


def test_weight_schedule_is_read_at_the_epoch_without_retracing(batch):
  x, y = batch
  spe = 2
  obj = CertifiedObjective(eps=0.1, eps_schedule=1.0, mix=0.5,
                           deep_weight=Lin(0.0, 1.0, 0.5, 1.0))
  state = create_train_state(_model(), optax.sgd(0.01), x, jax.random.PRNGKey(0))
  step = make_train_step(obj, steps_per_epoch=spe, donate=False)
  seen = []
  for _ in range(5):
    state, m = step(state, x, y)
    seen.append(float(m["deep_weight"] / m["count"]))
  # epochs 0, 0.5, 1, 1.5, 2 -> Lin(0, 1, hold 0.5, ramp 1)
  np.testing.assert_allclose(seen, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
  assert step.traces == 1
  assert float(obj.deep_weight_at(None)) == 1.0     # no epoch: the schedule's end


def test_convex_mixing_and_bad_arguments(batch):
  x, y = batch
  model = _model()
  state = create_train_state(model, optax.sgd(0.0), x, jax.random.PRNGKey(0))
  obj = CertifiedObjective(eps=0.1, eps_schedule=1.0, mix=0.5, deep_weight=0.25,
                           deep_mix="convex")
  _, m = make_train_step(obj, steps_per_epoch=4, donate=False)(state, x, y)
  m = {k: v / m["count"] for k, v in m.items()}
  want = 0.5 * m["point_loss"] + 0.5 * (0.75 * m["abstract_loss"] + 0.25 * m["deep_loss"])
  np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
  with pytest.raises(ValueError, match="deep_weight"):
    CertifiedObjective(deep_weight=-1.0)
  with pytest.raises(ValueError, match="deep_weight"):
    CertifiedObjective(deep_weight="0.1")
  with pytest.raises(ValueError, match="deep_weight"):
    CertifiedObjective(deep_weight=2.0, deep_mix="convex")
  with pytest.raises(ValueError, match="deep_mix"):
    CertifiedObjective(deep_mix="multiply")
