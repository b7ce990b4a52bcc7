"""Analysis tools: loss landscapes, Jacobian / Lyapunov spectra and their figures.

One tiny pre-activation ResNet (one stage of two blocks, 2 channels, 4x4 images) serves
every test: block 0 is a plain ResNet block (``Damped`` keeps the first block plain) and
block 1 is damped, so both closed forms (``1`` and ``1 - lambda`` for a zero branch) are
checked on one compiled program.
"""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
from jaxdefense import analysis
from jaxdefense.analysis import _spectrum
from jaxdefense.dynamics import Damped, EulerMaruyama
from jaxdefense.models import ResidualBlock

STEP = Damped("relu")
MODEL = jd.models.ResNet(stage_sizes=(2,), widths=(2,), strides=(1,), kind="preact",
                         shortcut="conv", step=STEP, stem_width=2, num_classes=3)
X = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1))
Y = np.array([0, 2], np.int32)
LAMBDA = 0.3
K, ITERS = 2, 150


@pytest.fixture(scope="module")
def variables():
  v = jax.jit(MODEL.init)(jax.random.key(0), X)
  # non-trivial batch statistics, so evaluation-mode batch norm is not the identity
  stats = jax.tree_util.tree_map(
      lambda a: a + 0.3 * jax.random.uniform(jax.random.key(a.size), a.shape),
      v["batch_stats"])
  return {**v, "batch_stats": stats}


@pytest.fixture(scope="module")
def zero_branch(variables):
  """The same network with every conv of both blocks zeroed and block 1's effective
  damping coefficient set to LAMBDA: block 0 is the identity, block 1 is (1 - LAMBDA) x."""
  params = dict(variables["params"])
  for name in ("block0", "block1"):
    block = dict(params[name])
    for sub in [s for s in block if s.startswith("Conv")]:
      block[sub] = {**block[sub], "kernel": jnp.zeros_like(block[sub]["kernel"])}
    params[name] = block
  (pname,) = STEP.param_names()
  assert pname in params["block1"] and pname not in params["block0"]
  params["block1"] = {**params["block1"], pname: STEP.parameter_for(LAMBDA)}
  return {**variables, "params": params}


@pytest.fixture(scope="module")
def spectrum(variables):
  return analysis.jacobian_spectrum(MODEL, variables, X, k=K, iters=ITERS)


@pytest.fixture(scope="module")
def landscape(variables):
  return analysis.loss_landscape(jd.models.bind(MODEL, variables), X, Y, radius=6.0, num=5,
                                 key=jax.random.key(3), batch_size=25)


# ---------------------------------------------------------------------- loss landscape
def test_landscape_origin_grid_and_directions(variables, landscape):
  m = jd.models.bind(MODEL, variables)
  logits = jax.jit(lambda x: m(x))
  ls = landscape
  assert ls.loss.shape == ls.pred.shape == (2, 5, 5)
  np.testing.assert_array_equal(ls.coords, [-6, -3, 0, 3, 6])
  assert ls.origin == 2 and ls.coords[ls.origin] == 0
  # the centre is the clean image: the model's own loss and prediction
  clean = jd.attacks.cross_entropy(logits(X), Y)
  np.testing.assert_allclose(ls.clean_loss, clean, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(ls.clean_pred, np.argmax(logits(X), axis=-1))
  # FGSM direction: the sign of the input gradient of the cross-entropy
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jd.attacks.cross_entropy(m(x), Y))))(X)
  np.testing.assert_array_equal(ls.fgsm_direction, np.sign(grad))
  # random direction: signs, exactly orthogonal to the FGSM direction, at most one zero
  d1 = ls.fgsm_direction.reshape(2, -1)
  d2 = ls.random_direction.reshape(2, -1)
  assert set(np.unique(d2)) <= {-1.0, 0.0, 1.0}
  np.testing.assert_array_equal(np.sum(d1 * d2, axis=1), 0.0)
  assert np.all(np.sum(d2 == 0, axis=1) <= 1)
  assert not np.array_equal(np.abs(d1 - d2).sum(1), np.zeros(2))
  # every grid point is clip(x + (a d1 + b d2) / 255): check corners and an axis point
  points = ((0, 0, 4), (1, 4, 0), (1, 2, 3), (0, 4, 4))
  imgs = jnp.stack([jnp.clip(X[b] + (ls.coords[i] * ls.fgsm_direction[b]
                                     + ls.coords[j] * ls.random_direction[b]) / 255.0, 0.0, 1.0)
                    for b, i, j in points])
  z = logits(imgs)
  labels = np.array([Y[b] for b, _, _ in points])
  np.testing.assert_allclose([ls.loss[p] for p in points],
                             jd.attacks.cross_entropy(z, labels), rtol=1e-5)
  np.testing.assert_array_equal([ls.pred[p] for p in points], np.argmax(z, axis=-1))
  # along the FGSM direction the loss rises to first order
  assert np.all(ls.loss[:, 3, 2] > ls.loss[:, 2, 2])


