"""Tests of jaxdefense.data corruptions (CIFAR-10-C noise family) and load_corrupted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import data

SHAPE = (32, 16, 16, 3)  # one shape everywhere: one compilation per kind
N = int(np.prod(SHAPE))

GAUSSIAN = [0.04, 0.06, 0.08, 0.09, 0.10]
SHOT = [500, 250, 100, 75, 50]
IMPULSE = [0.01, 0.02, 0.03, 0.05, 0.07]
SPECKLE = [0.06, 0.1, 0.12, 0.16, 0.2]


def grey(value):
  return np.full(SHAPE, value, np.float32)


def run(x, kind, severity, seed=0):
  return np.asarray(data.corrupt(x, kind, severity, jax.random.key(seed)))


def test_kinds_and_constants():
  assert data.corruption_kinds() == ("gaussian_noise", "shot_noise", "impulse_noise",
                                     "speckle_noise")
  for kind, consts in [("gaussian_noise", GAUSSIAN), ("shot_noise", SHOT),
                       ("impulse_noise", IMPULSE), ("speckle_noise", SPECKLE)]:
    assert [data.corruption_constant(kind, s) for s in range(1, 6)] == consts


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_statistics(severity):
  x = grey(0.5)
  r = run(x, "gaussian_noise", severity) - x
  c = GAUSSIAN[severity - 1]
  assert abs(r.mean()) < 5 * c / np.sqrt(N)
  assert r.std() == pytest.approx(c, rel=0.03)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_shot_statistics(severity):
  x = grey(0.3)
  y = run(x, "shot_noise", severity)
  c = SHOT[severity - 1]
  assert y.mean() == pytest.approx(0.3, abs=5 * np.sqrt(0.3 / c / N))
  assert y.var() == pytest.approx(0.3 / c, rel=0.05)  # Poisson(x c) / c has variance x / c
  assert np.allclose(y * c, np.round(y * c), atol=1e-3)  # counts / c


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_impulse_statistics(severity):
  x = grey(0.5)
  y = run(x, "impulse_noise", severity)
  c = IMPULSE[severity - 1]
  tol = 5 * np.sqrt(c * (1 - c) / N)
  assert np.mean(y != x) == pytest.approx(c, abs=tol)
  assert np.mean(y == 0) == pytest.approx(c / 2, abs=tol)
  assert np.mean(y == 1) == pytest.approx(c / 2, abs=tol)
  assert set(np.unique(y)) <= {0.0, 0.5, 1.0}


@pytest.mark.parametrize("severity", [1, 5])
def test_speckle_statistics(severity):
  x = np.broadcast_to(np.array([0.2, 0.4, 0.6], np.float32), SHAPE)
  r = run(np.ascontiguousarray(x), "speckle_noise", severity) - x
  c = SPECKLE[severity - 1]
  for ch, v in enumerate([0.2, 0.4, 0.6]):  # x + x N(0, c): std proportional to x
    assert r[..., ch].std() == pytest.approx(v * c, rel=0.05)
  np.testing.assert_array_equal(run(grey(0.0), "speckle_noise", severity), 0.0)


@pytest.mark.parametrize("kind", ["gaussian_noise", "shot_noise", "impulse_noise",
                                  "speckle_noise"])
def test_clipping_determinism_monotone(kind):
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, SHAPE).astype(np.float32)
  x[:, :2] = 0.0
  x[:, -2:] = 1.0  # extremes must stay in range
  outs = [run(x, kind, s) for s in range(1, 6)]
  for y in outs:
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 1.0
  np.testing.assert_array_equal(outs[2], run(x, kind, 3))  # deterministic per key
  assert not np.array_equal(outs[2], run(x, kind, 3, seed=1))
  mid = grey(0.5)
  dev = [np.mean(np.abs(run(mid, kind, s) - mid)) for s in range(1, 6)]
  assert all(a < b for a, b in zip(dev, dev[1:])), dev  # stronger with severity


def test_jit_with_static_kind_and_severity():
  x = jnp.asarray(grey(0.5))
  key = jax.random.key(2)
  # Bit-identical inside and outside jit (checked for all kinds by hand; one here to
  # keep compile time down).
  f = jax.jit(lambda x, k: data.corrupt(x, "gaussian_noise", 4, k))
  np.testing.assert_array_equal(f(x, key), data.corrupt(x, "gaussian_noise", 4, key))
  one = data.corrupt(grey(0.5)[0], "gaussian_noise", 2, key)  # a single [H, W, C] image
  assert one.shape == SHAPE[1:]


@pytest.mark.parametrize("kind", ["gaussian_noise", "shot_noise"])
def test_traced_severity_matches_the_python_severity(kind):
  """One compiled program serves the five severities (evaluation passes the severity as
  data); each gives the bit-identical result of the Python severity."""
  x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, SHAPE).astype(np.float32))
  key = jax.random.key(4)
  f = jax.jit(lambda x, s, k: data.corrupt(x, kind, s, k))
  for s in range(1, 6):
    np.testing.assert_array_equal(f(x, jnp.int32(s), key), data.corrupt(x, kind, s, key))
  with pytest.raises(TypeError, match="severity must be an integer"):
    jax.jit(lambda x, s, k: data.corrupt(x, kind, s, k))(x, jnp.float32(2), key)


def test_key_must_be_one_prng_key():
  x = grey(0.5)
  # a raw uint32 key (jax.random.PRNGKey) is a key too, with the same noise
  raw, typed = jax.random.PRNGKey(3), jax.random.wrap_key_data(jax.random.PRNGKey(3))
  np.testing.assert_array_equal(data.corrupt(x, "impulse_noise", 2, raw),
                                data.corrupt(x, "impulse_noise", 2, typed))
  with pytest.raises(TypeError, match="key must be a JAX PRNG key.*got None"):
    data.corrupt(x, "impulse_noise", 2, None)
  for bad in (3, "seed", np.zeros(3, np.uint32), np.zeros(2, np.float32)):
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
      data.corrupt(x, "impulse_noise", 2, bad)
  with pytest.raises(ValueError, match=r"key must be one PRNG key \(shape \(\)\)"):
    data.corrupt(x, "impulse_noise", 2, jax.random.split(jax.random.key(0), 2))


def test_bad_inputs():
  x = grey(0.5)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"kind must be one of .*gaussian_noise.*'blur'"):
    data.corrupt(x, "blur", 1, key)
  for bad in (0, 6):
    with pytest.raises(ValueError, match="severity"):
      data.corrupt(x, "gaussian_noise", bad, key)
  with pytest.raises(TypeError, match="severity"):
    data.corrupt(x, "gaussian_noise", 2.0, key)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    data.corrupt(x * 255, "gaussian_noise", 1, key)
  with pytest.raises(TypeError, match="floating"):
    data.corrupt(x.astype(np.uint8), "gaussian_noise", 1, key)
  with pytest.raises(ValueError, match="rank"):
    data.corrupt(x[0, 0], "gaussian_noise", 1, key)
  with pytest.raises(ValueError, match="severity"):
    data.corruption_constant("shot_noise", 9)


# ------------------------------------------------------------------------------------
# load_corrupted


def write_cifar_c(folder, m=3, corruption="gaussian_noise", seed=0):
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  images = rng.integers(0, 256, (5 * m, 32, 32, 3), dtype=np.uint8)
  labels = np.tile(rng.integers(0, 10, m).astype(np.uint8), 5)
  np.save(folder / f"{corruption}.npy", images)
  np.save(folder / "labels.npy", labels)
  return images, labels


def test_load_corrupted(tmp_path):
  images, labels = write_cifar_c(tmp_path / "CIFAR-10-C")
  ds = data.load_corrupted(tmp_path, "gaussian_noise", 2)  # parent folder works
  assert isinstance(ds, data.Dataset) and len(ds) == 3
  assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
  assert ds.name == "cifar10" and ds.split == "gaussian_noise/2" and ds.num_classes == 10
  np.testing.assert_allclose(ds.images * 255, images[3:6], atol=1e-3)
  np.testing.assert_array_equal(ds.labels, labels[3:6])
  every = data.load_corrupted(tmp_path / "CIFAR-10-C", "gaussian_noise")
  assert len(every) == 15 and every.split == "gaussian_noise/all"
  np.testing.assert_allclose(every.images[12:] * 255, images[12:], atol=1e-3)


def test_load_corrupted_first_examples_of_each_block(tmp_path):
  images, labels = write_cifar_c(tmp_path, m=4)
  two = data.load_corrupted(tmp_path, "gaussian_noise", 3, num_examples=2)
  assert len(two) == 2 and two.split == "gaussian_noise/3"
  np.testing.assert_allclose(two.images * 255, images[8:10], atol=1e-3)
  np.testing.assert_array_equal(two.labels, labels[8:10])
  every = data.load_corrupted(tmp_path, "gaussian_noise", num_examples=1)
  np.testing.assert_allclose(every.images * 255, images[::4], atol=1e-3)
  np.testing.assert_array_equal(every.labels, labels[::4])
  assert len(data.load_corrupted(tmp_path, "gaussian_noise", 1, num_examples=4)) == 4
  with pytest.raises(ValueError, match="num_examples must be <= 4.*got num_examples=5"):
    data.load_corrupted(tmp_path, "gaussian_noise", 1, num_examples=5)
  with pytest.raises(ValueError, match="num_examples must be >= 1"):
    data.load_corrupted(tmp_path, "gaussian_noise", 1, num_examples=0)


def test_load_corrupted_errors(tmp_path):
  write_cifar_c(tmp_path)
  with pytest.raises(FileNotFoundError, match="shot_noise"):
    data.load_corrupted(tmp_path, "shot_noise", 1)
  with pytest.raises(FileNotFoundError, match="zenodo"):
    data.load_corrupted(tmp_path / "elsewhere", "gaussian_noise", 1)
  with pytest.raises(ValueError, match="corruption"):
    data.load_corrupted(tmp_path, "rain", 1)
  with pytest.raises(ValueError, match="severity"):
    data.load_corrupted(tmp_path, "gaussian_noise", 6)
  with pytest.raises(ValueError, match="name"):
    data.load_corrupted(tmp_path, "gaussian_noise", 1, name="mnist")
  np.save(tmp_path / "labels.npy", np.zeros(14, np.uint8))
  with pytest.raises(ValueError, match="labels"):
    data.load_corrupted(tmp_path, "gaussian_noise", 1)
  np.save(tmp_path / "fog.npy", np.zeros((7, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"5 \* M"):
    data.load_corrupted(tmp_path, "fog", 1)
