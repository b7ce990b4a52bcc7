"""EnResNet presets (Wang et al. 2019) and logit integration: registry, overrides,
equivalences at coef = 0, keyed noise, ensemble structure, clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
import jaxdefense.models._enresnet  # noqa: F401  (registers the presets)
from jaxdefense.dynamics import Euler, EulerMaruyama
from jaxdefense.models._enresnet import BASES, average_logits, enresnet

KEY = jax.random.key(0)
X = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))  # small CIFAR-like batch


def _noise_key(seed):
  # The "rbg" PRNG compiles ~3x faster than threefry on CPU for the noisy nets; the
  # noise semantics (fixed key -> fixed output) are the same.
  return jax.random.key(seed, impl="rbg")


def _init(model, x=X, seed=0):
  return model.init({"params": jax.random.key(seed), "noise": jax.random.key(seed + 1)}, x)


def _fake_variables(model, x=X, seed=0):
  """He-scaled random variables of a single network (no ensemble axis) without compiling
  its init, which is slow on a loaded CPU."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: _init(model, x))

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "var" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    if "scale" in name:
      return jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape), s.dtype)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 100
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _stack(variables, n):
  """Variables of an ``n``-member ensemble whose members are all ``variables``."""
  return {k: {"member": jax.tree_util.tree_map(lambda a: jnp.stack([a] * n), v)}
          for k, v in variables.items()}


# ------------------------------------------------------------------ registry
def test_every_preset_is_registered_with_the_right_structure():
  names = set(jd.models.names())
  for base in BASES:
    m = jd.models.create(f"en_{base}")
    assert isinstance(m, jd.models.ResNet)
    assert m.step == EulerMaruyama(coef=0.1, std="batch", at_test=True)
    assert m == jd.models.create(base, step=EulerMaruyama(0.1))  # a preset, not a copy
    for n in (1, 2, 5):
      for prefix, shared in (("en", False), ("swe", True)):
        e = jd.models.create(f"{prefix}{n}_{base}")
        assert isinstance(e, jd.models.Ensemble)
        assert (e.size, e.shared) == (n, shared)
        assert e.member == m
        assert jd.models.describe(f"{prefix}{n}_{base}")
    for n in (2, 5):
      e = jd.models.create(f"ens{n}_{base}")
      assert (e.size, e.shared, e.member.step) == (n, False, Euler())
    assert {f"en_{base}", f"en5_{base}", f"swe5_{base}", f"ens5_{base}"} <= names


def test_overrides_pass_through():
  m = jd.models.create("en5_preact_resnet44", num_classes=100, coef=0.2, std="sample",
                       at_test=False, normalize=((0.5,) * 3, (0.25,) * 3))
  assert m.member.num_classes == 100
  assert m.member.step == EulerMaruyama(coef=0.2, std="sample", at_test=False)
  assert m.member.normalize == ((0.5,) * 3, (0.25,) * 3)
  assert m.member.stage_sizes == (7, 7, 7)
  assert jd.models.create("en_wrn34_10", dropout=0.3).dropout == 0.3
  assert jd.models.create("en2_preact_resnet20", size=3).size == 3
  custom = jd.models.create("en_preact_resnet20", step=EulerMaruyama(0.4, "fixed"))
  assert custom.step == EulerMaruyama(0.4, "fixed")
  assert enresnet("preact_resnet8", 2).member.stage_sizes == (1, 1, 1)


def test_parameter_counts_of_ensembles():
  def count(name):
    m = jd.models.create(name)
    return jd.models.count_params(jax.eval_shape(lambda: _init(m, jnp.zeros((1, 32, 32, 3)))))
  single = count("preact_resnet20")
  assert count("en_preact_resnet20") == single
  assert count("en5_preact_resnet20") == 5 * single
  assert count("ens2_preact_resnet20") == 2 * single
  assert count("swe5_preact_resnet20") == single  # n x En_1: one parameter set


def test_en_wrn_has_the_wrn_parameter_tree():
  shapes = lambda m: jax.eval_shape(lambda: _init(m, jnp.zeros((1, 32, 32, 3))))
  a = shapes(jd.models.create("en_wrn34_10"))
  b = shapes(jd.models.create("wrn34_10"))
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  assert jd.models.count_params(a) == 46_160_474


# -------------------------------------------------------------- equivalences
def test_coef_zero_enresnet_equals_the_plain_network():
  plain = jd.models.create("preact_resnet20")
  v = _fake_variables(plain)
  ref = jax.jit(plain.apply)(v, X)
  assert float(jnp.std(ref)) > 1e-3
  noisy0 = jd.models.create("en_preact_resnet20", coef=0.0)
  np.testing.assert_allclose(jax.jit(noisy0.apply)(v, X), ref, rtol=1e-6, atol=1e-6)
  # ensembles of identical coef-0 members equal one member (no noise key needed)
  en5 = jd.models.create("en5_preact_resnet20", coef=0.0)
  np.testing.assert_allclose(jax.jit(en5.apply)(_stack(v, 5), X), ref, rtol=1e-5, atol=1e-5)
  swe5 = jd.models.create("swe5_preact_resnet20", coef=0.0)
  shared = {k: {"member": val} for k, val in v.items()}
  np.testing.assert_allclose(jax.jit(swe5.apply)(shared, X), ref, rtol=1e-5, atol=1e-5)


