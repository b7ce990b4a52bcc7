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


# ------------------------------------------------------- fan-in and exact maps
def _exact(model, v, x):
  """The model in float64: the real-valued output up to ~1e-16 relative."""
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), v)
    return np.asarray(model.apply(v64, jnp.asarray(np.asarray(x, np.float64))))


def _cancelling_conv(features=4, channels=64, size=10, seed=0):
  """A 3x3 conv on 64 channels whose outputs are sums of large terms of both signs."""
  conv = jd.nn.Conv(features, 3, padding="SAME")
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.uniform(size=(2, size, size, channels)), jnp.float32)
  v = jax.jit(conv.init)(jax.random.PRNGKey(0), x)
  v = {"params": {"kernel": jnp.asarray(rng.normal(size=(3, 3, channels, features)) * 1e3,
                                        jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(features,)), jnp.float32)}}
  return conv, v, x


@pytest.mark.parametrize("domain", ["box", "zonotope"])
def test_conv_slack_uses_the_true_fan_in_and_contains_both_networks(domain):
  """A conv's slack counts its kh * kw * C_in terms, not every input of the example
  (10 x 10 x 64 = 6,400 here, 576 for the kernel): the bounds at eps = 0 are within the
  576-term slack, yet contain the float32 and the float64 (exact) outputs."""
  conv, v, x = _cancelling_conv()
  cls = Box if domain == "box" else HybridZonotope
  z = cls.from_bounds(x, x, sound=True)
  lo, hi = (np.asarray(a) for a in conv.apply(v, z).concretize())
  out32, out64 = np.asarray(conv.apply(v, x)), _exact(conv, v, x)
  for out in (out32, out64):
    assert np.all(lo <= out) and np.all(out <= hi)
  assert np.any(out32 != out64)          # rounding did happen
  w = np.abs(np.asarray(v["params"]["kernel"], np.float64))
  mag = np.asarray(conv.apply({"params": {"kernel": jnp.asarray(w, jnp.float32),
                                          "bias": jnp.zeros(4)}}, jnp.abs(x)), np.float64)
  mag += np.abs(np.asarray(v["params"]["bias"]))
  u = 2.0 ** -24
  g = lambda k: k * u / (1 - k * u)
  true_fan_in, every_input = 3 * 3 * 64, 10 * 10 * 64
  half = (hi.astype(np.float64) - lo) / 2
  assert np.all(half <= 1.05 * 4 * g(true_fan_in + 2) * mag + 1e-6)
  assert np.all(half < 4 * g(every_input + 2) * mag / 5)


def test_fan_in_none_stays_the_safe_default():
  """A user map through ``linear_map`` without ``fan_in`` pays the per-example count;
  with ``fan_in=0`` (a pure selection) it pays nothing."""
  x = jnp.asarray(np.random.RandomState(0).uniform(size=(2, 4, 4, 3)), jnp.float32)
  b = Box.from_bounds(x, x, sound=True)
  pick = lambda a: a[:, ::2, ::2, :]
  safe = jd.nn.linear_map(b, pick)
  exact = jd.nn.linear_map(b, pick, fan_in=0)
  np.testing.assert_array_equal(exact.radius, pick(b.radius))
  assert bool(jnp.all(safe.radius > exact.radius))
  z = HybridZonotope.from_bounds(x - 0.1, x + 0.1, sound=True).correlate_all()
  ze = jd.nn.linear_map(z, pick, fan_in=0)
  np.testing.assert_array_equal(ze.box, pick(z.box))
  np.testing.assert_array_equal(ze.generators, jax.vmap(pick)(z.generators))
  out = jd.nn.PadShortcut(features=5, stride=2).apply({}, b)   # select + zero-pad: exact
  np.testing.assert_array_equal(out.radius[..., 1:4], pick(b.radius))
  assert float(jnp.max(jnp.abs(out.radius[..., 0]))) == 0.0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_linear_map_rejects_a_bad_fan_in(bad):
  x = Box.from_bounds(jnp.zeros((1, 2)), jnp.ones((1, 2)), sound=True)
  with pytest.raises(ValueError, match="fan_in"):
    jd.nn.linear_map(x, lambda a: a, fan_in=bad)


def test_exact_output_inside_sound_bounds_at_full_size():
  """ConvSmall at its full 28 x 28 input (784 input generators, DeepZ adds hundreds):
  the float64 network and the float32 one stay inside the sound bounds at eps 0 and
  1e-7, and the rounding slack is small (width < 0.05) where the net is well scaled."""
  model = jd.models.create("conv_small", num_classes=10)
  x = jnp.asarray(np.random.RandomState(0).uniform(size=(2, 28, 28, 1)), jnp.float32)
  v = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  out32, out64 = np.asarray(model.apply(v, x)), _exact(model, v, x)
  for domain in DOMAINS:
    for eps in (0.0, 1e-7):
      lo, hi = (np.asarray(a) for a in certify.bounds(model, v, x, eps, domain, sound=True))
      for out in (out32, out64):
        assert np.all(lo <= out) and np.all(out <= hi), (domain, eps)
      assert float(np.max(hi - lo)) < 0.05, (domain, eps)
