"""Issue 18, bad inputs to the library: each probe gives a clear error naming the
argument, its value and what was expected (or well-defined behaviour), from the one
shared check (``_checks``, the ``nn`` layers, the zoo's field checks, the batch runner)."""

from __future__ import annotations

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
from jaxdefense import _checks, dynamics

KEY = jax.random.PRNGKey(0)
X1 = np.random.RandomState(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
X3 = np.random.RandomState(1).uniform(size=(4, 8, 8, 3)).astype(np.float32)
Y = np.array([0, 1, 2, 3], np.int32)


@pytest.fixture(scope="module")
def mlp():
  """A tiny MLP (10 classes) initialised on 8x8x1 images."""
  model = jd.models.create("mlp", hidden=(4,), num_classes=10)
  return model, model.init(KEY, X1)


def _one_block(**kw):
  """The smallest ResNet: stem conv, one basic block of width 2, 10 logits."""
  return jd.models.ResNet(stage_sizes=(1,), widths=(2,), strides=(1,), stem_width=2, **kw)


@pytest.fixture(scope="module")
def resnet():
  """A one-block ResNet initialised on 8x8x1 images."""
  model = _one_block()
  return model, model.init(KEY, X1)


# ----------------------------------------------------------------- 1. labels out of range
@pytest.mark.parametrize("bad", [12, -1])
def test_verify_rejects_labels_out_of_range(mlp, bad):
  model, variables = mlp
  y = jnp.array([0, 1, bad, 3])
  with pytest.raises(ValueError, match=rf"y must lie in \[0, 10\).*1 of 4.*values {bad}"):
    jd.certify.verify(model, variables, X1, y, 0.01)
  ok = jd.certify.verify(model, variables, X1, jnp.asarray(Y), 0.0)  # in range: runs
  assert ok.shape == (4,) and ok.dtype == jnp.bool_


def test_verify_reads_the_class_count_of_a_model_without_num_classes_field():
  model = jd.nn.Sequential((jd.nn.Flatten(), jd.nn.Dense(3)))  # 3 logits, no field
  variables = model.init(KEY, X1)
  with pytest.raises(ValueError, match=r"y must lie in \[0, 3\).*values 3"):
    jd.certify.verify(model, variables, X1, np.array([0, 1, 2, 3]), 0.01)
  assert jd.certify.verify(model, variables, X1, np.array([0, 1, 2, 0]), 0.0).shape == (4,)


@pytest.mark.parametrize("bad", [12, -1])
def test_dataset_rejects_labels_out_of_range(bad):
  labels = np.array([0, 1, bad, 3])
  with pytest.raises(ValueError, match=rf"labels must lie in \[0, 10\) for 10 classes.*"
                                       rf"values {bad}"):
    jd.data.Dataset(X1, labels, 10, "toy", "train")
  ds = jd.data.Dataset(X1, Y, 10, "toy", "train")
  assert ds.labels.dtype == np.int32 and ds.num_classes == 10


def test_check_labels_takes_numpy_and_lists_and_reports_the_bad_values():
  with pytest.raises(ValueError, match=r"y must lie in \[0, 5\).*2 of 4 labels outside "
                                       r"\(values -2, 7; range \[-2, 7\]\)"):
    _checks.check_labels(np.array([0, 7, -2, 4], np.int64), 5, "y")
  with pytest.raises(ValueError, match=r"values 5"):
    _checks.check_labels([0, 5], 5, "y")
  with pytest.raises(TypeError, match="integer class labels"):
    _checks.check_labels(np.array([0.0, 1.0]), 5, "y")
  _checks.check_labels(np.array([0, 4], np.uint8), 5, "y")  # in range: no error


# ----------------------------------------------------------------- 2. Normalize std
@pytest.mark.parametrize("std, match", [
    ((0.0,), r"std must be > 0.*std=\(0\.0,\)"),
    ((-0.5,), r"std must be > 0.*std=\(-0\.5,\)"),
    ((float("nan"),), r"std must be finite.*std=\(nan,\)"),
    ((0.2, 0.3), r"same length"),
])
def test_normalize_rejects_bad_std_at_construction(std, match):
  with pytest.raises(ValueError, match=match):
    jd.nn.Normalize((0.5,), std)


def test_model_normalize_field_is_checked_at_create_and_good_constants_apply():
  with pytest.raises(ValueError, match=r"MLP\.normalize: std must be > 0.*std=\(0\.0,\)"):
    jd.models.create("mlp", normalize=((0.5,), (0.0,)))
  with pytest.raises(ValueError, match=r"ResNet\.normalize: std must be > 0"):
    jd.models.create("resnet8", normalize=((0.5,), (0.0,)))
  layer = jd.nn.Normalize((0.5,), (0.25,))
  out = layer.apply({}, jnp.asarray(X1))
  np.testing.assert_allclose(out, (X1 - 0.5) / 0.25, rtol=1e-6)


# ----------------------------------------------------------------- 3. integer fields
@pytest.mark.parametrize("value", [0, -3])
def test_create_rejects_num_classes_below_one(value):
  with pytest.raises(ValueError, match=rf"MLP\.num_classes must be >= 1; got {value}\."):
    jd.models.create("mlp", num_classes=value)
  with pytest.raises(ValueError, match=rf"ResNet\.num_classes must be >= 1; got {value}\."):
    jd.models.create("resnet8", num_classes=value)


def test_create_rejects_bad_widths_and_sizes():
  with pytest.raises(ValueError, match=r"ResNet\.widths\[1\] must be >= 1; got 0\."):
    jd.models.create("resnet8", widths=(4, 0, 4))
  with pytest.raises(ValueError, match=r"MLP\.hidden\[0\] must be >= 1; got -8\."):
    jd.models.create("mlp", hidden=(-8,))
  with pytest.raises(TypeError, match=r"MLP\.num_classes must be an integer; got 2\.5"):
    jd.models.create("mlp", num_classes=2.5)
  with pytest.raises(ValueError, match=r"ResNet\.dropout must be in \[0, 1\); got 1\.0"):
    jd.models.create("resnet8", dropout=1.0)
  with pytest.raises(ValueError, match=r"DiffAINet\.num_classes must be >= 1; got 0"):
    jd.models.create("conv_small", num_classes=0)
  with pytest.raises(ValueError, match=r"Ensemble\.size must be >= 1; got 0"):
    jd.models.Ensemble(member=jd.models.create("mlp"), size=0)


# ----------------------------------------------------------------- 4. step by name
def test_step_given_by_name_or_dict_becomes_the_rule(resnet):
  assert jd.models.create("resnet8", step="euler_maruyama").step == dynamics.EulerMaruyama()
  assert jd.models.create("resnet8", step="damped").step == dynamics.Damped()
  spec = {"name": "euler_maruyama", "coef": 0.2}
  assert jd.models.create("resnet8", step=spec).step == dynamics.EulerMaruyama(coef=0.2)
  assert jd.models.create("en_preact_resnet20", step="euler").step == dynamics.Euler()
  # the named rule is the real one: the bound model is stochastic and draws noise
  _, variables = resnet
  m = jd.models.bind(_one_block(step="euler_maruyama"), variables)
  assert m.stochastic
  a, b = m(X1, jax.random.PRNGKey(1)), m(X1, jax.random.PRNGKey(2))
  assert a.shape == (4, 10) and not np.allclose(a, b)
  plain = jd.models.bind(_one_block(step="euler"), variables)
  assert not plain.stochastic
  np.testing.assert_allclose(plain(X1), jd.models.bind(resnet[0], variables)(X1), rtol=1e-6)


def test_unknown_step_name_lists_the_names():
  with pytest.raises(ValueError, match=r"unknown ResNet\.step='eulr'.*\['damped', 'euler', "
                                       r"'euler_maruyama'\].*Did you mean 'euler'"):
    jd.models.create("resnet8", step="eulr")
  assert jd.models.with_step(jd.models.create("resnet8"), "damped").step == dynamics.Damped()


# ----------------------------------------------------------------- 5. channel mismatch
def test_three_channel_input_to_one_channel_resnet_names_the_layer(resnet):
  model, variables = resnet
  m = jd.models.bind(model, variables)
  with pytest.raises(ValueError, match=r"Conv layer 'Conv_0' expects inputs with 1 channels "
                                       r".*shape \(4, 8, 8, 3\) with 3 channels"):
    m(X3)
  with pytest.raises(ValueError, match=r"Conv layer 'Conv_0' expects inputs with 1 channels"):
    model.apply(variables, X3)  # the layer itself says it, with or without ModelFn


def test_three_channel_input_to_one_channel_mlp_names_the_layer(mlp):
  model, variables = mlp
  with pytest.raises(ValueError, match=r"Dense layer 'Dense_0' expects inputs with 64 "
                                       r"features .*with 192 features"):
    jd.models.bind(model, variables)(X3)


def test_model_fn_explains_a_shape_mismatch_of_plain_flax_layers():
  class Plain(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x, train=False):
      return flax_nn.Dense(3)(x.reshape(x.shape[0], -1))
  variables = Plain().init(KEY, X1)
  with pytest.raises(ValueError, match=r"Plain cannot run on x of shape \(4, 8, 8, 3\)"):
    jd.models.bind(Plain(), variables)(X3)


def test_stored_parameter_of_another_width_is_named_without_tracing_the_initialiser(
    monkeypatch):
  """``nn._layers.param`` replaces Flax's per-apply shape probe (an ``eval_shape`` of
  the initialiser, half the tracing time of a ResNet) by a direct comparison: the same
  models apply, a mismatched stored parameter still gets a clear error, and applying
  traces no initialiser."""
  bn = jd.nn.BatchNorm()
  wide = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), bn.init(KEY, X1))
  with pytest.raises(ValueError, match=r"BatchNorm layer: parameter 'scale' has shape \(2,\) "
                                       r"in the given variables, but the layer expects "
                                       r"\(1,\)"):
    bn.apply(wide, X1)
  model = _one_block()
  variables = model.init(KEY, X1)
  probes = []
  real = jax.eval_shape
  monkeypatch.setattr(jax, "eval_shape", lambda fn, *a, **k: probes.append(fn) or real(
      fn, *a, **k))
  logits = jax.jit(lambda v, x: model.apply(v, x))(variables, X1)
  assert probes == [] and logits.shape == (4, 10)


