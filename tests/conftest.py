"""Shared pytest setup: a persistent XLA compilation cache and small fixtures.

The cache (one folder per test session) lets subprocesses launched by tests reuse the
executables the test process already compiled (the variable is exported to them), which
matters on a busy 2-core machine where compiling a small ResNet step takes seconds.
Configuring JAX here is allowed (entry points and conftest only, see STYLE.md).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

import jax
import pytest

_CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR")
if not _CACHE_DIR:
  _CACHE_DIR = tempfile.mkdtemp(prefix="jaxdefense_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


# --- compile-time report: JAXDEFENSE_COMPILE_REPORT=DIR python -m pytest -------------
# Every process (each xdist worker and the controller) sums JAX's compile events and
# writes them to DIR at the end of its session; the controller prints the share of the
# suite's process time spent tracing, lowering and compiling (issue 19, section 4).
_REPORT_DIR = os.environ.get("JAXDEFENSE_COMPILE_REPORT")
_COMPILE_LOG = None
if _REPORT_DIR:
  from jaxdefense._compile_log import CompileLog
  _COMPILE_LOG = CompileLog().start()


def pytest_sessionfinish(session):
  if _COMPILE_LOG is None:
    return
  import json
  _COMPILE_LOG.stop()
  os.makedirs(_REPORT_DIR, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  with open(os.path.join(_REPORT_DIR, f"{worker}-{os.getpid()}.json"), "w") as f:
    json.dump(_COMPILE_LOG.as_dict(), f)


def pytest_terminal_summary(terminalreporter):
  if _COMPILE_LOG is None or os.environ.get("PYTEST_XDIST_WORKER"):
    return
  import glob
  import json
  logs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(_REPORT_DIR, "*.json")))]
  total = {k: sum(l[k] for l in logs) for k in ("wall_s", "total_s", "trace_s", "lower_s",
                                                "compile_s", "cache_load_s", "compiles")}
  share = total["total_s"] / max(total["wall_s"], 1e-9)
  terminalreporter.write_line(
      f"compile report ({len(logs)} processes, {_REPORT_DIR}): {total['total_s']:.0f} s of "
      f"{total['wall_s']:.0f} s process time making executables ({100 * share:.0f} %): "
      f"trace {total['trace_s']:.0f} s, lower {total['lower_s']:.0f} s, XLA "
      f"{total['compile_s']:.0f} s ({total['compiles']} compiles), cache loads "
      f"{total['cache_load_s']:.0f} s")


def subprocess_env(host_devices: int | None = None) -> dict[str, str]:
  """Environment for a child Python process: same cache, chosen CPU device count."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if host_devices:
    flags.append(f"--xla_force_host_platform_device_count={host_devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run_python(args: Sequence[str], *, host_devices: int | None = None, timeout: float = 300,
               cwd: str | None = None) -> subprocess.CompletedProcess:
  """Run ``python ARGS`` in a child process and capture its output."""
  return subprocess.run([sys.executable, *args], env=subprocess_env(host_devices),
                        capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture
def tiny_overrides() -> list[str]:
  """Overrides that make the ``demo`` preset a seconds-long MLP run on digits."""
  return ["model.name=mlp", "model.hidden=(32,)", "epochs=2", "batch_size=64",
          "eval_batch_size=200", "validation_size=200", "checkpoint.keep_best=true",
          "progress_bar=false", "log_every_steps=5", "schedule.name=constant",
          "optimizer.learning_rate=0.05"]
