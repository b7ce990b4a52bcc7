"""Ground-floor table formatting: aligned plain-text tables for every report and CLI."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

__all__ = ["format_table"]


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
