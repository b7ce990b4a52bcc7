"""The compile-event log behind benchmarks/compile_time.py and the suite's compile report."""

import jax
import jax.numpy as jnp

from jaxdefense._compile_log import CompileLog


def test_counts_compiles_only_while_active():
  log = CompileLog()
  jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(7))  # before start: not counted
  assert log.compiles == 0 and log.total_s == 0.0
  x = jnp.ones(5)
  with log:
    f = jax.jit(lambda x: jnp.sin(x) * 2.0 - x)
    f(x)
    f(x)  # cached in memory: no second compile
  assert log.compiles == 1 and log.trace_s > 0 and log.compile_s > 0
  assert log.wall_s >= log.compile_s and log.total_s >= log.compile_s
  before = log.as_dict()
  jax.jit(lambda x: jnp.cos(x) / 3.0)(x)  # after stop: not counted
  assert log.as_dict() == before
  assert set(before) >= {"trace_s", "lower_s", "compile_s", "cache_load_s", "compiles",
                         "cache_hits", "cache_misses", "wall_s", "total_s"}
