"""The training-speed code paths: Conv's materialising JVP and the recommended XLA flags.

``jaxdefense.nn._layers._conv`` must give exactly the values and derivatives (reverse
and forward mode) of the plain convolution; it only changes what XLA:CPU fuses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import _xla_flags
from jaxdefense.nn import _layers as L


def _cases():
  # (input shape, kernel shape, strides, padding, groups)
  return [
      ((3, 9, 9, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), 1),
      ((3, 9, 9, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)), 1),
      ((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), ((0, 0), (0, 0)), 1),
      ((2, 8, 8, 4), (3, 3, 2, 6), (1, 1), "SAME", 2),
  ]


@pytest.mark.parametrize("case", _cases())
def test_conv_matches_plain_conv(case):
  xs, ks, strides, padding, groups = case
  kx, kk, kt = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, xs)
  k = jax.random.normal(kk, ks)
  fast = lambda x, k: L._conv(x, k, strides, padding, groups)
  plain = lambda x, k: L._conv_plain(x, k, strides, padding, groups)
  y = jax.jit(fast)(x, k)
  np.testing.assert_array_equal(y, jax.jit(plain)(x, k))
  ct = jax.random.normal(kt, y.shape)
  for argnums in ((0,), (1,), (0, 1)):
    g_fast = jax.jit(jax.grad(lambda x, k: jnp.vdot(fast(x, k), ct), argnums))(x, k)
    g_plain = jax.jit(jax.grad(lambda x, k: jnp.vdot(plain(x, k), ct), argnums))(x, k)
    for a, b in zip(g_fast, g_plain):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  tx, tk = jnp.ones_like(x), jnp.ones_like(k)
  _, t_fast = jax.jvp(fast, (x, k), (tx, tk))
  _, t_plain = jax.jvp(plain, (x, k), (tx, tk))
  np.testing.assert_allclose(t_fast, t_plain, rtol=1e-6, atol=1e-6)


def test_kernel_gradient_materialises_input_on_cpu_only_when_needed():
  x = jnp.ones((2, 8, 8, 4))
  k = jnp.ones((3, 3, 4, 4))
  conv = lambda x, k: L._conv(x, k, (1, 1), ((1, 1), (1, 1)), 1).sum()
  train_hlo = jax.jit(jax.grad(conv, 1)).lower(x, k).compile().as_text()
  attack_hlo = jax.jit(jax.grad(conv, 0)).lower(x, k).compile().as_text()
  eval_hlo = jax.jit(conv).lower(x, k).compile().as_text()
  if jax.default_backend() == "cpu":
    assert "gather" in train_hlo
  assert "gather" not in attack_hlo and "gather" not in eval_hlo


def test_recommended_flags_merge_and_version_gate():
  flags = _xla_flags.recommended_cpu_flags((0, 10, 2))
  assert flags == ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
  assert _xla_flags.recommended_cpu_flags((0, 4, 35)) == ()
  merged = _xla_flags.with_recommended_cpu_flags("--xla_force_host_platform_device_count=4",
                                                 (0, 10, 2))
  assert merged.split() == ["--xla_force_host_platform_device_count=4", *flags]
  mine = "--xla_cpu_experimental_ynn_fusion_type="
  assert _xla_flags.with_recommended_cpu_flags(mine, (0, 10, 2)) == mine
  assert _xla_flags.with_recommended_cpu_flags(None, (0, 4, 35)) == ""


def test_cli_installs_the_flags_only_before_jax_starts(monkeypatch):
  from jaxdefense.commands import _main as cli
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.setattr(_xla_flags, "backend_started", lambda: False)
  assert cli.install_xla_flags()
  wanted = _xla_flags.with_recommended_cpu_flags("--xla_force_host_platform_device_count=2")
  import os
  assert os.environ["XLA_FLAGS"] == wanted
  monkeypatch.setattr(_xla_flags, "backend_started", lambda: True)
  monkeypatch.setenv("XLA_FLAGS", "--mine")
  assert not cli.install_xla_flags()
  assert os.environ["XLA_FLAGS"] == "--mine"


_PROBE = """
import os, sys, warnings
warnings.simplefilter("always")
if sys.argv[1] == "late":
    import jax
    jax.numpy.zeros(1).block_until_ready()     # the backend starts before the import
import jaxdefense
from jaxdefense import _xla_flags
import jax
jax.numpy.zeros(1).block_until_ready()
print("FLAGS=" + os.environ.get("XLA_FLAGS", ""))
"""


def _probe(mode, **env):
  import subprocess
  import sys
  from conftest import subprocess_env
  e = subprocess_env()
  e.pop("JAXDEFENSE_NO_XLA_FLAGS", None)
  e.update(env)
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=e, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  flags = next(l for l in out.stdout.splitlines() if l.startswith("FLAGS="))[6:]
  return flags.split(), out.stderr


@pytest.mark.skipif(not _xla_flags.recommended_cpu_flags(),
                    reason="no recommended flag for this jaxlib")
def test_importing_jaxdefense_installs_the_flags_before_jax_starts():
  wanted = list(_xla_flags.recommended_cpu_flags())
  flags, err = _probe("early", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  assert flags == ["--xla_force_host_platform_device_count=1", *wanted]
  assert "not active" not in err
  # A user's own value of the flag wins.
  mine = "--xla_cpu_experimental_ynn_fusion_type="
  flags, _ = _probe("early", XLA_FLAGS=mine)
  assert flags == [mine]
  # Opt-out: XLA_FLAGS untouched.
  flags, _ = _probe("early", XLA_FLAGS="", JAXDEFENSE_NO_XLA_FLAGS="1")
  assert flags == []


@pytest.mark.skipif(not _xla_flags.recommended_cpu_flags(),
                    reason="no recommended flag for this jaxlib")
def test_importing_after_jax_started_warns_with_the_fix():
  flags, err = _probe("late", XLA_FLAGS="")
  assert flags == []                                  # too late: left alone
  assert "not active" in err and "XLA_FLAGS='--xla_cpu_experimental_ynn" in err
  assert "JAXDEFENSE_NO_XLA_FLAGS=1" in err
  _, err = _probe("late", XLA_FLAGS="", JAXDEFENSE_NO_XLA_FLAGS="1")
  assert "not active" not in err
