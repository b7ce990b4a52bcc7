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
from jaxdefense.dynamics import EulerMaruyama, fast_normal, fast_rademacher

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


@pytest.mark.parametrize("sampler", ["fast", "rademacher"])
def test_fused_enresnet_is_deterministic_per_key_and_as_noisy_as_the_jax_one(sampler):
  x = jax.random.uniform(jax.random.key(6), (4, 12, 12, 3))
  fused = jd.models.enresnet("preact_resnet8", sampler=sampler)
  slow = jd.models.enresnet("preact_resnet8")
  assert fused.step == EulerMaruyama(coef=0.1, sampler=sampler)
  assert slow.step.sampler == "jax"
  v = slow.init({"params": jax.random.key(0), "noise": jax.random.key(0)}, x)
  run = lambda m, s: m.apply(v, x, rngs={"noise": jax.random.key(s)})  # noqa: E731
  np.testing.assert_array_equal(run(fused, 7), run(fused, 7))
  # the spread of the logits over noise draws is the same for both samplers (within
  # sampling error): 24 draws each
  spread = {}
  for name, m in (("fused", fused), ("jax", slow)):
    outs = np.stack([np.asarray(run(m, s)) for s in range(24)])
    spread[name] = outs.std(0).mean()
  assert spread["fused"] > 0 and 0.7 < spread["fused"] / spread["jax"] < 1.4, spread


def test_rademacher_signs_are_fair_independent_and_deterministic():
  k1, k2 = jax.random.split(jax.random.key(11))
  a = np.asarray(fast_rademacher(k1, (N,)), np.float64)
  b = np.asarray(fast_rademacher(k2, (N,)), np.float64)
  assert set(np.unique(a)) == {-1.0, 1.0}
  assert abs(a.mean()) < 5 / np.sqrt(N)          # P(+1) = 1/2: five standard errors
  bound = 5 / np.sqrt(N)
  for lag in (1, 2, 16, 1024):
    assert abs(np.corrcoef(a[:-lag], a[lag:])[0, 1]) < bound, lag
  assert abs(np.corrcoef(a, b)[0, 1]) < bound
  keys = jax.random.split(jax.random.key(12), 2000)
  z = np.asarray(jax.vmap(lambda k: fast_rademacher(k, (64,)))(keys), np.float64)
  assert np.all(np.abs(z.mean(0)) < 5 / np.sqrt(2000))
  c = np.corrcoef(z.T)[np.triu_indices(64, 1)]
  assert np.max(np.abs(c)) < 5.5 / np.sqrt(2000)
  np.testing.assert_array_equal(fast_rademacher(k1, (3, 4)), fast_rademacher(k1, (3, 4)))
  assert fast_rademacher(k1, (3,), jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="fast_rademacher needs a floating dtype"):
    fast_rademacher(k1, (3,), jnp.int32)


def test_rademacher_increments_give_euler_maruyama_expectations():
  """The simplified weak Euler scheme: on the Ornstein-Uhlenbeck SDE dX = -X dt + s dW,
  Euler-Maruyama's E[X_n] and E[X_n^2] depend only on the increments' first two
  moments, so random signs give the Gaussian scheme's values (closed-form recursion),
  while single paths differ (the fourth moment of an increment is 1, not 3)."""
  h, s, steps, paths = 0.1, 0.8, 10, 200_000
  x0 = 1.0
  m1, m2 = x0, x0 ** 2
  for _ in range(steps):   # exact moments of the discrete scheme
    m1, m2 = (1 - h) * m1, (1 - h) ** 2 * m2 + s ** 2 * h
  for draw in (fast_normal, fast_rademacher):
    keys = jax.random.split(jax.random.key(13), steps)
    x = jnp.full((paths,), x0)
    for k in keys:
      x = x - h * x + s * np.sqrt(h) * draw(k, (paths,))
    x = np.asarray(x, np.float64)
    se1, se2 = x.std() / np.sqrt(paths), (x ** 2).std() / np.sqrt(paths)
    assert abs(x.mean() - m1) < 5 * se1, (draw.__name__, x.mean(), m1)
    assert abs((x ** 2).mean() - m2) < 5 * se2, (draw.__name__, (x ** 2).mean(), m2)
  z = np.asarray(fast_rademacher(jax.random.key(14), (N,)), np.float64)
  assert np.all(z ** 4 == 1.0)   # not Gaussian: E[z^4] = 1


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="floating dtype"):
    fast_normal(jax.random.key(0), (3,), jnp.int32)
  with pytest.raises(ValueError, match="2\\*\\*32"):
    fast_normal(jax.random.key(0), (1 << 16, 1 << 16))
  with pytest.raises(ValueError, match="sampler"):
    EulerMaruyama(sampler="threefry")
  with pytest.raises(ValueError, match="sampler"):
    jd.models.enresnet("preact_resnet8", size=2, noise=False, sampler="fast")
