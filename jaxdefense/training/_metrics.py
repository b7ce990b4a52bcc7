"""Metrics of a run: JSON lines in the workdir and readable tables."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["MetricsWriter", "format_table", "read_metrics"]


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
  """Every record of a ``metrics.jsonl`` file (a partial last line is skipped)."""
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 title: str | None = None, percent: Iterable[str] = ("accuracy",),
                 formats: Mapping[str, str] | None = None) -> str:
  """A plain-text table with aligned columns (text left, numbers right).

  Args:
    rows: one mapping per row.
    columns: column keys in order (default: keys of the first row, then new ones).
    title: an optional first line.
    percent: columns whose fractions are shown as percentages.
    formats: per-column format strings, e.g. ``{"seconds": "{:.1f}"}`` (floats
      otherwise get 4 decimals).

  Returns:
    The table as one string (no trailing newline).
  """
  if columns is None:
    columns = []
    for r in rows:
      columns.extend(k for k in r if k not in columns)
  percent = set(percent)
  formats = dict(formats or {})
  cells = []
  for r in rows:
    line = []
    for c in columns:
      v = r.get(c)
      if c in formats and v is not None:
        line.append(formats[c].format(v))
      elif c in percent and isinstance(v, (int, float)) and not isinstance(v, bool):
        line.append(f"{100 * v:.2f} %")
      else:
        line.append(_cell(v))
    cells.append(line)
  numeric = [all(isinstance(r.get(c), (int, float)) for r in rows if r.get(c) is not None)
             for c in columns]
  widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

  def fmt(values):
    parts = []
    for v, w, num in zip(values, widths, numeric):
      parts.append(v.rjust(w) if num else v.ljust(w))
    return "  ".join(parts).rstrip()

  out = []
  if title:
    out.append(title)
  head = fmt(columns)
  out.append(head)
  out.append("-" * len(head))
  out.extend(fmt(line) for line in cells)
  return "\n".join(out)
