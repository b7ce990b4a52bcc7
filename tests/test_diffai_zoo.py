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
  def placements(name):
    return [(point, a.kind, dict(a.kwargs).get("k"))
            for point, a in jd.models.create(name).abstract]
  assert placements("resnet_tiny_few_combo") == [
      ("input", "correlate_max_k", 32), ("conv0", "decorrelate_min_k", 8),
      ("block0", "decorrelate_min_k", 4), ("block1", "concretize", None),
      ("block4", "correlate_max_k", 10)]
  assert placements("resnet_tiny_many_fixed") == [
      ("input", "correlate_max_k", 32), ("conv0", "correlate_fixed", 16),
      ("conv0", "decorrelate_min_k", 16), ("block0", "correlate_fixed", 8),
      ("block0", "decorrelate_min_k", 8), ("block1", "correlate_fixed", 8),
      ("block1", "decorrelate_min_k", 8), ("block2", "correlate_fixed", 4),
      ("block2", "decorrelate_min_k", 4), ("block3", "concretize", None)]
  for name in ("resnet_tiny_few_combo", "resnet_tiny_many_fixed"):
    assert all(dict(a.kwargs)["only_train"] for _, a in jd.models.create(name).abstract)


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
  assert set(_diffai.NAMES) == {name for name, _, _, _ in TABLE}
  for name in _diffai.NAMES:
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


def _naive_deep_loss(lo, hi):
  """DiffAI's DeepLoss from its definition, O(n^2) per example (NumPy, float64)."""
  out = []
  for l, u in zip(np.asarray(lo, np.float64).reshape(lo.shape[0], -1),
                  np.asarray(hi, np.float64).reshape(hi.shape[0], -1)):
    relu = lambda a: np.maximum(a, 0.0)
    # j != i: the *other* dimensions (DiffAI section 3.3); an empty max is 0
    lb = [max([relu(u[j] - l[i]) for j in range(l.size) if j != i and l[j] <= l[i]] or [0.0])
          for i in range(l.size)]
    ub = [max([relu(u[i] - l[j]) for j in range(l.size) if j != i and u[i] <= u[j]] or [0.0])
          for i in range(l.size)]
    out.append((sum(lb) + sum(ub)) / (2 * l.size))
  return np.asarray(out)


def test_custom_layout_and_deep_loss_value():
  """Fields compose layers (abstract ones at named points); the sown DeepLoss equals
  weight * batch mean of the definition's value on the bounds entering the layer."""
  model = _diffai.DiffAINet(
      convs=((4, 3, 2, 1),), blocks=((8, 2),), dense=(6,), num_classes=3,
      abstract=(("conv0", _diffai.Abstract.of("correlate_max_pool", window=2)),
                ("block0", _diffai.Abstract.of("deep_loss", weight=0.3))))
  x = jnp.asarray(np.random.RandomState(3).uniform(size=(2, 8, 8, 1)), jnp.float32)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert sorted(v["params"]) == ["Conv_0", "Dense_0", "Dense_1", "block0"]
  assert sorted(v["params"]["block0"]) == ["Conv_0", "Conv_1", "Conv_2"]  # projection
  z = certify.input_set(x, 0.1, "zonotope")

  @jax.jit
  def run(v, z):
    return model.apply(v, z, train=True, capture_states=True, mutable=["losses"])
  (out, states), state = run(v, z)
  assert out.shape == (2, 3) and len(states) == 1 and states[0].shape == (2, 2, 2, 8)
  leaves = jax.tree_util.tree_leaves(state["losses"])
  assert len(leaves) == 1
  lo, hi = states[0].concretize()          # DeepLoss sits right after block 0
  want = 0.3 * np.mean(_naive_deep_loss(lo, hi))
  assert want > 0
  np.testing.assert_allclose(float(leaves[0]), want, rtol=1e-5)
  # At evaluation DeepLoss (only_train) is silent.
  _, state = jax.jit(lambda v, z: model.apply(v, z, train=False, mutable=["losses"]))(v, z)
  assert not jax.tree_util.tree_leaves(state.get("losses", {}))


def test_bad_fields_are_clear_errors():
  x = jnp.zeros((1, 8, 8, 1))
  bad = [
      (dict(convs=((4, 3, 2),)), "convs"),
      (dict(blocks=((8, 2),), block="dense"), "block must be"),
      (dict(blocks=((8, 2),), block_convs=-1), "block_convs"),
      (dict(dense=(4,), abstract=(("dense1", _diffai.Abstract.of("concretize")),)),
       "unknown point 'dense1'"),
      (dict(dense=(4,), abstract=(_diffai.Abstract.of("concretize"),)), "pair"),
      (dict(dense=(4,), step=jd.dynamics.Damped("lambda")), "no residual blocks"),
  ]
  for fields, match in bad:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(_diffai.DiffAINet(**fields).init, jax.random.PRNGKey(0), x)
  model = jd.models.create("resnet_tiny", num_classes=3)
  v = _shapes(model, x.shape)
  with pytest.raises(ValueError, match="one entry per residual block"):
    jax.eval_shape(lambda v: model.apply(v, x, perturbations=[None] * 4), v)