def test_noise_is_keyed_and_averaged_over_members():
  model = jd.models.create("en2_preact_resnet20")
  v = _stack(_fake_variables(model.member), 2)  # identical members, independent noise
  apply = jax.jit(lambda v, k: model.apply(v, X, rngs={"noise": k}))
  a = apply(v, _noise_key(3))
  np.testing.assert_array_equal(a, apply(v, _noise_key(3)))
  b = apply(v, _noise_key(4))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  # the noise is on at test time by default (the paper), off with at_test=False
  assert jd.dynamics.is_stochastic(model.member.step, train=False)
  quiet = jd.models.create("en2_preact_resnet20", at_test=False)
  assert not jd.dynamics.is_stochastic(quiet.member.step, train=False)
  assert jd.dynamics.is_stochastic(quiet.member.step, train=True)
  with pytest.raises(ValueError, match="noise key"):
    model.apply(v, X)


def test_members_are_initialised_independently():
  model = jd.models.create("ens2_preact_resnet20")
  shapes = jax.eval_shape(lambda: _init(model))
  assert shapes["params"]["member"]["Conv_0"]["kernel"].shape == (2, 3, 3, 3, 16)
  k = jax.jit(lambda: model.init({"params": _noise_key(0)}, X[:1])["params"]["member"]
              ["Conv_0"]["kernel"])()
  assert float(jnp.max(jnp.abs(k[0] - k[1]))) > 1e-3


def test_ensemble_init_is_the_same_in_every_mode():
  """One init key, one set of members, whether applied with vmap or unrolled."""
  member = jd.models.create("preact_resnet8", step=EulerMaruyama(coef=0.1))
  x = X[:, :, :, :1]
  keys = {"params": jax.random.key(0), "noise": jax.random.key(1)}
  init = lambda vec: jax.jit(jd.models.Ensemble(member, size=3, vectorize=vec).init)(keys, x)
  a, b = init(True), init(False)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda p, q: bool(jnp.array_equal(p, q)), a, b))
  k = a["params"]["member"]["Conv_0"]["kernel"]
  assert float(jnp.max(jnp.abs(k[0] - k[1]))) > 1e-3  # still independent members


def test_shared_ensemble_tiles_perturbations_and_captures_states():
  member = jd.models.create("preact_resnet8", step=EulerMaruyama(coef=0.1))
  x = jax.random.uniform(jax.random.key(2), (2, 8, 8, 1))
  v = _fake_variables(member, x)
  shared = jd.models.Ensemble(member, size=3, shared=True)
  sv = {k: {"member": val} for k, val in v.items()}
  run = jax.jit(lambda p, c: shared.apply(sv, x, False, p, capture_states=c,
                                         rngs={"noise": _noise_key(0)}),
                static_argnums=1)
  base = run(None, False)
  # per-block perturbations with the batch as leading axis reach every draw
  zero = [jnp.zeros((2, 8, 8, 16)), 0.0, 0.0]
  np.testing.assert_allclose(run(zero, False), base, rtol=1e-6, atol=1e-6)
  push = [jnp.ones((2, 8, 8, 16)), 0.0, 0.0]
  assert float(jnp.max(jnp.abs(run(push, False) - base))) > 1e-3
  logits, states = run(None, True)
  np.testing.assert_allclose(logits, base, rtol=1e-6, atol=1e-6)
  assert [s.shape[:2] for s in states] == [(3, 2)] * 3
  stacked = jd.models.Ensemble(member, size=3)
  logits, states = stacked.apply(_stack(v, 3), x, False, None, capture_states=True,
                                 rngs={"noise": _noise_key(0)})
  assert logits.shape == (2, 10) and [s.shape[:2] for s in states] == [(3, 2)] * 3


