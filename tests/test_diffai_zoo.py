"""The DiffAI zoo: sizes from the paper's tables, abstract-layer placements, execution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
from jaxdefense import certify
from jaxdefense.models import _diffai

MNIST = (1, 28, 28, 1)
CIFAR = (1, 32, 32, 3)

# (name, input shape, neurons, parameters): tables 8 (MNIST) and 11 (CIFAR-10), table 6
# (ResNet-Tiny neurons, SkipNet-18) and table 3 (ResNet-18 / 34: "558k / 15m",
# "967k / 25m").  ResNet-Tiny's parameters follow figure 6 (see _diffai's docstring).
TABLE = [
    ("ffnn", MNIST, 500, 119_910),
    ("conv_small", MNIST, 3_604, 89_606),
    ("conv_med", MNIST, 4_804, 166_406),
    ("conv_big", MNIST, 48_064, 1_974_762),
    ("conv_large_ibp", MNIST, 175_816, 5_426_402),
    ("truncated_vgg", MNIST, 151_040, 13_109_706),
    ("ffnn", CIFAR, 500, 348_710),
    ("conv_small", CIFAR, 4_852, 125_318),
    ("conv_med", CIFAR, 6_244, 214_918),
    ("conv_big", CIFAR, 62_464, 2_466_858),
    ("conv_large_ibp", CIFAR, 229_576, 6_963_554),
    ("truncated_vgg", CIFAR, 197_120, 17_043_018),
    ("resnet_tiny", CIFAR, 311_796, 16_467_958),
    ("resnet_tiny_few_combo", CIFAR, 311_796, 16_467_958),
    ("resnet_tiny_many_fixed", CIFAR, 311_796, 16_467_958),
    ("skipnet18", CIFAR, 558_080, 15_626_634),
    ("diffai_resnet18", CIFAR, 558_080, 15_626_634),
    ("diffai_resnet34", CIFAR, 967_680, 25_731_082),
]


def _shapes(model, shape):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))


@pytest.mark.parametrize("name,shape,neurons,params", TABLE)
def test_sizes_match_the_paper(name, shape, neurons, params):
  model = jd.models.create(name)
  variables = _shapes(model, shape)
  assert jd.models.count_params(variables) == params
  assert certify.count_neurons(model, variables, jnp.zeros(shape)) == neurons


def test_rounded_sizes_of_table_3():
  """Table 3 rounds: ResNet-18 558k / 15m, ResNet-34 967k / 25m, SkipNet-18 558k / 15m."""
  for name, k, m in [("diffai_resnet18", 558, 15), ("diffai_resnet34", 967, 25),
                     ("skipnet18", 558, 15), ("resnet_tiny", 311, 16)]:
    model = jd.models.create(name)
    v = _shapes(model, CIFAR)
    assert certify.count_neurons(model, v, jnp.zeros(CIFAR)) // 1000 == k
    assert jd.models.count_params(v) // 1_000_000 == m


def test_registry_names_and_overrides():
  names = set(jd.models.names())
  for name in ["ffnn", "conv_small", "conv_med", "conv_big", "conv_large_ibp",
               "truncated_vgg", "resnet_tiny", "resnet_tiny_few_combo",
               "resnet_tiny_many_fixed", "skipnet18", "diffai_resnet18", "diffai_resnet34"]:
    assert name in names
    assert jd.models.describe(name)
  model = jd.models.create("conv_small", num_classes=7, normalize=((0.5,), (0.2,)))
  x = jnp.full((2, 28, 28, 1), 0.5)
  v = _shapes(model, x.shape)
  assert jax.eval_shape(model.apply, v, x).shape == (2, 7)
  with pytest.raises(ValueError):
    jd.models.create("conv_small", depth=3)
  with pytest.raises(ValueError, match="abstract layer"):
    _diffai.Abstract.of("correlate_everything")


def test_abstract_layers_add_no_parameters_and_keep_concrete_outputs():
  x = jnp.asarray(np.random.RandomState(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
  base = jd.models.create("resnet_tiny", num_classes=3)
  v = jax.jit(base.init)(jax.random.PRNGKey(0), x)
  want = jax.jit(base.apply)(v, x)
  for name in ("resnet_tiny_few_combo", "resnet_tiny_many_fixed"):
    model = jd.models.create(name, num_classes=3)
    assert jax.tree_util.tree_structure(_shapes(model, x.shape)) == \
        jax.tree_util.tree_structure(v)
    run = jax.jit(model.apply, static_argnames="train")
    for train in (False, True):
      np.testing.assert_allclose(run(v, x, train=train), want, rtol=1e-5, atol=1e-5)


def test_placements_follow_figures_7_and_8():
  kinds = lambda name: [(s.kind, dict(s.kwargs).get("k")) for s in _diffai.PROGRAMS[name]
                        if isinstance(s, _diffai.Abstract)]
  assert kinds("resnet_tiny_few_combo") == [
      ("correlate_max_k", 32), ("decorrelate_min_k", 8), ("decorrelate_min_k", 4),
      ("concretize", None), ("correlate_max_k", 10)]
  assert kinds("resnet_tiny_many_fixed") == [
      ("correlate_max_k", 32), ("correlate_fixed", 16), ("decorrelate_min_k", 16),
      ("correlate_fixed", 8), ("decorrelate_min_k", 8), ("correlate_fixed", 8),
      ("decorrelate_min_k", 8), ("correlate_fixed", 4), ("decorrelate_min_k", 4),
      ("concretize", None)]
  for name in ("resnet_tiny_few_combo", "resnet_tiny_many_fixed"):
    assert all(dict(s.kwargs)["only_train"] for s in _diffai.PROGRAMS[name]
               if isinstance(s, _diffai.Abstract))


def test_abstract_layers_act_only_in_training_on_zonotopes():
  """FewCombo: with train=True the generator budget follows the figure; at evaluation only
  the final CorrelateAll acts (the net then equals plain ResNet-Tiny)."""
  x = jnp.asarray(np.random.RandomState(1).uniform(size=(2, 6, 6, 3)), jnp.float32)
  model = jd.models.create("resnet_tiny_few_combo", num_classes=3)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  z = certify.input_set(x, 0.05, "zonotope", correlate_input=False)

  @jax.jit
  def run(v, z):
    train = model.apply(v, z, train=True)
    evals = model.apply(v, z, train=False)
    plain = jd.models.create("resnet_tiny", num_classes=3).apply(v, z)
    return train, evals, plain
  train, evals, plain = run(v, z)
  # Concretize after block 2 drops everything; CorrelateMaxK(10) and the final
  # CorrelateAll (500 units) add back.
  assert train.num_generators == 10 + 500
  assert evals.num_generators == 500
  for a, b in zip(evals.concretize(), plain.concretize()):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert not np.allclose(train.concretize()[0], evals.concretize()[0])


def test_every_zoo_net_runs_on_arrays_and_abstract_values():
  """Small nets run for real on both input shapes; big ones are traced (eval_shape)."""
  for name in _diffai.PROGRAMS:
    model = jd.models.create(name, num_classes=5)
    for shape in (MNIST, CIFAR):
      x = jnp.zeros(shape)
      v = _shapes(model, shape)
      out = jax.eval_shape(lambda v, b: model.apply(v, b), v,
                           certify.Box(x, jnp.zeros_like(x)))
      assert isinstance(out, certify.Box) and out.shape == (1, 5)
  model = jd.models.create("conv_med", num_classes=5)
  x = jnp.asarray(np.random.RandomState(2).uniform(size=(2, 28, 28, 1)), jnp.float32)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  lo, hi = certify.bounds(model, v, x, 0.0, "box")
  out = jax.jit(model.apply)(v, x)
  np.testing.assert_allclose(lo, out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hi, out, rtol=1e-5, atol=1e-5)


def test_custom_program():
  prog = (_diffai.ConvReLU(4, 3, 2, 1), _diffai.Abstract.of("correlate_max_pool", window=2),
          _diffai.BasicBlock(8, 2), _diffai.Abstract.of("deep_loss", weight=0.1),
          _diffai.DenseReLU(6))
  model = _diffai.DiffAINet(program=prog, num_classes=3)
  x = jnp.full((1, 8, 8, 1), 0.5)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  z = certify.input_set(x, 0.1, "zonotope")
  out, state = jax.jit(lambda v, z: model.apply(v, z, train=True, mutable=["losses"]))(v, z)
  assert out.shape == (1, 3)
  leaves = jax.tree_util.tree_leaves(state["losses"])
  assert len(leaves) == 1 and float(leaves[0]) >= 0