# ----------------------------------------------------------------- 6. batch runner
def _row_sum(batch, key):
  del key
  return jnp.sum(batch[0], axis=(1, 2, 3))


@pytest.mark.parametrize("batch_size", [0, -4])
def test_run_batches_rejects_batch_size_below_one(batch_size):
  with pytest.raises(ValueError, match=rf"batch_size must be >= 1; got {batch_size}\."):
    jd.data.run_batches(_row_sum, (X1,), batch_size=batch_size)


def test_certify_batch_size_zero_gets_the_runner_message(mlp):
  model, variables = mlp  # the path of `jaxdefense certify --batch_size 0`
  with pytest.raises(ValueError, match=r"batch_size must be >= 1; got 0\."):
    jd.certify.report(model, variables, X1, Y, 0.01, pgd_steps=0, batch_size=0)


def test_run_batches_rejects_an_empty_data_set():
  with pytest.raises(ValueError, match=r"arrays have 0 rows \(shapes \[\(0, 8, 8, 1\)\]\)"):
    jd.data.run_batches(_row_sum, (X1[:0],), batch_size=2)
  out = jd.data.run_batches(_row_sum, (X1,), batch_size=3)  # 4 rows, padded last batch
  np.testing.assert_allclose(out, X1.sum(axis=(1, 2, 3)), rtol=1e-5)


