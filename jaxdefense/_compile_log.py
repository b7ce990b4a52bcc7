"""Where the time to a first result goes: JAX's compile events, summed per process.

JAX reports the duration of every tracing, MLIR lowering and XLA compilation, and of every
persistent-cache retrieval, through :mod:`jax.monitoring`.  :class:`CompileLog` listens
to them (listeners cannot be removed one by one, so a log stays registered for the life
of the process and only counts while it is active).  Used by
``benchmarks/compile_time.py`` and by the test suite's compile report
(``JAXDEFENSE_COMPILE_REPORT=DIR python -m pytest``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from jax import monitoring

__all__ = ["CompileLog", "EVENTS"]

#: The duration events summed, under short names.
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load_s",
}
_COUNTS = {
    "/jax/compilation_cache/cache_hits": "cache_hits",
    "/jax/compilation_cache/cache_misses": "cache_misses",
}


@dataclasses.dataclass
class CompileLog:
  """Sums of JAX's compile-event durations while active (a context manager).

  ``trace_s`` (Python tracing to a jaxpr), ``lower_s`` (jaxpr to MLIR), ``compile_s``
  (XLA backend compiles; a persistent-cache hit still reports a short one),
  ``cache_load_s`` (reading executables from the persistent cache), ``compiles`` (number
  of backend compile events), ``cache_hits`` / ``cache_misses`` (persistent cache), and
  ``wall_s`` (time inside the ``with`` block).
  """
  trace_s: float = 0.0
  lower_s: float = 0.0
  compile_s: float = 0.0
  cache_load_s: float = 0.0
  compiles: int = 0
  cache_hits: int = 0
  cache_misses: int = 0
  wall_s: float = 0.0

  def __post_init__(self):
    self._active = False
    self._lock = threading.Lock()
    self._start = 0.0
    monitoring.register_event_duration_secs_listener(self._on_duration)
    monitoring.register_event_listener(self._on_event)

  def _on_duration(self, event: str, duration: float, **_: Any) -> None:
    name = EVENTS.get(event)
    if name is None or not self._active:
      return
    with self._lock:
      setattr(self, name, getattr(self, name) + float(duration))
      if name == "compile_s":
        self.compiles += 1

  def _on_event(self, event: str, **_: Any) -> None:
    name = _COUNTS.get(event)
    if name is None or not self._active:
      return
    with self._lock:
      setattr(self, name, getattr(self, name) + 1)

  @property
  def total_s(self) -> float:
    """Seconds spent making executables: tracing + lowering + compiling + cache loads."""
    return self.trace_s + self.lower_s + self.compile_s + self.cache_load_s

  def start(self) -> "CompileLog":
    self._active = True
    self._start = time.perf_counter()
    return self

  def stop(self) -> "CompileLog":
    if self._active:
      self.wall_s += time.perf_counter() - self._start
    self._active = False
    return self

  def __enter__(self) -> "CompileLog":
    return self.start()

  def __exit__(self, *exc: Any) -> None:
    self.stop()

  def as_dict(self) -> dict[str, float]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["total_s"] = self.total_s
    return out