def test_landscape_of_one_image_has_no_batch_axis(variables, landscape):
  m = jd.models.bind(MODEL, variables)
  # batch_size = one image's grid: the batch fixture ran one image per call too, so
  # this reuses its compiled program
  one = analysis.loss_landscape(m, X[1], int(Y[1]), radius=6.0, num=5,
                                key=jax.random.key(4), batch_size=25)
  assert one.loss.shape == one.pred.shape == (5, 5) and one.label.shape == ()
  assert one.fgsm_direction.shape == one.random_direction.shape == X.shape[1:]
  np.testing.assert_allclose(one.clean_loss, landscape.clean_loss[1], rtol=1e-6)
  np.testing.assert_array_equal(one.fgsm_direction, landscape.fgsm_direction[1])
  # another key, another random direction, the same FGSM axis
  assert not np.array_equal(one.random_direction, landscape.random_direction[1])
  np.testing.assert_allclose(one.loss[:, 2], landscape.loss[1, :, 2], rtol=1e-6)


def test_landscape_bad_inputs(variables):
  m = jd.models.bind(MODEL, variables)
  with pytest.raises(ValueError, match="num must be odd"):
    analysis.loss_landscape(m, X, Y, num=4)
  with pytest.raises(ValueError, match="radius"):
    analysis.loss_landscape(m, X, Y, radius=0.0)
  with pytest.raises(ValueError, match=r"y must lie in \[0, 3\)"):
    analysis.loss_landscape(m, X, np.array([0, 3]))
  with pytest.raises(ValueError, match="one label per image"):
    analysis.loss_landscape(m, X, np.array([0]))
  with pytest.raises(ValueError, match="one integer label"):
    analysis.loss_landscape(m, X[0], Y)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    analysis.loss_landscape(m, X * 2.0, Y)
  with pytest.raises(ValueError, match="key"):
    analysis.loss_landscape(lambda x, k: m(x), X, Y, stochastic=True)
  with pytest.raises(TypeError, match="callable"):
    analysis.loss_landscape("resnet", X, Y)


# ---------------------------------------------------------------------- Jacobian spectra
def _block(n: int) -> ResidualBlock:
  return ResidualBlock(features=2, kind="preact", step=STEP, index=n, shortcut="conv")


def _dense_jacobians(variables):
  """Dense per-example Jacobians of blocks 0, 1 and of their composition (jacfwd)."""
  inter = MODEL.apply(variables, X, capture_intermediates=True,
                      mutable=["intermediates"])[1]["intermediates"]
  x0 = inter["Conv_0"]["__call__"][0]              # the stem's output, block 0's input
  fns = [lambda z, n=n: _block(n).apply({c: t[f"block{n}"] for c, t in variables.items()},
                                        z[None], False)[0] for n in (0, 1)]

  @jax.jit
  def dense(z):
    j0 = jax.jacfwd(fns[0])(z).reshape(32, 32)
    j1 = jax.jacfwd(fns[1])(fns[0](z)).reshape(32, 32)
    return j0, j1, j1 @ j0

  return [tuple(np.asarray(j) for j in dense(x0[b])) for b in range(X.shape[0])]