# ----------------------------------------------------------------- 7. batches too large
def test_batches_larger_than_the_data_with_drop_remainder_raises():
  with pytest.raises(ValueError, match=r"batch_size=10 is larger than the data "
                                       r"\(4 examples\).*drop_remainder=True"):
    jd.data.batches((X1, Y), 10)
  (xb, yb), = list(jd.data.batches((X1, Y), 10, drop_remainder=False, shuffle=False))
  np.testing.assert_array_equal(yb, Y)
  assert len(list(jd.data.batches((X1, Y), 4))) == 1  # equal to the data: one batch


# ----------------------------------------------------------------- 8. bad images
def test_dataset_rejects_nan_images():
  x = X1.copy()
  x[1, 2, 3, 0] = np.nan
  x[2, 0, 0, 0] = np.inf
  with pytest.raises(ValueError, match=r"images contains 2 NaN or infinite entries"):
    jd.data.Dataset(x, Y, 10, "toy", "train")


def test_dataset_rejects_images_on_a_255_scale():
  with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]; got values in "
                                       r"\[.*, 25\d\.?\d*\] \(images on a \[0, 255\] scale\? "
                                       r"divide by 255\)"):
    jd.data.Dataset(X1 * 255.0, Y, 10, "toy", "train")
  with pytest.raises(TypeError, match=r"images must be a floating-point array"):
    jd.data.Dataset((X1 * 255).astype(np.uint8), Y, 10, "toy", "train")
