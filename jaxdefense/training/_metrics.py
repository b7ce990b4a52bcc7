"""Metrics of a run: JSON lines in the workdir and readable tables."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["MetricsWriter", "read_metrics"]


def _jsonable(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    return _jsonable(value.item())
  return value


class MetricsWriter:
  """Appends one JSON object per line to ``path`` (``metrics.jsonl``).

  On a resumed run, pass ``resume_step``: records of steps after it (written by the
  interrupted run after its last checkpoint) are dropped first, so the file reads as
  one uninterrupted run.

  Args:
    path: the JSON-lines file.
    resume_step: the step the run restarts from, or ``None`` for a fresh file.
    enabled: False turns every call into a no-op (non-zero processes of a multi-host
      job).
  """

  def __init__(self, path: str | os.PathLike, resume_step: int | None = None,
               enabled: bool = True):
    self.path = pathlib.Path(path)
    self.enabled = enabled
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is None:
      self.path.write_text("")
    elif self.path.exists():
      kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
      os.replace(tmp, self.path)

  def write(self, record: Mapping[str, Any]) -> None:
    """Append ``record`` (non-finite floats are written as strings)."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Every record of a ``metrics.jsonl`` file, in file order.

  A line that is not valid JSON (the partial last line of a run killed mid-write, or an
  empty line) is skipped silently, wherever it is.  Non-finite floats come back as the
  strings :class:`MetricsWriter` wrote (``"nan"``, ``"inf"``).

  Args:
    path: the JSON-lines file, e.g. ``workdir / training.METRICS_FILE``.

  Returns:
    A list of dicts (one per record; ``[]`` for an empty file).

  Raises:
    FileNotFoundError: ``path`` does not exist.
  """
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def train_seconds(workdir: str | os.PathLike) -> float:
  """Seconds a run spent in training steps, from its ``metrics.jsonl`` step rates.

  Sums ``(steps since the previous record) / steps_per_second`` over the training
  records, so compilation, evaluation and checkpoint time are left out and a resumed
  run counts each step once.

  Args:
    workdir: the run's folder.

  Returns:
    The seconds (``0.0`` when the run has no metrics yet).
  """
  path = os.path.join(os.fspath(workdir), "metrics.jsonl")
  if not os.path.exists(path):
    return 0.0
  total, last = 0.0, 0
  for r in read_metrics(path):
    if r.get("kind") == "train" and r.get("steps_per_second"):
      total += (r["step"] - last) / r["steps_per_second"]
      last = r["step"]
  return total