def test_spectrum_matches_dense_svd(variables, spectrum):
  s = spectrum
  assert s.blocks == ("block0", "block1") and s.num_blocks == 2
  assert s.block_sigma.shape == s.residual_sigma.shape == (2, 2, K)
  assert s.feature_sigma.shape == (2, K)
  for b, (j0, j1, jphi) in enumerate(_dense_jacobians(variables)):
    for n, j in enumerate((j0, j1)):
      dense = np.linalg.svd(j, compute_uv=False)[:K]
      np.testing.assert_allclose(s.block_sigma[b, n, 0], dense[0], rtol=1e-3)
      assert np.all(s.block_sigma[b, n] <= dense * (1 + 1e-4))   # power iteration: below
      # the residual branch: the block minus its identity shortcut (Euler) or minus
      # (1 - a) I (damped block 1)
      a = 0.0 if n == 0 else float(STEP.coefficient(None, None, variables["params"]["block1"]))
      dense_f = np.linalg.svd(j - (1 - a) * np.eye(32), compute_uv=False)[:K]
      np.testing.assert_allclose(s.residual_sigma[b, n, 0], dense_f[0], rtol=1e-3)
    dense_phi = np.linalg.svd(jphi, compute_uv=False)[:K]
    np.testing.assert_allclose(s.feature_sigma[b, 0], dense_phi[0], rtol=1e-3)
  # the product of the blocks' norms bounds the feature map's; the exponent's definition
  np.testing.assert_allclose(s.product_bound, np.prod(s.block_sigma[:, :, 0], axis=1),
                             rtol=1e-6)
  assert np.all(s.product_bound >= s.feature_sigma[:, 0] * (1 - 1e-4))
  np.testing.assert_allclose(s.lyapunov, np.log(s.feature_sigma[:, 0]) / 2, rtol=1e-6)
  assert np.all(s.lyapunov_bound >= s.lyapunov - 1e-5)


def test_zero_branch_gives_one_and_one_minus_lambda(zero_branch):
  s = analysis.jacobian_spectrum(jd.models.bind(MODEL, zero_branch), None, X, k=K,
                                 iters=ITERS)
  # plain block (first block): the identity; damped block: (1 - lambda) I
  np.testing.assert_allclose(s.block_sigma[:, 0], 1.0, rtol=1e-5)
  np.testing.assert_allclose(s.block_sigma[:, 1], 1.0 - LAMBDA, rtol=1e-5)
  np.testing.assert_array_equal(s.residual_sigma, 0.0)
  np.testing.assert_allclose(s.feature_sigma, 1.0 - LAMBDA, rtol=1e-5)
  np.testing.assert_allclose(s.product_bound, 1.0 - LAMBDA, rtol=1e-5)
  np.testing.assert_allclose(s.lyapunov, np.log(1.0 - LAMBDA) / 2, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_spectrum_program_holds_no_lapack_call(variables, k):
  """Regression: batched LAPACK custom calls (``jnp.linalg.qr`` / ``eigvalsh`` under
  ``vmap``) in the spectrum program deadlocked XLA:CPU's intra-op thread pool (both
  threads of a 2-core machine parked in ``jax::ParallelBatchMap``; the In-ResNet study's
  analysis cell hung with 32 examples per batch).  The compiled program must hold no
  custom call at all: Gram-Schmidt in XLA ops, the k x k eigenproblems on the host."""
  bound = jd.models.bind(MODEL, variables)
  key = jax.random.key(0)
  key_data = jax.random.key_data(jax.random.split(key, X.shape[0]))
  text = _spectrum._spectrum_batch.lower(bound, X, key_data, k=k, iters=2,
                                         impl=jax.random.key_impl(key)).as_text()
  assert "custom_call" not in text, sorted(set(
      line.split("custom_call @")[1].split("(")[0] for line in text.splitlines()
      if "custom_call @" in line))


def test_orthonormal_rows_and_standalone_top_singular_values():
  v = jax.random.normal(jax.random.key(4), (3, 50))
  q = np.asarray(_spectrum._orthonormal_rows(v))
  np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-5)
  # the same span, built row by row (row j of q mixes rows 0..j of v only)
  coef = np.linalg.lstsq(np.asarray(v).T, q.T, rcond=None)[0]
  np.testing.assert_allclose(np.asarray(v).T @ coef, q.T, atol=1e-4)
  np.testing.assert_allclose(np.tril(coef, -1), 0.0, atol=1e-4)
  # a dependent row: a unit (rounding) vector orthogonal to the first, or 0, never NaN
  dep = np.asarray(_spectrum._orthonormal_rows(jnp.stack([v[0], 2.0 * v[0]])))
  assert np.all(np.isfinite(dep)) and abs(dep[0] @ dep[1]) < 1e-3
  assert np.isclose(np.linalg.norm(dep[1]), 1.0, atol=1e-4) or not np.any(dep[1])
  np.testing.assert_array_equal(_spectrum._orthonormal_rows(jnp.zeros((1, 5))), 0.0)
  # top_singular_values on a linear map: the dense singular values, from below
  a = np.asarray(jax.random.normal(jax.random.key(5), (30, 20)))
  sv = np.linalg.svd(a, compute_uv=False)
  got = np.asarray(_spectrum.top_singular_values(lambda t: jnp.asarray(a) @ t, jnp.zeros(20),
                                                 jax.random.normal(jax.random.key(6), (3, 20)),
                                                 300))
  np.testing.assert_allclose(got, sv[:3], rtol=1e-3)
  np.testing.assert_allclose(_spectrum._ritz_values(np.diag([4.0, 9.0, 0.0])), [3, 2, 0])


