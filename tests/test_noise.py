"""The fast counter-based Gaussian sampler of the stochastic steps: distribution,
independence (entries, positions across keys, split keys), determinism, fusion into an
EnResNet, and bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxdefense as jd
from jaxdefense.dynamics import EulerMaruyama, fast_normal

N = 1 << 20


def test_moments_and_distribution_are_standard_normal():
  z = np.asarray(fast_normal(jax.random.key(0), (N,)), np.float64)
  assert np.all(np.isfinite(z))
  # mean s.e. 1e-3, variance s.e. 1.4e-3, kurtosis s.e. 5e-3: five standard errors
  assert abs(z.mean()) < 5e-3 and abs(z.var() - 1) < 7e-3
  assert abs(stats.skew(z)) < 1.2e-2 and abs(stats.kurtosis(z)) < 2.5e-2
  assert stats.kstest(z[:200_000], "norm").pvalue > 1e-3
  # tails: P(|z| > 3) = 0.0027 (s.e. 5e-5 here)
  assert abs(np.mean(np.abs(z) > 3) - 0.0026998) < 3e-4
  assert np.max(np.abs(z)) < 5.5  # 23-bit inverse CDF, as jax.random.normal


def test_neighbouring_entries_and_split_keys_are_uncorrelated():
  k1, k2 = jax.random.split(jax.random.key(1))
  a = np.asarray(fast_normal(k1, (N,)), np.float64)
  b = np.asarray(fast_normal(k2, (N,)), np.float64)
  bound = 5 / np.sqrt(N)  # five standard errors of a correlation
  for lag in (1, 2, 16, 1024):
    assert abs(np.corrcoef(a[:-lag], a[lag:])[0, 1]) < bound, lag
  assert abs(np.corrcoef(a, b)[0, 1]) < bound
  # low bits of the counter (neighbouring pixels / channels) vs high bits (examples)
  x = np.asarray(fast_normal(k1, (256, 4096)), np.float64)
  assert abs(np.corrcoef(x[:-1].ravel(), x[1:].ravel())[0, 1]) < bound


def test_each_position_is_standard_normal_across_keys():
  # 2,000 keys x 64 positions: every position (counter value) must get a fresh N(0, 1)
  # from the key's seeds, not a value shared across keys
  keys = jax.random.split(jax.random.key(2), 2000)
  z = np.asarray(jax.vmap(lambda k: fast_normal(k, (64,)))(keys), np.float64)
  assert np.all(np.abs(z.mean(0)) < 5 / np.sqrt(2000))
  assert np.all(np.abs(z.var(0) - 1) < 5 * np.sqrt(2 / 2000))
  c = np.corrcoef(z.T)[np.triu_indices(64, 1)]
  assert np.max(np.abs(c)) < 5.5 / np.sqrt(2000)


def test_determinism_shape_dtype_and_key_implementations():
  k = jax.random.key(3)
  a, b = fast_normal(k, (4, 5, 6)), fast_normal(k, (4, 5, 6))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (4, 5, 6) and a.dtype == jnp.float32
  assert fast_normal(k, (3, 2), jnp.bfloat16).dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(fast_normal(jax.random.key(4), (4, 5, 6)) - a))) > 0.5
  z = fast_normal(jax.random.key(5, impl="rbg"), (4096,))
  assert abs(float(jnp.std(z)) - 1) < 0.1
  # under jit with a traced key: the same values
  np.testing.assert_array_equal(jax.jit(fast_normal, static_argnums=1)(k, (4, 5, 6)), a)


def test_fast_enresnet_is_deterministic_per_key_and_as_noisy_as_the_jax_one():
  x = jax.random.uniform(jax.random.key(6), (4, 12, 12, 3))
  fast = jd.models.enresnet("preact_resnet8", sampler="fast")
  slow = jd.models.enresnet("preact_resnet8")
  assert fast.step == EulerMaruyama(coef=0.1, sampler="fast") and slow.step.sampler == "jax"
  v = slow.init({"params": jax.random.key(0), "noise": jax.random.key(0)}, x)
  run = lambda m, s: m.apply(v, x, rngs={"noise": jax.random.key(s)})  # noqa: E731
  np.testing.assert_array_equal(run(fast, 7), run(fast, 7))
  # the spread of the logits over noise draws is the same for both samplers (within
  # sampling error): 24 draws each
  spread = {}
  for name, m in (("fast", fast), ("jax", slow)):
    outs = np.stack([np.asarray(run(m, s)) for s in range(24)])
    spread[name] = outs.std(0).mean()
  assert spread["fast"] > 0 and 0.7 < spread["fast"] / spread["jax"] < 1.4, spread


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="floating dtype"):
    fast_normal(jax.random.key(0), (3,), jnp.int32)
  with pytest.raises(ValueError, match="2\\*\\*32"):
    fast_normal(jax.random.key(0), (1 << 16, 1 << 16))
  with pytest.raises(ValueError, match="sampler"):
    EulerMaruyama(sampler="threefry")
  with pytest.raises(ValueError, match="sampler"):
    jd.models.enresnet("preact_resnet8", size=2, noise=False, sampler="fast")
