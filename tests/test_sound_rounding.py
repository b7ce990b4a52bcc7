"""Floating-point soundness (issue 14 section 3): bounds rounded outwards hold for the
float32 network.

Sampled float32 inputs of the set (corners included), run through the float32 concrete
network, never leave the ``sound=True`` bounds of the small DiffAI zoo nets, at ordinary
eps and at eps where rounding dominates (1e-7, 0); at eps = 0 the unrounded hybrid
zonotope bounds *are* violated (its centre goes through the layers in a batch with the
generators, so it rounds differently from the network), the rounded ones are not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
from jaxdefense import certify
from jaxdefense.certify import Box, HybridZonotope
from jaxdefense.models import _diffai  # noqa: F401  (registers the DiffAI zoo)

NETS = {"ffnn": (8, 8, 1), "conv_small": (16, 16, 1), "conv_med": (8, 8, 1),
        "resnet_tiny": (8, 8, 1)}
DOMAINS = ("box", "zonotope", "deepz")


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request):
  name = request.param
  model = jd.models.create(name, num_classes=10)
  x = jnp.asarray(np.random.RandomState(0).uniform(size=(2,) + NETS[name]), jnp.float32)
  v = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  return name, model, v, x


def _samples(x, eps, n=48, seed=0):
  """``n`` float32 points per image of ``[max(x - eps, 0), min(x + eps, 1)]``, half of
  them corners: ``[n, B, ...]``."""
  rng = np.random.RandomState(seed)
  x = np.asarray(x)
  lo = np.clip(x - np.float32(eps), 0, 1)
  hi = np.clip(x + np.float32(eps), 0, 1)
  t = rng.uniform(size=(n,) + x.shape).astype(np.float32)
  t[: n // 2] = t[: n // 2] > 0.5
  pts = np.where(t == 1, hi, np.where(t == 0, lo, lo + t * (hi - lo))).astype(np.float32)
  return np.clip(pts, lo, hi)


def _outputs(model, v, pts):
  """The float32 network on every point (one batch of ``n B`` images)."""
  n, b = pts.shape[:2]
  flat = jnp.asarray(pts.reshape((n * b,) + pts.shape[2:]))
  out = jax.jit(lambda v, a: model.apply(v, a))(v, flat)
  return np.asarray(out).reshape(n, b, -1)


def _violations(lo, hi, outs):
  return int(np.sum((outs < np.asarray(lo)[None]) | (outs > np.asarray(hi)[None])))


@pytest.mark.parametrize("eps", [0.05, 1e-7, 0.0])
def test_sampled_points_stay_inside_rounded_bounds(net, eps):
  name, model, v, x = net
  outs = _outputs(model, v, _samples(x, eps))
  for domain in DOMAINS:
    lo, hi = certify.bounds(model, v, x, eps, domain, sound=True)
    assert _violations(lo, hi, outs) == 0, (name, domain, eps)
    # Rounding only widens.
    lo0, hi0 = certify.bounds(model, v, x, eps, domain)
    assert bool(jnp.all(lo <= lo0)) and bool(jnp.all(hi >= hi0))
    width = float(jnp.max(hi0 - lo0))
    if eps >= 0.01 and width < 1.0:
      # ... by a little where the bounds mean something (where they explode, as IBP on
      # an untrained ResNet-Tiny, the uncorrelated slack is amplified as IBP is).
      assert float(jnp.max(lo0 - lo)) < 0.05 * width


def test_unrounded_bounds_can_be_violated_rounded_ones_not(net):
  """At eps = 0 the input set is the point x; the network's own float32 logits fall
  outside the unrounded zonotope bounds (a different rounding of the same sums)."""
  name, model, v, x = net
  outs = _outputs(model, v, np.asarray(x)[None])
  lo, hi = certify.bounds(model, v, x, 0.0, "zonotope")
  assert _violations(lo, hi, outs) > 0, name
  lo, hi = certify.bounds(model, v, x, 0.0, "zonotope", sound=True)
  assert _violations(lo, hi, outs) == 0, name


def test_sound_verify_never_certifies_more(net):
  name, model, v, x = net
  y = jnp.argmax(model.apply(v, x), -1)           # certifiable at small eps
  for eps in (0.0, 1e-4, 1e-2):
    for domain in DOMAINS:
      m_sound = certify.certified_margins(model, v, x, y, eps, domain)
      m_fast = certify.certified_margins(model, v, x, y, eps, domain, sound=False)
      assert bool(jnp.all(m_sound <= m_fast)), (name, eps, domain)
      ok_s = certify.verify(model, v, x, y, eps, domain)          # sound by default
      ok_f = certify.verify(model, v, x, y, eps, domain, sound=False)
      assert bool(jnp.all(~ok_s | ok_f))
      np.testing.assert_array_equal(ok_s, m_sound > 0)
  assert bool(jnp.all(certify.verify(model, v, x, y, 0.0, "zonotope", sound=False)))


def test_cancellation_certificate_only_when_rounding_allows():
  """A margin far below the float32 rounding of the logits is accepted by the fast
  path (a claim about the real-valued network) and refused by the sound one."""
  # z_0 - z_1 = 1e4 x_0 - 1e4 x_1 + 1e-6: at x_0 = x_1 the real margin is 1e-6, far
  # below the rounding error of 1e4-sized terms in float32 (about 1e-3).
  model = _diffai.DiffAINet(num_classes=2, correlate_last=False)
  x = jnp.full((1, 1, 1, 2), 0.5, jnp.float32)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  v = {"params": {"Dense_0": {"kernel": jnp.array([[1e4, 0.0], [-1e4, 0.0]], jnp.float32),
                              "bias": jnp.array([1e-6, 0.0], jnp.float32)}}}
  y = jnp.array([0])
  for domain in DOMAINS:
    assert bool(certify.verify(model, v, x, y, 0.0, domain, sound=False)[0])
    assert not bool(certify.verify(model, v, x, y, 0.0, domain)[0])
    lo, hi = certify.bounds(model, v, x, 0.0, domain, sound=True)
    out = model.apply(v, x)
    assert bool(jnp.all((lo <= out) & (out <= hi)))


def test_domains_propagate_the_flag_and_reject_bad_values():
  lo = jnp.zeros((1, 3))
  hi = jnp.ones((1, 3))
  b = Box.from_bounds(lo, hi, sound=True)
  z = HybridZonotope.from_bounds(lo, hi, sound=True)
  for v in (b, z, b + z, z.relu(), b.relu(), z.replace(relu_mode="deepz").relu(),
            b.scale_shift(2.0, 1.0), z.decorrelate(0), jax.jit(lambda a: a)(z),
            Box.concatenate([b, b], -1)):
    assert v.sound
  assert not Box.from_bounds(lo, hi).sound
  # the exact box [0, 1] is contained; the radius only grows
  blo, bhi = b.concretize()
  assert float(blo.max()) < 0 and float(bhi.min()) > 1
  with pytest.raises(TypeError, match="sound"):
    Box(lo, hi, sound="yes")
  with pytest.raises(TypeError, match="sound"):
    HybridZonotope.from_bounds(lo, hi, sound=1)
  model = jd.models.create("ffnn", num_classes=3)
  x = jnp.full((1, 4, 4, 1), 0.5)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  with pytest.raises(TypeError, match="sound"):
    certify.bounds(model, v, x, 0.1, sound="true")
  with pytest.raises(TypeError, match="sound"):
    certify.verify(model, v, x, jnp.array([0]), 0.1, sound=None)
  with pytest.raises(TypeError, match="sound"):
    certify.input_set(x, 0.1, sound=0)
  with pytest.raises(ValueError, match="eps"):
    certify.verify(model, v, x, jnp.array([0]), -0.1)
  with pytest.raises(ValueError, match="eps"):
    certify.bounds(model, v, x, 1.5, sound=True)
