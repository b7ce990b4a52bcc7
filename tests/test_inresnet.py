"""In-ResNet as the authors train it: storage, weight-decay direction, per-kind
initialisation, the sown coefficients and :func:`jaxdefense.analysis.damping_coefficients`."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdefense as jd
from jaxdefense import configs, training
from jaxdefense.analysis import damping_coefficients
from jaxdefense.dynamics import Damped, StepContext

KINDS = ("relu", "lambda", "sig", "gating", "gating_sig")
SIGMOID = {"sig", "gating_sig"}
CTX = StepContext(index=3, transition=False, train=False)
X = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1))


def _tiny(step, **kw):
  """Pre-activation ResNet with blocks 0..4; blocks 1 and 3 are damped (0 is the first,
  2 and 4 are stage transitions)."""
  return jd.models.create("preact_resnet8", stage_sizes=(2, 2, 1), widths=(4, 8, 8),
                          stem_width=4, num_classes=3, step=step, **kw)


_VARS = {}


def _variables(step):
  """Variables of the tiny net with ``step`` (cached: one init per rule)."""
  if step not in _VARS:
    _VARS[step] = _tiny(step).init(jax.random.key(0), X)   # eager: cheaper than compiling
  return _VARS[step]


def _act(kind, z):
  z = np.asarray(z, np.float64)
  return 1 / (1 + np.exp(-z)) if kind in SIGMOID else np.maximum(z, 0.0)


# ------------------------------------------------------------------ storage and decay
def test_storage_names_the_parameter_as_the_authors():
  names = {kind: Damped(kind).param_names() for kind in KINDS}
  assert names == {"relu": ("k",), "lambda": ("lambda",), "sig": ("lambda",),
                   "gating": ("gate_kernel", "gate_bias"),
                   "gating_sig": ("gate_kernel", "gate_bias")}
  assert Damped("relu", storage="lambda").param_names() == ("lambda",)
  params = _variables(Damped("relu"))["params"]
  assert sorted(n for n in params if "k" in params[n]) == ["block1", "block3"]
  assert not any("lambda" in sub for sub in params.values() if isinstance(sub, dict))
  # k = 1 - lambda with lambda ~ U(0.2, 0.25): k ~ U(0.75, 0.8), as the authors
  for name in ("block1", "block3"):
    assert 0.75 - 1e-6 <= float(params[name]["k"]) <= 0.8 + 1e-6


@pytest.mark.parametrize("step,direction", [
    (Damped("relu"), +1),                   # In-ResNet: k -> 0 pulls lambda toward 1 (CNN)
    (Damped("lambda"), -1),                 # lambda-In-ResNet: toward 0 (ResNet)
    (Damped("relu", storage="lambda"), -1),  # storing lambda: toward the ResNet
])
def test_one_step_of_weight_decay_moves_lambda_as_the_authors(step, direction):
  """One SGD step (the training optimizer: momentum 0.9, L2 weight decay 1e-4 on every
  parameter) with zero loss gradients: p <- p - lr * wd * p."""
  lr, wd = 0.1, 1e-4
  config = configs.get("demo", [f"optimizer.weight_decay={wd}", "optimizer.momentum=0.9"])
  tx = training.build_optimizer(config, optax.constant_schedule(lr))
  params = _variables(step)["params"]
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params),
                         params)
  decayed = optax.apply_updates(params, updates)
  model = _tiny(step)
  before = damping_coefficients(model, {"params": params})
  after = damping_coefficients(model, {"params": decayed})
  assert [r.block for r in before] == [r.block for r in after] == ["block1", "block3"]
  name = step.param_names()[0]
  for b, a in zip(before, after):
    stored = float(params[b.block][name])
    # lambda = relu(1 - k): d lambda = + lr wd k;  lambda stored: d lambda = - lr wd lambda
    expected = b.mean + direction * lr * wd * stored
    assert np.sign(a.mean - b.mean) == direction, (b, a)
    np.testing.assert_allclose(a.mean, expected, rtol=0, atol=5e-7)


# ------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init_range", [None, (0.1, 0.2), (0.35, 0.35)])
def test_initial_coefficients_fill_the_documented_range(kind, init_range):
  step = Damped(kind, init_range=init_range)
  lo, hi = (0.2, 0.25) if init_range is None else init_range
  assert step.lambda_init_range == (lo, hi) and jd.dynamics.DAMPED_INIT_RANGES[kind] == (0.2,
                                                                                         0.25)
  specs = step.param_specs(CTX, jnp.zeros((1, 2, 2, 3)))
  name = step.param_names()[-1]   # lambda, k or the gate bias
  init, _ = specs[name]
  stored = init(jax.random.key(2), (4000,))
  params = {name: stored}
  if step.gating:   # W_d = 0: the gate is act(b_d) whatever the input
    assert np.all(np.asarray(specs["gate_kernel"][0](jax.random.key(3), (3, 3))) == 0)
    params["gate_kernel"] = jnp.zeros((1, 4000))   # a [1] -> [4000] map on rank-2 input
    a = step.coefficient(jnp.ones((1, 1)), CTX, params)[0]
  else:
    a = step.coefficient(None, CTX, params)
  a = np.asarray(a, np.float64)
  assert np.all((lo - 1e-6 <= a) & (a <= hi + 1e-6)), (a.min(), a.max())
  # uniform over the whole effective range: both ends are reached
  assert a.min() <= lo + 0.02 * (hi - lo) + 1e-6 and a.max() >= hi - 0.02 * (hi - lo) - 1e-6
  if kind in SIGMOID:   # the stored value is the logit, no longer lambda itself (~0.55)
    np.testing.assert_allclose(np.asarray(stored), np.log(a / (1 - a)), atol=1e-4)


def test_the_164_layer_init_is_an_init_range():
  params = _variables(Damped("relu", init_range=(0.1, 0.2)))["params"]
  rows = damping_coefficients(_tiny(Damped("relu", init_range=(0.1, 0.2))), {"params": params})
  assert len(rows) == 2 and all(0.1 - 1e-6 <= r.mean <= 0.2 + 1e-6 for r in rows)
  assert all(0.8 - 1e-6 <= float(params[r.block]["k"]) <= 0.9 + 1e-6 for r in rows)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_is_the_resnet_step_and_one_the_plain_cnn_for_every_kind(kind):
  x = jax.random.normal(jax.random.key(4), (2, 3, 3, 4))
  fx = jax.random.normal(jax.random.key(5), (2, 3, 3, 4))
  euler = jd.dynamics.Euler()(x, fx, CTX)
  for storage in ("authors", "lambda"):
    step = Damped(kind, storage=storage)

    def params(a):
      p = jnp.full((4,) if step.gating else (), step.parameter_for(a), jnp.float32)
      if step.gating:
        return {"gate_kernel": jnp.zeros((1, 1, 4, 4)), "gate_bias": p}
      return {step.param_names()[0]: p}

    np.testing.assert_allclose(step(x, fx, CTX, params=params(0.0)), euler, rtol=0, atol=0)
    cnn = 2 * fx if kind == "lambda" else fx
    np.testing.assert_allclose(step(x, fx, CTX, params=params(1.0)), cnn, rtol=0, atol=0)
    # in between: (1 - a) x + rho f with a read back from the stored value
    a = float(step.coefficient(x, CTX, params(0.3)).mean())
    np.testing.assert_allclose(a, 0.3, atol=1e-6)
    rho = 1.3 if kind == "lambda" else 1.0
    np.testing.assert_allclose(step(x, fx, CTX, params=params(0.3)), 0.7 * x + rho * fx,
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ sown coefficients
def test_apply_step_sows_the_coefficient_only_when_asked():
  step = Damped("gating_sig")
  model, v = _tiny(step), _variables(step)
  logits, state = model.apply(v, X, mutable=["intermediates"])
  np.testing.assert_allclose(logits, model.apply(v, X), rtol=1e-6, atol=1e-6)
  sown = state["intermediates"]
  assert sorted(sown) == ["block1", "block3"]
  assert sown["block1"]["damping"][0].shape == (3, 8, 8, 4)
  assert sown["block3"]["damping"][0].shape == (3, 4, 4, 8)
  # at initialisation (W_d = 0) the gate is act(b_d), the same at every position
  b = v["params"]["block1"]["gate_bias"]
  np.testing.assert_allclose(sown["block1"]["damping"][0],
                             np.broadcast_to(jax.nn.sigmoid(b), (3, 8, 8, 4)), rtol=1e-6)
  # the scalar kinds sow their scalar; the first block and transitions sow nothing
  step = Damped("relu")
  _, state = _tiny(step).apply(_variables(step), X, mutable=["intermediates"])
  k = _variables(step)["params"]["block3"]["k"]
  assert sorted(state["intermediates"]) == ["block1", "block3"]
  np.testing.assert_allclose(state["intermediates"]["block3"]["damping"][0], 1 - k, rtol=1e-6)


# ------------------------------------------------------------------ the reader
def test_reader_on_a_hand_built_variable_tree():
  conv = {"Conv_0": {"kernel": jnp.zeros((3, 3, 4, 4))}}
  variables = {"params": {
      "Conv_0": {"kernel": jnp.zeros((3, 3, 1, 4))},
      "block0": conv, "block2": conv,
      "block10": {**conv, "k": jnp.float32(1.3)},   # relu(1 - 1.3) = 0 (ResNet)
      "block3": {**conv, "k": jnp.float32(-0.5)},   # 1.5: negative shortcut weight
      "block1": {**conv, "k": jnp.float32(0.7)},
  }, "batch_stats": {}}
  rows = damping_coefficients(_tiny(Damped("relu")), variables)
  assert [r.block for r in rows] == ["block1", "block3", "block10"]   # network order
  np.testing.assert_allclose([r.mean for r in rows], [0.3, 1.5, 0.0], atol=1e-6)
  assert all(r.std == 0 and r.count == 1 and r.min == r.max == r.mean and r.kind == "relu"
             and r.path == (r.block,) for r in rows)
  # the same tree read as the other storages and kinds
  lam = {"params": {"block1": {"lambda": jnp.float32(-0.2)}, "block3": {"lambda": 0.4}}}
  for step, expected in ((Damped("relu", storage="lambda"), [0.0, 0.4]),
                         (Damped("lambda"), [0.0, 0.4]),
                         (Damped("sig"), [1 / (1 + np.exp(0.2)), 1 / (1 + np.exp(-0.4))])):
    rows = damping_coefficients(_tiny(step), lam)
    np.testing.assert_allclose([r.mean for r in rows], expected, rtol=1e-6)
  # an ensemble: one row per member and block, from the stacked leaves
  ens = jd.models.Ensemble(member=_tiny(Damped("relu")), size=2)
  stacked = {"params": {"member": {"block1": {"k": jnp.array([0.7, 0.9])},
                                   "block3": {"k": jnp.array([0.2, 1.1])}}}}
  rows = damping_coefficients(ens, stacked)
  assert [r.block for r in rows] == ["member0/block1", "member0/block3", "member1/block1",
                                     "member1/block3"]
  np.testing.assert_allclose([r.mean for r in rows], [0.3, 0.8, 0.1, 0.0], atol=1e-6)


@pytest.mark.parametrize("kind", ["gating", "gating_sig"])
def test_reader_on_a_gating_model_with_images(kind):
  step = Damped(kind)
  model, v = _tiny(step), _variables(step)
  # at initialisation W_d = 0: the gate is act(b_d) per channel, so the mean and the
  # spread over batch, positions and channels are those of act(b_d) over channels
  rows = damping_coefficients(model, v, X)
  assert [r.block for r in rows] == ["block1", "block3"] and all(r.kind == kind for r in rows)
  for r, (hw, c) in zip(rows, ((8 * 8, 4), (4 * 4, 8))):
    gate = _act(kind, v["params"][r.block]["gate_bias"])
    np.testing.assert_allclose([r.mean, r.std, r.min, r.max],
                               [gate.mean(), gate.std(), gate.min(), gate.max()],
                               rtol=1e-5, atol=1e-7)
    assert r.count == X.shape[0] * hw * c and 0.2 - 1e-6 <= r.min <= r.max <= 0.25 + 1e-6
  # an input-dependent gate: the reader equals the pure rule on each block's input,
  # taken from the blocks' outputs (block n's shortcut input is block n-1's output)
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: (jax.random.normal(jax.random.key(7), a.shape) if p[-1].key == "gate_kernel"
                    else a), v["params"])
  v2 = {**v, "params": params}
  rows = damping_coefficients(model, v2, X)
  _, states = model.apply(v2, X, capture_states=True)
  for r, n in zip(rows, (1, 3)):
    a = np.asarray(step.coefficient(states[n - 1], None, params[f"block{n}"]), np.float64)
    assert a.std() > 1e-3   # really varies over the batch and positions
    np.testing.assert_allclose([r.mean, r.std, r.min, r.max],
                               [a.mean(), a.std(), a.min(), a.max()], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ bad inputs
def test_bad_damped_arguments_are_clear_errors():
  with pytest.raises(ValueError, match=r"Damped.kind must be one of .*got 'tanh'"):
    Damped("tanh")
  with pytest.raises(ValueError, match=r"Damped.storage must be one of .*got 'k'"):
    Damped("relu", storage="k")
  bad = [("sig", (0.0, 0.3), r"inside \(0, 1\)"), ("gating_sig", (0.5, 1.0), r"inside \(0, 1\)"),
         ("relu", (-0.1, 0.2), r"\[0, inf\)"), ("lambda", (-1.0, 0.0), r"\[0, inf\)"),
         ("gating", (-0.5, -0.1), r"\[0, inf\)"), ("relu", (0.3, 0.1), "low <= high"),
         ("sig", (0.1, float("nan")), "finite")]
  for kind, init_range, why in bad:
    with pytest.raises(ValueError, match=rf"Damped.init_range \(kind='{kind}'\).*{why}"):
      Damped(kind, init_range=init_range)
  with pytest.raises(ValueError, match=r"init_range.*got \(-0\.1, 0\.2\)"):
    Damped("relu", init_range=(-0.1, 0.2))
  for init_range in ((0.2,), "ab", ("a", "b"), 0.3):
    with pytest.raises(TypeError, match=r"Damped.init_range \(kind='relu'\)"):
      Damped("relu", init_range=init_range)
  # what each kind can represent is accepted: lambda > 1 (k < 0), lambda = 0, a point
  assert Damped("relu", init_range=[1.0, 1.5]).init_range == (1.0, 1.5)
  assert Damped("gating", init_range=(0, 0)).init_range == (0.0, 0.0)
  assert Damped("sig", init_range=(0.4, 0.4)).init_range == (0.4, 0.4)
  with pytest.raises(ValueError, match="not damped|plain residual block"):
    Damped().coefficient(None, CTX._replace(index=0), {"k": 1.0})
  with pytest.raises(ValueError, match="needs the parameters"):
    Damped().coefficient(None, CTX, {"lambda": 1.0})
  with pytest.raises(ValueError, match="depends on the block input; got x=None"):
    Damped("gating").coefficient(None, CTX, {"gate_kernel": jnp.zeros((2, 2)),
                                             "gate_bias": jnp.zeros(2)})


def test_reader_bad_inputs_are_clear_errors():
  plain = jd.models.create("preact_resnet8")
  with pytest.raises(ValueError, match=r"step is jaxdefense.dynamics.Damped; got ResNet "
                                       r"with step Euler\(\)"):
    damping_coefficients(plain, {"params": {}})
  with pytest.raises(ValueError, match="got MLP with step None"):
    damping_coefficients(jd.models.create("mlp"), {"params": {}})
  # a damped model given variables without damped blocks (a plain net's, or another
  # storage's): the error names the model, its rule and what the variables hold
  step = Damped("relu")
  v = _variables(step)
  stripped = {**v, "params": {n: ({k: a for k, a in sub.items() if k != "k"}
                                  if isinstance(sub, dict) else sub)
                              for n, sub in v["params"].items()}}
  with pytest.raises(ValueError, match=r"no damped block .*ResNet .*storage='authors'.*"
                                       r"\['k'\].*top-level params \['BatchNorm_0'"):
    damping_coefficients(_tiny(step), stripped)
  with pytest.raises(ValueError, match=r"no damped block .*\['lambda'\]"):
    damping_coefficients(_tiny(Damped("relu", storage="lambda")), v)
  with pytest.raises(TypeError, match="flax.linen.Module"):
    damping_coefficients("resnet8", v)
  with pytest.raises(TypeError, match="'params' collection"):
    damping_coefficients(_tiny(step), {"batch_stats": {}})
  gated = Damped("gating")
  with pytest.raises(ValueError, match=r"x is required .*kind='gating'"):
    damping_coefficients(_tiny(gated), _variables(gated))
  with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
    damping_coefficients(_tiny(gated), _variables(gated), X * 255)
  ens = jd.models.Ensemble(member=_tiny(step), size=2)
  with pytest.raises(ValueError, match="'member' sub-tree"):
    damping_coefficients(ens, v)


# ------------------------------------------------------------------ configs
def test_new_fields_round_trip_through_configs():
  for step in (Damped("relu", storage="lambda"), Damped("sig", (0.1, 0.3)), Damped("gating"),
               Damped("lambda", (0.1, 0.2), False, True, "lambda")):
    spec = jd.dynamics.step_to_dict(step)
    assert set(spec) == {"name", "kind", "init_range", "skip_first", "skip_transitions",
                         "storage"}
    assert jd.dynamics.step_from_dict(spec) == step
  # an older complete config carrying Damped's former default init_range still loads
  assert jd.dynamics.step_from_dict({"name": "euler", "kind": "relu",
                                     "init_range": (0.2, 0.25)}) == jd.dynamics.Euler()
  c = configs.get("demo", ["model.name=preact_resnet8", "model.step.name=damped",
                           "model.step.kind=sig", "model.step.storage=lambda",
                           "model.step.init_range=(0.1, 0.2)"])
  assert training.build_model(c, 10).step == Damped("sig", (0.1, 0.2), storage="lambda")
  with pytest.raises(ValueError, match=r"Damped.init_range \(kind='sig'\)"):
    training.build_model(configs.get("demo", [
        "model.name=preact_resnet8", "model.step.name=damped", "model.step.kind=sig",
        "model.step.init_range=(0.0, 0.2)"]), 10)


def test_probe_block_matches_the_coefficient_inside_a_module():
  """apply_step inside any module: the damped output uses the rule's own coefficient."""
  class Probe(fnn.Module):
    step: object

    @fnn.compact
    def __call__(self, x, fx):
      return jd.dynamics.apply_step(self, self.step, x, fx, CTX)

  x = jax.random.uniform(jax.random.key(8), (2, 3, 3, 2))
  fx = jax.random.uniform(jax.random.key(9), (2, 3, 3, 2))
  for kind in KINDS:
    probe = Probe(Damped(kind, init_range=(0.3, 0.4)))
    v = probe.init(jax.random.key(0), x, fx)
    out, state = probe.apply(v, x, fx, mutable=["intermediates"])
    a = state["intermediates"]["damping"][0]
    rho = 1 + a if kind == "lambda" else 1.0
    np.testing.assert_allclose(out, (1 - a) * x + rho * fx, rtol=1e-6, atol=1e-6)
    assert np.all((0.3 - 1e-6 <= np.asarray(a)) & (np.asarray(a) <= 0.4 + 1e-6)), kind


def test_damped_step_that_damps_no_block_is_an_error():
  """On a one-block-per-stage ResNet the default skips leave nothing damped: an error,
  not a silent plain ResNet."""
  import jax
  import jax.numpy as jnp
  import jaxdefense as jd
  from jaxdefense.dynamics import Damped
  x = jnp.zeros((1, 8, 8, 1))
  with pytest.raises(ValueError, match="damps no block.*skip_first"):
    jd.models.create("preact_resnet8", num_classes=10, step=Damped()).init(
        jax.random.PRNGKey(0), x)
  v = jd.models.create("preact_resnet8", num_classes=10,
                       step=Damped(skip_first=False)).init(jax.random.PRNGKey(0), x)
  assert any("block0" in k for k in v["params"])