# ------------------------------------------------------------------- step rules
def _tiny_input():
  return jnp.asarray(np.random.RandomState(4).uniform(size=(2, 6, 6, 3)), jnp.float32)


def test_residual_nets_are_built_from_the_shared_block():
  """ResNet-Tiny's wide blocks and ResNet-18's basic blocks are ResidualBlocks: one
  parameter subtree per block, a 1x1 projection in every wide block and in the
  transition basic blocks only, biases, no batch norm."""
  x = _tiny_input()
  tiny = _shapes(jd.models.create("resnet_tiny", num_classes=3), x.shape)
  assert "batch_stats" not in tiny
  assert sorted(k for k in tiny["params"] if k.startswith("block")) == \
      [f"block{i}" for i in range(5)]
  for i in range(5):
    block = tiny["params"][f"block{i}"]
    assert sorted(block) == ["Conv_0", "Conv_1", "Conv_2"]
    assert block["Conv_0"]["kernel"].shape[:2] == (1, 1)       # always projected
    assert all("bias" in conv for conv in block.values())
  r18 = _shapes(jd.models.create("diffai_resnet18", num_classes=3), (1, 16, 16, 3))
  convs = [len(r18["params"][f"block{i}"]) for i in range(8)]
  assert convs == [2, 2, 3, 2, 3, 2, 3, 2]                     # projections at transitions


def test_step_rules_apply_to_diffai_resnets():
  x = _tiny_input()
  euler = jd.models.create("resnet_tiny", num_classes=3)
  v = jax.jit(euler.init)(jax.random.PRNGKey(0), x)
  want = jax.jit(euler.apply)(v, x)
  damped = jd.models.create("resnet_tiny", num_classes=3,
                            step=jd.dynamics.Damped("lambda"))
  vd = jax.jit(damped.init)(jax.random.PRNGKey(0), x)
  # Block 0 (first) and block 1 (16 -> 32 channels, a transition) stay plain steps.
  assert [i for i in range(5) if "lambda" in vd["params"][f"block{i}"]] == [2, 3, 4]
  assert jd.models.count_params(vd) == jd.models.count_params(v) + 3

  def with_lambda(value):
    params = dict(v["params"])
    for i in (2, 3, 4):
      params[f"block{i}"] = {**params[f"block{i}"], "lambda": jnp.float32(value)}
    return {"params": params}
  run = jax.jit(damped.apply)
  np.testing.assert_allclose(run(with_lambda(0.0), x), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(run(with_lambda(0.5), x), want, rtol=1e-3, atol=1e-3)

  noisy = jd.models.create("resnet_tiny", num_classes=3,
                           step=jd.dynamics.EulerMaruyama(coef=0.5))
  apply = jax.jit(lambda k: noisy.apply(v, x, rngs={"noise": k}))
  a, b = apply(jax.random.PRNGKey(1)), apply(jax.random.PRNGKey(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, apply(jax.random.PRNGKey(1)))
  with pytest.raises(ValueError, match="noise"):
    noisy.apply(v, x)


def test_perturbations_enter_each_block_of_a_diffai_resnet():
  """LAD: a perturbation is added to the block's pre-activation output (Euler step)."""
  x = _tiny_input()
  model = jd.models.create("resnet_tiny", num_classes=3)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  run = jax.jit(lambda v, p: model.apply(v, x, perturbations=p, capture_states=True))
  logits, states = run(v, [None] * 5)
  assert len(states) == model.num_blocks == 5
  zeros = [jnp.zeros_like(s) for s in states]
  np.testing.assert_allclose(run(v, zeros)[0], logits, rtol=1e-6, atol=1e-6)
  shifted = list(zeros)
  shifted[3] = jnp.full_like(states[3], 100.0)
  _, moved = run(v, shifted)
  for i in range(3):
    np.testing.assert_allclose(moved[i], states[i], rtol=1e-6, atol=1e-6)
  # relu(pre + 100) - 100 == pre where pre > -100, so its relu is the old state.
  np.testing.assert_allclose(jax.nn.relu(moved[3] - 100.0), states[3], atol=1e-3)
  assert not np.allclose(moved[4], states[4])
