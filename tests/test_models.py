"""Model zoo, step rules and ensembles: mathematics and errors."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
from jaxdefense.dynamics import Damped, Euler, EulerMaruyama, StepContext

KEY = jax.random.key(0)


def _x(shape=(4, 8, 8, 1), seed=1):
  return jax.random.uniform(jax.random.key(seed), shape)


def _init(model, x, seed=0):
  return model.init({"params": jax.random.key(seed), "noise": jax.random.key(seed + 1)}, x)


# ------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("name,expected", [
    ("resnet20", 269_722),       # published 0.27M
    ("resnet32", 464_154),
    ("resnet44", 658_586),       # published 0.66M
    ("resnet56", 853_018),       # published 0.85M
    ("resnet110", 1_727_962),    # published 1.7M
    ("preact_resnet164", 1_703_258),  # published 1.7M
    ("wrn34_10", 46_160_474),    # published 46.2M
    ("resnext29_8x64d", 34_426_698),  # published 34.4M
])
def test_parameter_counts_match_published(name, expected):
  model = jd.models.create(name)
  shapes = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 32, 32, 3))))
  assert jd.models.count_params(shapes) == expected


def test_published_counts_rounded():
  # The papers quote rounded figures; our exact counts round to them.
  def count(name):
    m = jd.models.create(name)
    return jd.models.count_params(jax.eval_shape(lambda: m.init(KEY, jnp.zeros((1, 32, 32, 3)))))
  assert round(count("resnet20") / 1e6, 2) == 0.27
  assert round(count("resnet44") / 1e6, 2) == 0.66
  assert round(count("resnet110") / 1e6, 1) == 1.7
  assert round(count("wrn34_10") / 1e6) == 46
  assert round(count("preact_resnet18") / 1e6, 1) == 11.2   # the PGD-AT / TRADES ResNet-18
  assert round(count("resnext29_8x64d") / 1e6) == 34


# Every model is checked abstractly (jax.eval_shape: shapes and dtypes, no arithmetic,
# fast even for WRN-34-10); the small ones of each family also run for real (the
# EnResNet ensembles run for real in test_enresnet.py).
_RUN_FOR_REAL = ("mlp", "ffnn", "conv_small", "resnet_tiny", "resnet8", "preact_resnet8")


def _smallest_input(name):
  """[B, H, W, C] of the smallest sensible input of a registered model."""
  # DiffAI's ConvSmall has two unpadded 4x4 stride-2 convolutions: 8x8 leaves nothing
  return (3, 16, 16, 3) if name == "conv_small" else (3, 8, 8, 1)


def test_models_run_for_real_are_registered():
  assert set(_RUN_FOR_REAL) <= set(jd.models.names())


@pytest.mark.parametrize("name", jd.models.names())
def test_every_registered_model_runs_on_small_inputs(name):
  # num_classes = 7 is no model's default: a preset that drops the override fails
  model = jd.models.create(name, num_classes=7)
  x = _x(_smallest_input(name))
  rngs = {"params": jax.random.key(0), "noise": jax.random.key(1)}
  logits, variables = jax.eval_shape(lambda a: model.init_with_output(rngs, a), x)
  assert logits.shape == (x.shape[0], 7) and logits.dtype == jnp.float32, (name, logits)
  assert jd.models.count_params(variables) > 0, name
  if name not in _RUN_FOR_REAL:
    return
  variables = model.init(rngs, x)
  logits = model.apply(variables, x, rngs={"noise": jax.random.key(2)})
  assert logits.shape == (x.shape[0], 7) and logits.dtype == jnp.float32, name
  assert np.all(np.isfinite(np.asarray(logits))), name
  # each example has its own logits (a model that ignored or mixed up the batch would not)
  assert float(jnp.min(jnp.max(jnp.abs(logits[1:] - logits[:1]), axis=-1))) > 0, name


def test_default_num_classes_and_mnist_size_input():
  model = jd.models.create("resnet8")
  x = _x((2, 28, 28, 1))
  assert model.apply(_init(model, x), x).shape == (2, 10)


# ------------------------------------------------------------------------ step rules
def test_noise_coefficient_zero_equals_plain_resnet():
  x = _x()
  plain = jd.models.create("preact_resnet8")
  noisy0 = jd.models.create("preact_resnet8", step=EulerMaruyama(coef=0.0))
  v = _init(plain, x)
  np.testing.assert_array_equal(plain.apply(v, x), noisy0.apply(v, x, rngs={"noise": KEY}))
  np.testing.assert_array_equal(plain.apply(v, x, train=True, mutable=["batch_stats"])[0],
                                noisy0.apply(v, x, train=True, mutable=["batch_stats"])[0])


def _set_lambdas(params, step, value):
  """Every damped block's stored parameter (``k`` or ``lambda``) set so that its
  effective coefficient is ``value``."""
  name, stored = step.param_names()[0], step.parameter_for(value)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.full_like(a, stored) if path[-1].key == name else a, params)


@pytest.mark.parametrize("kind", ["relu", "lambda"])
def test_damped_at_lambda_zero_equals_resnet(kind):
  x = _x()
  step = Damped(kind)
  damped = jd.models.create("preact_resnet20", step=step)
  plain = jd.models.create("preact_resnet20")
  vd = _init(damped, x)
  vd = {**vd, "params": _set_lambdas(vd["params"], step, 0.0)}
  # the plain net has the same variables without the damping coefficients
  vp = {**vd, "params": {name: ({k: a for k, a in sub.items() if k not in step.param_names()}
                                if isinstance(sub, dict) else sub)
                         for name, sub in vd["params"].items()}}
  np.testing.assert_allclose(damped.apply(vd, x), plain.apply(vp, x), rtol=0, atol=0)


def test_damped_lambda_one_is_plain_cnn_step():
  class Probe(fnn.Module):
    step: object

    @fnn.compact
    def __call__(self, x, fx):
      return jd.dynamics.apply_step(self, self.step, x, fx,
                                     StepContext(index=3, transition=False, train=False))

  x, fx = _x((2, 4, 4, 3), 1), _x((2, 4, 4, 3), 2)
  probe = Probe(Damped("relu", init_range=(1.0, 1.0)))
  v = probe.init(KEY, x, fx)
  np.testing.assert_allclose(probe.apply(v, x, fx), fx, atol=1e-7)
  probe = Probe(Damped("lambda", init_range=(0.3, 0.3)))
  v = probe.init(KEY, x, fx)
  np.testing.assert_allclose(probe.apply(v, x, fx), 0.7 * x + 1.3 * fx, atol=1e-6)
  # first block and transitions stay plain residual, as in the authors' code
  first = Damped("relu", init_range=(1.0, 1.0))
  assert not first.damped(StepContext(0, False, False))
  assert not first.damped(StepContext(5, True, False))
  assert first.damped(StepContext(5, False, False))


def test_damped_lambda_init_range():
  x = _x()
  model = jd.models.create("preact_resnet20", step=Damped("relu", init_range=(0.1, 0.2)))
  v = _init(model, x)
  # the authors' storage: k = 1 - lambda, lambda = relu(1 - k) in the effective range
  ks = [a for p, a in jax.tree_util.tree_leaves_with_path(v["params"]) if p[-1].key == "k"]
  # 9 blocks, minus the first and the two transitions
  assert len(ks) == 6
  assert all(0.8 - 1e-6 <= float(a) <= 0.9 + 1e-6 for a in ks)


def test_gating_variants_run_and_start_as_constant_gate():
  class Probe(fnn.Module):
    step: object

    @fnn.compact
    def __call__(self, x, fx):
      ctx = StepContext(index=3, transition=False, train=False)
      return jd.dynamics.apply_step(self, self.step, x, fx, ctx)

  acts = {"gating": lambda b: np.maximum(b, 0.0), "gating_sig": lambda b: 1 / (1 + np.exp(-b))}
  for kind, act in acts.items():
    for shape in ((2, 3, 3, 4), (5, 4)):   # NHWC feature maps and rank-2 features
      x, fx = _x(shape, 1) - 0.5, _x(shape, 2)
      probe = Probe(Damped(kind, init_range=(0.1, 0.3)))
      v = probe.init(KEY, x, fx)["params"]
      # W_d starts at zero and b_d in init_range: the gate is a per-channel constant
      assert np.all(np.asarray(v["gate_kernel"]) == 0), kind
      # init_range is a range of the effective coefficient act(b_d)
      gate = act(np.asarray(v["gate_bias"], np.float64))
      assert np.all((0.1 - 1e-6 <= gate) & (gate <= 0.3 + 1e-6)), kind
      np.testing.assert_allclose(
          probe.apply({"params": v}, x, fx),
          (1 - act(np.asarray(v["gate_bias"], np.float64))) * x + fx, rtol=1e-6, atol=1e-6)
      # any bias b, one value per channel (negative ones clip to 0 under the relu gate)
      b = jnp.linspace(-1.0, 2.0, shape[-1])
      out = probe.apply({"params": {**v, "gate_bias": b}}, x, fx)
      expected = (1 - act(np.asarray(b, np.float64))) * np.asarray(x) + np.asarray(fx)
      np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
      # the gate depends on x only through W_d
      w = jnp.full_like(v["gate_kernel"], 0.1)
      assert float(jnp.max(jnp.abs(probe.apply({"params": {**v, "gate_kernel": w}}, x, fx)
                                   - probe.apply({"params": v}, x, fx)))) > 1e-3
  # in a whole network: a gating net at initialisation, every gate bias set to one value
  # per block, is the scalar-lambda Damped net of the same activation with those lambdas
  x = _x()
  for kind, scalar_kind in (("gating", "relu"), ("gating_sig", "sig")):
    # two blocks in each of the first two stages: blocks 1 and 3 are damped
    gated = jd.models.create("preact_resnet8", stage_sizes=(2, 2, 1), step=Damped(kind))
    plain = jd.models.create("preact_resnet8", stage_sizes=(2, 2, 1),
                             step=Damped(scalar_kind, storage="lambda"))
    vg = _init(gated, x)
    lams = {}
    params_g, params_p = {}, {}
    for i, (name, sub) in enumerate(sorted(vg["params"].items())):
      if isinstance(sub, dict) and "gate_bias" in sub:
        assert np.all(np.asarray(sub["gate_kernel"]) == 0)
        lams[name] = 0.1 + 0.05 * i
        params_g[name] = {**sub, "gate_bias": jnp.full_like(sub["gate_bias"], lams[name])}
        params_p[name] = {**{k: a for k, a in sub.items() if not k.startswith("gate_")},
                          "lambda": jnp.float32(lams[name])}
      else:
        params_g[name] = params_p[name] = sub
    assert sorted(lams) == ["block1", "block3"]   # not the first block, nor transitions
    np.testing.assert_allclose(gated.apply({**vg, "params": params_g}, x),
                               plain.apply({**vg, "params": params_p}, x), rtol=1e-5, atol=1e-6)


class _StepProbe(fnn.Module):
  step: object
  train: bool = True

  @fnn.compact
  def __call__(self, x, fx):
    return jd.dynamics.apply_step(self, self.step, x, fx,
                                  StepContext(index=1, transition=False, train=self.train))


@pytest.mark.parametrize("sampler", ["jax", "fast"])
def test_injected_noise_has_configured_scale(sampler):
  # Examples (x i) and channels (x 1..2) at clearly different scales, a nonzero mean and
  # an fx that triples the std: a scale taken of x instead of x + fx, an rms instead of
  # a std, or over the wrong axes (per example / per channel / per example and channel
  # / whole batch) misses the prescribed one by >= 13 % in some example or channel.
  n, c = 8, 16
  scale = (jnp.arange(1.0, n + 1).reshape(n, 1, 1, 1)
           * jnp.linspace(1.0, 2.0, c).reshape(1, 1, 1, c))
  x = jax.random.normal(jax.random.key(3), (n, 16, 16, c)) * scale + 4.0  # 4096 / example
  fx = 2.0 * x + 0.5
  base = np.asarray(x + fx, np.float64)
  expected = {"batch": base.std(),
              "sample": base.reshape(n, -1).std(axis=1).reshape(n, 1, 1, 1),
              "fixed": 1.0}
  for std, s in expected.items():
    for coef in (0.1, 0.5):
      probe = _StepProbe(EulerMaruyama(coef=coef, std=std, sampler=sampler))
      out = probe.apply({}, x, fx, rngs={"noise": jax.random.key(4)})
      # (out - x - fx) / coef = s * xi: divided by the prescribed s it must be N(0, 1)
      u = np.asarray((out - (x + fx)) / coef, np.float64) / s
      assert abs(u.std() - 1) < 0.02 and abs(u.mean()) < 0.03, (std, coef)
      per_example = u.reshape(n, -1)                       # 4096 values each
      per_channel = np.moveaxis(u, -1, 0).reshape(c, -1)   # 2048 values each
      for groups, tol in ((per_example, 0.05), (per_channel, 0.08)):  # ~4.5 and 5 sigma
        assert np.all(np.abs(groups.std(axis=1) - 1) < tol), (std, coef, groups.std(axis=1))
        assert np.all(np.abs(groups.mean(axis=1)) < 0.1), (std, coef)


def test_noise_is_deterministic_per_key_and_differs_across_keys():
  x = _x()
  model = jd.models.create("preact_resnet8", step=EulerMaruyama(coef=0.1))
  v = _init(model, x)
  a = model.apply(v, x, rngs={"noise": jax.random.key(7)})
  b = model.apply(v, x, rngs={"noise": jax.random.key(7)})
  c = model.apply(v, x, rngs={"noise": jax.random.key(8)})
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-4


def test_noise_off_at_test_when_asked():
  x = _x()
  model = jd.models.create("preact_resnet8", step=EulerMaruyama(coef=0.1, at_test=False))
  v = _init(model, x)
  np.testing.assert_array_equal(model.apply(v, x), jd.models.create("preact_resnet8").apply(v, x))
  assert jd.dynamics.is_stochastic(model.step, train=True)
  assert not jd.dynamics.is_stochastic(model.step, train=False)


# ---------------------------------------------------------------- perturbed execution
def test_perturbations_enter_each_block_additively():
  x = _x()
  model = jd.models.create("preact_resnet8")
  v = _init(model, x)
  logits, states = model.apply(v, x, capture_states=True)
  assert len(states) == 3
  zeros = [jnp.zeros_like(s) for s in states]
  np.testing.assert_array_equal(model.apply(v, x, perturbations=zeros), logits)

  def loss(deltas):
    return jnp.sum(model.apply(v, x, perturbations=deltas) ** 2)
  grads = jax.grad(loss)(zeros)
  assert [g.shape for g in grads] == [s.shape for s in states]
  assert all(float(jnp.abs(g).max()) > 0 for g in grads)
  # a perturbation on the last block shifts the pooled features linearly
  delta = [None, None, jnp.ones_like(states[2]) * 0.01]
  assert not np.allclose(model.apply(v, x, perturbations=delta), logits)
  with pytest.raises(ValueError, match=r"one entry per block \(3\), or one more"):
    model.apply(v, x, perturbations=zeros[:2])
  # one more slot: the stem output x_0, captured first
  _, states1 = model.apply(v, x, perturbations=[None] * 4, capture_states=True)
  assert len(states1) == 4 and all(np.allclose(a, b) for a, b in zip(states1[1:], states))
  stem = [jnp.ones_like(states1[0]) * 0.01, None, None, None]
  assert not np.allclose(model.apply(v, x, perturbations=stem), logits)


# ------------------------------------------------------------------------- ensembles
class _NoisyShift(fnn.Module):
  """``x + shift + N(0, I)``: an Euler–Maruyama step with f = shift (one parameter)."""
  sampler: str = "jax"

  @fnn.compact
  def __call__(self, x, train=False):
    shift = self.param("shift", fnn.initializers.constant(0.5), ())
    step = EulerMaruyama(coef=1.0, std="fixed", sampler=self.sampler)
    return jd.dynamics.apply_step(self, step, x, jnp.full_like(x, shift),
                                  StepContext(0, False, train))


def _noise_input():
  return jax.random.uniform(jax.random.key(11), (8, 4096))


def _stacked(variables, n):
  """Variables of an ``n``-member (non-shared) ensemble of copies of ``variables``."""
  return {k: {"member": jax.tree_util.tree_map(lambda a: jnp.stack([a] * n), val)}
          for k, val in variables.items()}


def _assert_noise_variance(out, x, expected):
  noise = np.asarray(out - x, np.float64) - 0.5  # 32768 values: variance known to ~1 %
  assert abs(noise.mean()) < 0.05 * np.sqrt(expected), (noise.mean(), expected)
  assert abs(noise.var() / expected - 1) < 0.05, (noise.var(), expected)


def test_ensemble_of_identical_members_equals_one_member():
  x = _x()
  member = jd.models.create("preact_resnet8", step=EulerMaruyama(coef=0.0))
  ens = jd.models.Ensemble(member, size=3)
  vm = _init(member, x)
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a] * 3), vm)
  ve = {k: {"member": val} for k, val in stacked.items()}
  np.testing.assert_allclose(ens.apply(ve, x), member.apply(vm, x), atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(jd.models.member_variables(ve, 1)),
                  jax.tree_util.tree_leaves(vm), strict=True):
    np.testing.assert_array_equal(a, b)


def test_ensemble_members_are_independent_and_averaged():
  x = _x()
  member = jd.models.create("resnet8")
  ens = jd.models.Ensemble(member, size=2, vectorize=True)
  ve = _init(ens, x)
  assert jd.models.count_params(ve) == 2 * jd.models.count_params(_init(member, x))
  outs = [member.apply(jd.models.member_variables(ve, i), x) for i in range(2)]
  assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-4
  np.testing.assert_allclose(ens.apply(ve, x), (outs[0] + outs[1]) / 2, atol=1e-5)


def test_shared_weight_ensemble_averages_noise_draws():
  x = _x()
  member = jd.models.create("preact_resnet8", step=EulerMaruyama(coef=0.1))
  ens = jd.models.Ensemble(member, size=4, shared=True)
  v = _init(member, x)
  assert jd.models.count_params(_init(ens, x)) == jd.models.count_params(v)
  ve = {k: {"member": val} for k, val in v.items()}
  out = ens.apply(ve, x, rngs={"noise": jax.random.key(5)})
  assert out.shape == (4, 10)
  single = member.apply(v, x, rngs={"noise": jax.random.key(5)})
  assert not np.allclose(out, single)
  # the draws are independent: the mean of n unit-variance draws has variance 1 / n
  # (identical draws would give 1, two distinct ones repeated 0.5)
  x = _noise_input()
  noisy = _NoisyShift()
  v = noisy.init({"params": KEY, "noise": KEY}, x)
  _assert_noise_variance(noisy.apply(v, x, rngs={"noise": jax.random.key(6)}), x, 1.0)
  ve = {k: {"member": val} for k, val in v.items()}
  for n in (2, 4):
    ens = jd.models.Ensemble(noisy, size=n, shared=True)
    _assert_noise_variance(ens.apply(ve, x, rngs={"noise": jax.random.key(6)}), x, 1 / n)


@pytest.mark.parametrize("vectorize,sampler", [(True, "jax"), (False, "jax"), (True, "fast")])
def test_ensemble_members_draw_independent_noise(vectorize, sampler):
  # n identical members: the averaged output is x + shift + the mean of n independent
  # unit-variance draws, variance 1 / n (1 if the members shared one noise key)
  x = _noise_input()
  noisy = _NoisyShift(sampler=sampler)
  v = noisy.init({"params": KEY, "noise": KEY}, x)
  for n in (2, 4):
    ens = jd.models.Ensemble(noisy, size=n, vectorize=vectorize)
    out = ens.apply(_stacked(v, n), x, rngs={"noise": jax.random.key(7)})
    _assert_noise_variance(out, x, 1 / n)


# ---------------------------------------------------------------------------- errors
def test_unknown_model_name_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown model name='resnet21'.*resnet20"):
    jd.models.create("resnet21")


def test_unknown_override_is_a_clear_error():
  with pytest.raises(ValueError, match="does not take override"):
    jd.models.create("resnet20", widht=3)


def test_bad_images_are_clear_errors():
  model = jd.models.create("resnet8")
  x = _x()
  v = _init(model, x)
  with pytest.raises(ValueError, match=r"x must lie in \[0, 1\].*255"):
    model.apply(v, x * 255)
  with pytest.raises(ValueError, match="rank 4"):
    model.apply(v, x[0])
  with pytest.raises(ValueError, match="NaN"):
    model.apply(v, x.at[0, 0, 0, 0].set(jnp.nan))
  with pytest.raises(TypeError, match="floating-point"):
    model.apply(v, (x * 255).astype(jnp.uint8))


def test_bad_step_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="EulerMaruyama.coef must be >= 0"):
    EulerMaruyama(coef=-0.1)
  with pytest.raises(ValueError, match="EulerMaruyama.std must be one of"):
    EulerMaruyama(std="channel")
  with pytest.raises(ValueError, match="EulerMaruyama.sampler must be one of"):
    EulerMaruyama(sampler="philox")
  with pytest.raises(ValueError, match="Damped.kind must be one of"):
    Damped("tanh")
  with pytest.raises(ValueError, match="init_range"):
    Damped("relu", init_range=(0.3, 0.1))


def test_missing_noise_key_is_a_clear_error():
  x = _x()
  model = jd.models.create("preact_resnet8", step=EulerMaruyama(coef=0.1))
  v = _init(model, x)
  with pytest.raises(ValueError, match="noise key"):
    model.apply(v, x)


def test_model_apply_compiles_once_under_jit():
  x = _x()
  model = jd.models.create("resnet8")
  v = _init(model, x)
  traces = []

  @jax.jit
  def f(v, x):
    traces.append(1)
    return model.apply(v, x)
  for seed in range(3):
    f(v, _x(seed=seed + 10))
  assert len(traces) == 1
  assert Euler() == Euler() and hash(EulerMaruyama(0.1)) == hash(EulerMaruyama(0.1))


def test_ensemble_passes_keyword_arguments_and_scan_matches_vmap():
  x = _x()
  member = jd.models.create("resnet8")
  ens = jd.models.Ensemble(member, size=2, vectorize=True)
  ve = _init(ens, x)
  # train=True as a keyword must reach the members (batch statistics change)
  _, new = ens.apply(ve, x, train=True, mutable=["batch_stats"])
  old_stats = jax.tree_util.tree_leaves(ve["batch_stats"])
  new_stats = jax.tree_util.tree_leaves(new["batch_stats"])
  assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(old_stats, new_stats))
  seq = jd.models.Ensemble(member, size=2, vectorize=False)
  np.testing.assert_allclose(seq.apply(ve, x), ens.apply(ve, x), atol=1e-5)
  a, sa = seq.apply(ve, x, train=True, mutable=["batch_stats"])
  b, sb = ens.apply(ve, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(a, b, atol=1e-5)
  for u, v in zip(jax.tree_util.tree_leaves(sa), jax.tree_util.tree_leaves(sb)):
    np.testing.assert_allclose(u, v, atol=1e-5)


def test_ensemble_default_is_unrolled_on_cpu_and_vmapped_elsewhere():
  """On CPU the default applies members one by one (no grouped convolutions, whose
  kernel gradients XLA:CPU runs slowly); ``vectorize=True`` batches them with vmap."""
  x = _x()
  member = jd.models.create("resnet8")
  ens = jd.models.Ensemble(member, size=2)
  v = _init(jd.models.Ensemble(member, size=2, vectorize=True), x)
  text = lambda m: str(jax.make_jaxpr(lambda v: m.apply(v, x))(v))
  batched = text(jd.models.Ensemble(member, size=2, vectorize=True))
  assert "feature_group_count=2" in batched
  default = text(ens)
  if jax.default_backend() == "cpu":
    assert "feature_group_count=2" not in default
  else:
    assert "feature_group_count=2" in default
  np.testing.assert_allclose(ens.apply(v, x), jd.models.Ensemble(
      member, size=2, vectorize=True).apply(v, x), atol=1e-5)


def test_ensemble_averages_logits_or_probabilities():
  from jaxdefense.models._ensemble import combine
  logits = jax.random.normal(KEY, (3, 4, 5)) * 3.0
  np.testing.assert_allclose(combine(logits, "logits"), logits.mean(0), rtol=1e-6)
  probs = jax.nn.softmax(logits, -1).mean(0)
  np.testing.assert_allclose(jax.nn.softmax(combine(logits, "probs"), -1), probs, rtol=1e-5)
  np.testing.assert_allclose(jnp.exp(combine(logits, "probs")).sum(-1), 1.0, rtol=1e-5)
  w = jnp.array([0.5, 0.25, 0.25])
  np.testing.assert_allclose(jnp.exp(combine(logits, "probs", w)),
                             jnp.einsum("n,nbk->bk", w, jax.nn.softmax(logits, -1)), rtol=1e-5)
  member = jd.models.create("preact_resnet8", num_classes=5)
  x = _x((2, 8, 8, 1))
  for shared in (False, True):
    ens = jd.models.Ensemble(member, size=3, shared=shared, average="probs")
    v = ens.init(KEY, x)
    out = ens.apply(v, x)
    assert out.shape == (2, 5) and np.allclose(jnp.exp(out).sum(-1), 1.0, rtol=1e-5)
    plain = ens.clone(average="logits").apply(v, x)
    assert not np.allclose(out, plain)
  f = [lambda z, s=s: jnp.full((z.shape[0], 5), float(s)) + jnp.arange(5.0) * s
       for s in (1.0, 2.0)]
  np.testing.assert_allclose(jd.models.average_logits(f, average="probs")(x),
                             combine(jnp.stack([g(x) for g in f]), "probs"), rtol=1e-6)
  with pytest.raises(ValueError, match="Ensemble.average"):
    jd.models.Ensemble(member, average="median")


_MEMBER_MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
import jaxdefense as jd
from jaxdefense.data import make_mesh, state_sharding, batch_sharding
assert jax.device_count() == 4
x = jnp.asarray(np.random.RandomState(0).rand(8, 12, 12, 1), jnp.float32)
small = dict(num_classes=5, stem_width=4, widths=(4, 8, 8))   # resnet8, narrower
for member, noisy in ((jd.models.create("resnet8", **small), False),
                      (jd.models.create("resnet8", step="euler_maruyama", **small), True)):
  plain = jd.models.Ensemble(member=member, size=4)
  v = plain.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}, x)
  deltas = [jnp.full((8, 12, 12, 4), 0.01)] + [None] * 3
  for k in (4,):   # 2 devices per member group: tests/test_training.py's run
    mesh = make_mesh(members=k)
    split = plain.clone(member_mesh=mesh)
    vs = jax.device_put(v, state_sharding(v, mesh, stacked_members=True))
    xs = jax.device_put(x, batch_sharding(mesh))
    for train in (False, True):
      def run(model, v, x, key):
        return model.apply(v, x, train=train, perturbations=deltas, capture_states=True,
                           mutable=["batch_stats"] if train else False,
                           rngs={"noise": key})
      key = jax.random.PRNGKey(2)
      a = jax.jit(lambda v, x: run(plain, v, x, key))(v, x)
      b = jax.jit(lambda v, x: run(split, v, x, key))(vs, xs)
      la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
      assert len(la) == len(lb)
      if noisy:   # another noise draw per member: same shapes, finite, not equal
        assert all(p.shape == q.shape for p, q in zip(la, lb))
        assert all(bool(jnp.all(jnp.isfinite(q))) for q in lb)
        # the same key twice gives the same draws (deterministic)
        c = jax.jit(lambda v, x: run(split, v, x, key))(vs, xs)
        assert all(bool(jnp.array_equal(p, q)) for p, q in
                   zip(lb, jax.tree_util.tree_leaves(c)))
        # members draw independent noise: member outputs differ between members
        logits_states = b[0] if train else b
        states = logits_states[1]
        assert float(jnp.abs(states[1][0] - states[1][1]).max()) > 0
      else:
        err = max(float(jnp.abs(p - q).max()) for p, q in zip(la, lb))
        assert err < 1e-5, (k, train, err)
    grad = lambda model: jax.grad(lambda v, x: jnp.sum(model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"noise": key})[0] ** 2))
    compiled = jax.jit(grad(split)).lower(vs, xs).compile()
    assert "all-gather(" not in compiled.as_text()  # no device fetches another's members
    if not noisy:
      ga, gb = jax.jit(grad(plain))(v, x), compiled(vs, xs)
      err = max(float(jnp.abs(p - q).max()) for p, q in
                zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)))
      assert err < 1e-4, err
for bad in ("size", "shared"):
  try:
    if bad == "size":
      jd.models.Ensemble(member=member, size=3, member_mesh=make_mesh(members=2))
    else:
      jd.models.Ensemble(member=member, size=4, shared=True, member_mesh=make_mesh(members=2))
    raise SystemExit(f"no error for {bad}")
  except ValueError as e:
    assert ("not divisible" if bad == "size" else "shared") in str(e), e
try:
  make_mesh(members=3)
  raise SystemExit("no error for members=3")
except ValueError as e:
  assert "members=3" in str(e), e
print("MEMBER MESH OK")
"""