def test_spectrum_resolves_ensembles_and_noise():
  noisy = jd.models.create("preact_resnet8", step=EulerMaruyama(coef=0.1))
  module, _ = _spectrum._resolve(noisy, {"params": {}}, 0)
  assert module.step == EulerMaruyama(coef=0.1, at_test=False)
  assert not jd.models.is_stochastic(module)
  ens = jd.models.Ensemble(member=MODEL, size=3)
  v = jax.eval_shape(lambda: ens.init(jax.random.key(0), X))
  v = jax.tree_util.tree_map(lambda a: np.arange(a.size, dtype=np.float32).reshape(a.shape)
                             + 0.0, v)
  module, sub = _spectrum._resolve(ens, v, 2)
  assert module is MODEL
  np.testing.assert_array_equal(sub["params"]["block1"]["Conv_0"]["kernel"],
                                v["params"]["member"]["block1"]["Conv_0"]["kernel"][2])
  with pytest.raises(ValueError, match="member"):
    _spectrum._resolve(ens, v, 3)


def test_spectrum_bad_inputs(variables):
  mlp = jd.models.create("mlp", hidden=(4,), num_classes=3)
  with pytest.raises(ValueError, match="no residual blocks"):
    analysis.jacobian_spectrum(mlp, jax.eval_shape(mlp.init, jax.random.key(0), X), X)
  with pytest.raises(TypeError, match="wrapped logits function"):
    analysis.jacobian_spectrum(jd.models.ModelFn.wrap(lambda x: x), None, X)
  with pytest.raises(ValueError, match="variables=None"):
    analysis.jacobian_spectrum(MODEL, None, X)
  with pytest.raises(ValueError, match="k must be <= 32"):
    analysis.jacobian_spectrum(MODEL, variables, X, k=33)
  with pytest.raises(ValueError, match="rank 4"):
    analysis.jacobian_spectrum(MODEL, variables, X[0])


# ---------------------------------------------------------------------- figures
def _is_png(path) -> bool:
  with open(path, "rb") as f:
    head = f.read(8)
  return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_plots_write_png(tmp_path, landscape, spectrum):
  out = analysis.plot_loss_landscape(landscape, tmp_path / "figs" / "landscape.png",
                                     index=1, title="tiny", class_names=["a", "b", "c"])
  assert out == str(tmp_path / "figs" / "landscape.png") and _is_png(out)
  out = analysis.plot_spectra({"ResNet": spectrum, "In-ResNet": spectrum},
                              tmp_path / "spectra.png", which="residual")
  assert _is_png(out)
  with pytest.raises(ValueError, match="which"):
    analysis.plot_spectra({"a": spectrum}, tmp_path / "x.png", which="eigen")
  with pytest.raises(ValueError, match="index"):
    analysis.plot_loss_landscape(landscape, tmp_path / "y.png", index=2)
  with pytest.raises(TypeError, match="JacobianSpectrum"):
    analysis.plot_spectra({"a": landscape}, tmp_path / "z.png")