# ----------------------------------------------------------- average_logits
def test_average_logits_integrates_models():
  f1 = lambda x: jnp.ones((x.shape[0], 3))
  f2 = lambda x: 3.0 * jnp.ones((x.shape[0], 3))
  comb = average_logits([f1, f2])
  assert isinstance(comb, jd.models.ModelFn) and not comb.stochastic
  np.testing.assert_allclose(comb(X), 2.0 * np.ones((2, 3)))
  np.testing.assert_allclose(average_logits([f1, f2], weights=[3, 1])(X),
                             1.5 * np.ones((2, 3)))
  # stochastic members (plain functions: the flag is explicit) get independent keys
  g = lambda x, k: jax.random.normal(k, (x.shape[0], 3))
  comb = average_logits([g, g], stochastic=True)
  assert comb.stochastic
  k1, k2 = jax.random.split(KEY)
  np.testing.assert_allclose(comb(X, KEY), (g(X, k1) + g(X, k2)) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="PRNG key"):
    comb(X)
  # a deterministic member among stochastic ones: the combination is stochastic
  mixed = average_logits([jd.models.ModelFn.wrap(g, stochastic=True), f1])
  assert mixed.stochastic
  np.testing.assert_allclose(mixed(X, KEY), (g(X, k1) + f1(X)) / 2, rtol=1e-6)
  # across architectures and checkpoints, as bound models
  m1 = jd.models.create("preact_resnet8")
  v1 = _fake_variables(m1, seed=1)
  m2 = jd.models.create("resnet8")
  v2 = _fake_variables(m2, seed=2)
  b1, b2 = jd.models.bind(m1, v1), jd.models.bind(m2, v2)
  want = (m1.apply(v1, X) + m2.apply(v2, X)) / 2
  np.testing.assert_allclose(average_logits([b1, b2])(X), want, rtol=1e-6, atol=1e-6)
  # noisy EnResNet members: the combination needs a key and draws per member
  noisy = jd.models.create("preact_resnet8", step=EulerMaruyama(coef=0.1))
  bn = jd.models.bind(noisy, v1)
  comb = average_logits([bn, b2])
  assert comb.stochastic
  np.testing.assert_allclose(comb(X, KEY), (bn(X, k1) + b2(X)) / 2, rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------- errors
def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="EulerMaruyama.coef must be >= 0"):
    jd.models.create("en_preact_resnet20", coef=-0.1)
  with pytest.raises(ValueError, match="EulerMaruyama.std must be one of"):
    jd.models.create("en2_preact_resnet20", std="channel")
  with pytest.raises(ValueError, match="size must be >= 1"):
    jd.models.create("en2_preact_resnet20", size=0)
  with pytest.raises(ValueError, match="both step="):
    jd.models.create("en_preact_resnet20", step=Euler(), coef=0.2)
  with pytest.raises(ValueError, match="noise=False"):
    jd.models.create("ens5_preact_resnet20", coef=0.1)
  with pytest.raises(ValueError, match="unknown model name"):
    jd.models.create("en3_preact_resnet20")
  with pytest.raises(ValueError, match="unknown model name"):
    enresnet("resnet21")
  with pytest.raises(ValueError, match="does not take override"):
    jd.models.create("en_preact_resnet20", colour=3)
  with pytest.raises(ValueError, match="at least one"):
    average_logits([])
  with pytest.raises(TypeError, match=r"models\[1\] must be a ModelFn or callable"):
    average_logits([lambda x: x, 3])
  with pytest.raises(ValueError, match="one entry per model"):
    average_logits([lambda x: x], weights=[1, 2])
  with pytest.raises(ValueError, match=r"weights\[0\] must be >= 0"):
    average_logits([lambda x: x], weights=[-1])
  with pytest.raises(ValueError, match="disagree on the logits shape"):
    average_logits([lambda x: jnp.zeros((2, 3)), lambda x: jnp.zeros((2, 4))])(X)


def test_paper_configs_build_every_table_1_and_3_model():
  """``enresnet_paper:DATASET,MODEL``: the right step rule, member count and weights."""
  from jaxdefense import configs, dynamics, training
  from jaxdefense.models import Ensemble

  def params_of(arg):
    config = configs.get(f"enresnet_paper:{arg}")
    model = training.build_model(config, num_classes=100 if "cifar100" in arg else 10)
    k = jax.random.key(0)
    shapes = jax.eval_shape(lambda: model.init({"params": k, "noise": k},
                                               jnp.zeros((2, 32, 32, 3))))
    return config, model, sum(int(np.prod(l.shape))
                              for l in jax.tree_util.tree_leaves(shapes["params"]))

  config, model, base = params_of("cifar10,resnet20")
  assert config.objective.steps == 10 and config.epochs == 200
  assert tuple(config.schedule.milestones) == (80, 120, 160)
  assert isinstance(model.step, dynamics.Euler)
  _, en1, p_en1 = params_of("cifar10,en1_resnet20")
  assert isinstance(en1.step, dynamics.EulerMaruyama) and en1.step.coef == 0.1
  assert p_en1 == base
  _, en2, p_en2 = params_of("cifar10,en2_resnet20,0.4")
  assert isinstance(en2, Ensemble) and en2.size == 2 and en2.member.step.coef == 0.4
  assert p_en2 == 2 * base
  _, swe5, p_swe5 = params_of("cifar10,swe5_resnet20")
  assert swe5.shared and swe5.size == 5 and p_swe5 == base
  _, ens2, p_ens2 = params_of("cifar10,ens2_resnet20")
  assert isinstance(ens2.member.step, dynamics.Euler) and p_ens2 == 2 * base
  _, _, p_c100 = params_of("cifar100,resnet20")
  assert p_c100 == base + 90 * 65  # a 64 -> 100 head instead of 64 -> 10
  with pytest.raises(ValueError, match="DATASET,MODEL"):
    configs.get("enresnet_paper:cifar10,en3_resnet20")