def test_ensemble_member_mesh_matches_the_unsplit_ensemble(tmp_path):
  """Members split over the 4 host devices: the same logits, states, batch
  statistics and gradients as every member on every device (noise-free member); a
  noisy member draws deterministic, per-member noise; no device gathers another's
  members; bad sizes are errors naming the field."""
  from conftest import run_python
  script = tmp_path / "member_mesh.py"
  script.write_text(_MEMBER_MESH_SCRIPT)
  result = run_python([str(script)], host_devices=4)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "MEMBER MESH OK" in result.stdout


def _matmul_dtypes(jaxpr) -> set:
  """Operand dtypes of every convolution and matrix product in ``jaxpr`` (nested too)."""
  from jax.extend.core import jaxprs_in_params
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
      found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
    for sub in jaxprs_in_params(eqn.params):
      found |= _matmul_dtypes(sub)
  return found


@pytest.mark.parametrize("name,kw", [("resnet8", {}),
                                     ("preact_resnet8", {"step": "euler_maruyama"})])
def test_mixed_precision_runs_matmuls_in_bfloat16(name, kw):
  """compute_dtype="bfloat16": every convolution and matrix product of the forward and
  backward pass takes bfloat16 operands; logits, batch statistics and gradients of the
  float32 parameters and images are float32; the logits stay close to float32's."""
  x = jnp.asarray(np.random.RandomState(0).rand(4, 12, 12, 1), jnp.float32)
  m = jd.models.create(name, num_classes=5, normalize=((0.5,), (0.25,)), **kw)
  v = m.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}, x)
  key = jax.random.PRNGKey(3)
  for train in (False, True):
    half = jd.models.bind(m, v, train=train, compute_dtype="bfloat16")
    full = jd.models.bind(m, v, train=train)

    def loss(params, x, model=half):
      variables = {**v, "params": params}
      return jnp.sum(model.with_variables(variables).apply(x, key)[0] ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(v["params"], x)
    assert _matmul_dtypes(jaxpr.jaxpr) == {("bfloat16", "bfloat16")}
    logits, state = half.apply(x, key)
    assert logits.dtype == jnp.float32
    assert {a.dtype for a in jax.tree_util.tree_leaves(state)} <= {jnp.dtype("float32")}
    g_params, g_x = jax.grad(loss, argnums=(0, 1))(v["params"], x)
    assert {a.dtype for a in jax.tree_util.tree_leaves(g_params)} == {jnp.dtype("float32")}
    assert g_x.dtype == jnp.float32
    ref = full.apply(x, key)[0]
    if not (train or kw):   # same noise-free function: bfloat16 rounding only
      scale = float(jnp.abs(ref).max())
      assert float(jnp.abs(logits - ref).max()) < 0.05 * scale
  assert jd.models.bind(m, v, compute_dtype="float32").compute_dtype is None
  with pytest.raises(ValueError, match="compute_dtype"):
    jd.models.bind(m, v, compute_dtype="int8")


def test_mixed_precision_attack_stays_in_the_ball():
  """A PGD attack through a bfloat16 model: float32 images inside the eps-ball and box."""
  x = jnp.asarray(np.random.RandomState(1).rand(6, 12, 12, 1), jnp.float32)
  y = jnp.arange(6) % 5
  m = jd.models.create("resnet8", num_classes=5)
  v = m.init(jax.random.PRNGKey(0), x)
  half = jd.models.bind(m, v, compute_dtype="bfloat16")
  adv = jd.attacks.pgd(half, x, y, eps=0.05, step_size=0.02, steps=3,
                       key=jax.random.PRNGKey(0))
  assert adv.dtype == jnp.float32
  assert float(jnp.abs(adv - x).max()) <= 0.05 + 1e-6
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  assert float(jnp.abs(adv - x).max()) > 0.01   # it moved
