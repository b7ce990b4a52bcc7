"""XLA:CPU flags recommended for speed, installed when ``jaxdefense`` is imported.

``import jaxdefense`` calls :func:`install_on_import`: when JAX has not yet created its
backend (the first array, ``jit`` call or ``jax.devices()``; ``import jax`` alone does
not create it), the recommended flags are added to ``XLA_FLAGS``, so a notebook or
script that only imports the library gets the speed the command line gets.  XLA reads
``XLA_FLAGS`` once, when the backend starts: when it has already started (an array was
made before ``import jaxdefense``) and runs on the CPU without the flags, a warning
gives the one line that fixes it.  A flag the user already set in ``XLA_FLAGS`` keeps the
user's value.  Opt out with the environment variable ``JAXDEFENSE_NO_XLA_FLAGS=1`` (set
before the import); the module reads no other variable.  Entry points that start before
the import (the command line, experiment drivers) may call
:func:`with_recommended_cpu_flags` themselves; installing twice changes nothing.

The flags (measured with ``benchmarks/train_step.py``; see ``benchmarks/TRAIN_STEP.md``):

``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
  jaxlib 0.10 hands every convolution to YNNPACK by default.  YNNPACK runs the
  kernel-gradient convolutions of a training step (window = the whole feature map,
  contraction over the batch) at 2-25 GFLOP/s on a 2-core AMD EPYC (AVX2), where
  XLA's Eigen convolution runs the same ones at 40-75 GFLOP/s; forward and
  input-gradient convolutions run at the same speed either way.  The flag removes
  convolutions from the YNNPACK set and keeps its reductions and dots.  On the
  ResNet-20 training step (one core each, images/s ours / PyTorch) it took jaxdefense
  from 0.58x to 0.77x with the plain convolution and from 0.65x to 0.86x with the
  library's materialising convolution (``jaxdefense/nn/_layers.py``).  It changes
  results at float rounding level only (a different summation order: the step's loss
  moved by 2e-7, gradients by 2e-6 relative).  Applied for jaxlib 0.10.x and 0.11.x,
  where the flag is known to exist (an unknown flag in ``XLA_FLAGS`` aborts the
  process); re-measure before widening the range.

Flags tried and *not* recommended (no gain beyond noise, or slower): disabling
YNNPACK entirely (``--xla_cpu_experimental_ynn_fusion_type=``), the legacy runtime
(``--xla_cpu_use_thunk_runtime=false``), ``--xla_cpu_use_xnnpack=true``,
``--xla_cpu_use_onednn=true``, the XNNPACK graph fusion, ``--xla_cpu_use_fusion_emitters
=false``, ``--xla_cpu_enable_concurrency_optimized_scheduler=false``, and fast math
(it also changes numerics).
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

#: Set to a non-empty value other than ``0`` to keep ``XLA_FLAGS`` as it is on import.
OPT_OUT_ENV = "JAXDEFENSE_NO_XLA_FLAGS"

# (flag name, value, (min jaxlib version, first jaxlib version without it known))
_CPU_FLAGS: tuple[tuple[str, str, tuple[tuple[int, ...], tuple[int, ...]]], ...] = (
    ("--xla_cpu_experimental_ynn_fusion_type", "-individual_convolution",
     ((0, 10, 0), (0, 12, 0))),
)


def _jaxlib_version() -> tuple[int, ...]:
  try:
    import jaxlib.version  # pylint: disable=import-outside-toplevel
    text = jaxlib.version.__version__
  except Exception:  # pragma: no cover - jaxlib missing or odd
    return (0,)
  parts = []
  for piece in text.split(".")[:3]:
    digits = "".join(ch for ch in piece if ch.isdigit())
    parts.append(int(digits) if digits else 0)
  return tuple(parts)


def recommended_cpu_flags(jaxlib_version: Sequence[int] | None = None) -> tuple[str, ...]:
  """The recommended XLA:CPU flags for the installed (or given) jaxlib version.

  Args:
    jaxlib_version: e.g. ``(0, 10, 2)``; default: the installed jaxlib.

  Returns:
    A tuple of ``--name=value`` strings (empty when no flag applies to that version).
  """
  version = tuple(jaxlib_version) if jaxlib_version is not None else _jaxlib_version()
  return tuple(f"{name}={value}" for name, value, (lo, hi) in _CPU_FLAGS
               if lo <= version < hi)


def with_recommended_cpu_flags(xla_flags: str | None,
                               jaxlib_version: Sequence[int] | None = None) -> str:
  """``xla_flags`` (the current ``XLA_FLAGS`` value, or None) plus the recommended flags.

  A recommended flag whose name already appears in ``xla_flags`` is left out, so a
  user's explicit setting wins.  The result is meant for ``os.environ["XLA_FLAGS"]``.
  """
  flags = (xla_flags or "").split()
  present = {f.split("=", 1)[0] for f in flags}
  extra = [f for f in recommended_cpu_flags(jaxlib_version)
           if f.split("=", 1)[0] not in present]
  return " ".join(flags + extra)


def backend_started() -> bool:
  """Whether JAX has already created its backends (then ``XLA_FLAGS`` is fixed)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # pragma: no cover - private API moved
    return False


def install_on_import() -> str:
  """Add the recommended flags to ``XLA_FLAGS`` if JAX's backend has not started yet.

  Called by ``import jaxdefense``.  Returns what happened: ``"installed"``,
  ``"present"`` (every recommended flag name already in ``XLA_FLAGS``), ``"none"`` (no
  flag applies to this jaxlib), ``"opted out"`` (:data:`OPT_OUT_ENV` set), or
  ``"too late"`` (the backend had started; a ``UserWarning`` says how to fix it when it
  runs on the CPU).
  """
  if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
    return "opted out"
  wanted = recommended_cpu_flags()
  if not wanted:
    return "none"
  current = os.environ.get("XLA_FLAGS")
  merged = with_recommended_cpu_flags(current)
  if merged == " ".join((current or "").split()):
    return "present"
  if not backend_started():
    os.environ["XLA_FLAGS"] = merged
    return "installed"
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "cpu":
    warnings.warn(
        "jaxdefense was imported after JAX started its CPU backend, so the recommended "
        f"XLA:CPU flags ({' '.join(wanted)}) are not active and training and attacks run "
        "up to 3x slower. Import jaxdefense before creating any JAX array, or start "
        f"Python with XLA_FLAGS='{merged}'. Set {OPT_OUT_ENV}=1 to silence this.",
        UserWarning, stacklevel=2)
  return "too late"
