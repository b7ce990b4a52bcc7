"""The experiment runner: a study is a grid of config overrides x seeds.

A :class:`Study` names its cells (each a set of config overrides on one base config,
or an evaluation that combines other cells), the seeds, and the function that runs a
cell (typically ``jaxdefense.training.train_and_evaluate(config, workdir)`` and an
evaluation returning a dict of metrics).  :func:`run_study` runs or resumes the grid:

* a cell recorded as ``"done"`` in the results file is skipped;
* any other cell is (re)started in its run folder, where a half-trained run resumes from
  its checkpoint (``train_and_evaluate`` resumes by itself);
* one cell per process works too (``--cell NAME --seed S`` or ``--index I``, e.g. a
  cluster job array's task id): processes update the one results file under a file
  lock, each write being an atomic replace.

Each cell's record holds the git commit (and whether the tree was dirty), the command
that recomputes the cell, the invocation that produced it, the full resolved config,
the metrics, timings, the machine (platform, JAX backend and devices) and a status.
:func:`write_report` turns the results into a markdown report (the study's own
sections, the provenance of every cell and the command that rebuilds the report), with
the statistics of :mod:`jaxdefense.evaluation._stats`.

Results file (``DIR/results.json``)::

  {"format": "jaxdefense-study/1",
   "study": {"name", "title", "spec", "object", "base", "seeds", "cells": {...}},
   "cells": [{"cell", "seed", "status", "commit", "dirty", "command", "argv",
              "config", "overrides", "metrics", "timings", "machine", "workdir",
              "started", "finished", "attempts", ...}, ...],
   ... (other top-level keys are kept as they are)}
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from jaxdefense.evaluation import _stats

__all__ = ["Cell", "CellContext", "FORMAT", "Results", "Study", "git_info", "load_results",
           "load_study", "machine_info", "main", "markdown_table", "render_report",
           "run_study", "write_report"]

FORMAT = "jaxdefense-study/1"
RESULTS_FILE = "results.json"
STATUSES = ("running", "done", "failed")


# ------------------------------------------------------------------ the spec
def _check_seeds(seeds: Any, owner: str) -> tuple[int, ...]:
  """``seeds`` as a non-empty tuple of distinct ints; ValueError/TypeError naming ``owner``."""
  if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
    raise TypeError(f"{owner}: seeds must be a sequence of integers; got {seeds!r}.")
  seeds = tuple(seeds)
  if not seeds:
    raise ValueError(f"{owner}: seeds must not be empty.")
  for s in seeds:
    if isinstance(s, bool) or not isinstance(s, int):
      raise TypeError(f"{owner}: seeds must be integers; got {s!r}.")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"{owner}: seeds must be distinct; got {seeds}.")
  return seeds


@dataclasses.dataclass(frozen=True)
class Cell:
  """One named configuration of a study (run once per seed).

  Attributes:
    name: a non-empty name without white space or ``/`` (used in folder names).
    overrides: config overrides ``{"key.sub": value}`` applied to the study's base
      config (default none).
    needs: names of cells that must be done (for the same seed) before this one runs,
      e.g. an attack transferred between two trained cells (default none).
    needs_all_seeds: the cells in ``needs`` must be done for EVERY one of their seeds
      (not only this cell's seed), e.g. an ensemble over independently trained runs
      (default ``False``).
    run: this cell's own function ``fn(ctx) -> metrics`` (default: the study's).
    description: a human label for tables (default: the name).
    info: free study-specific data for the cell functions and the report.
    seeds: the seeds this cell runs with (default ``None``: the study's seeds), e.g.
      fewer seeds for secondary variants, or one seed for a cell that combines runs.

  Raises:
    ValueError / TypeError: a bad name, overrides that are not a mapping with string
      keys, a ``run`` that is not callable, or bad ``seeds`` (empty, duplicates,
      non-integers).
  """
  name: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  needs: tuple[str, ...] = ()
  run: Callable[["CellContext"], Mapping[str, Any]] | None = None
  description: str = ""
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  seeds: tuple[int, ...] | None = None
  needs_all_seeds: bool = False

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name or any(
        c.isspace() or c in "/\\" for c in self.name):
      raise ValueError(f"Cell name must be a non-empty word without '/' or spaces; "
                       f"got {self.name!r}.")
    if not isinstance(self.overrides, Mapping) or not all(
        isinstance(k, str) for k in self.overrides):
      raise TypeError(f"Cell {self.name!r}: overrides must be a mapping of 'key.sub' "
                      f"strings to values; got {self.overrides!r}.")
    object.__setattr__(self, "needs", tuple(self.needs))
    if self.run is not None and not callable(self.run):
      raise TypeError(f"Cell {self.name!r}: run must be callable; got {self.run!r}.")
    if self.seeds is not None:
      object.__setattr__(self, "seeds", _check_seeds(self.seeds, f"Cell {self.name!r}"))

  @property
  def label(self) -> str:
    """``description`` or, without one, ``name``."""
    return self.description or self.name


@dataclasses.dataclass
class CellContext:
  """What a cell function receives.

  Attributes:
    study: the :class:`Study`.
    cell: the :class:`Cell`.
    seed: the seed (already written into ``config.seed`` when the config has one).
    config: the resolved config (base + cell overrides + seed).
    workdir: this cell's run folder (created; a half-done run there resumes).
    runs_dir: the folder of every run of the study.
    results: the results recorded so far (:class:`Results`), e.g. for ``needs`` cells.
  """
  study: "Study"
  cell: Cell
  seed: int
  config: Any
  workdir: str
  runs_dir: str
  results: "Results"

  def workdir_of(self, name: str, seed: int | None = None) -> str:
    """The run folder of cell ``name`` for ``seed`` (default: this cell's seed)."""
    return self.study.workdir(self.runs_dir, name, self.seed if seed is None else seed)


class Study:
  """A grid of named config overrides x seeds, with its cell and report functions.

  Args:
    name: short name (folder names, messages).
    base: the base config: a preset name or ``.py`` path understood by
      :func:`jaxdefense.configs.get` (a relative path is taken from ``root``), or a
      callable ``fn(overrides: dict) -> ConfigDict`` for configs outside the library's
      schema.
    cells: the :class:`Cell` s, or a mapping ``{name: overrides}``; run in this order
      (a cell's ``needs`` must come before it).
    seeds: the seeds (default ``(0,)``); the config field ``seed`` is set to each.
    run: default cell function ``fn(ctx: CellContext) -> dict`` of metrics (JSON
      values); a ``"timings"`` entry (a dict) is recorded beside the metrics.
    report: ``fn(results: Results, out_dir: str) -> list[str]``: the study's markdown
      sections (and plots written into ``out_dir``); default: one table of every
      numeric metric with standard errors over seeds. The report then gets a
      ``## Statistics`` section on the default tests (z-test, Welch) unless these lines
      hold their own ``## Statistics`` heading.
    title: the report's title (default ``name``).
    spec: the file that defines the study (pass ``__file__``); it goes into the
      results so that ``jaxdefense report DIR`` finds the report code, and into the
      commands (``python SPEC --cell NAME --seed S``).
    object_name: the module attribute (or zero-argument function) holding the study in
      ``spec`` (default ``"STUDY"``).
    command_args: arguments of ``spec`` placed before ``--cell`` in every command
      (e.g. ``("--quick",)``).
    results_dir: default folder of ``results.json`` and the report.
    runs_dir: default folder of the runs (``RUNS/CELL/seedS``).
    root: the repository root for relative paths (default: the git top level of
      ``spec``'s folder, else the current folder).

  Raises:
    ValueError / TypeError: duplicate or unknown cell names, a ``needs`` cell listed
      after its user, no seeds, a non-integer seed, or a non-callable function.
  """

  def __init__(self, name: str, base: str | os.PathLike | Callable[[dict], Any],
               cells: Sequence[Cell] | Mapping[str, Mapping[str, Any]], *,
               seeds: Sequence[int] = (0,),
               run: Callable[[CellContext], Mapping[str, Any]] | None = None,
               report: Callable[["Results", str], list[str]] | None = None,
               title: str | None = None, spec: str | os.PathLike | None = None,
               object_name: str = "STUDY", command_args: Sequence[str] = (),
               results_dir: str | os.PathLike | None = None,
               runs_dir: str | os.PathLike | None = None,
               root: str | os.PathLike | None = None):
    if not isinstance(name, str) or not name:
      raise ValueError(f"Study name must be a non-empty string; got {name!r}.")
    if not (isinstance(base, (str, os.PathLike)) or callable(base)):
      raise TypeError(f"Study {name!r}: base must be a config name, a path or a callable; "
                      f"got {base!r}.")
    if isinstance(cells, Mapping):
      cells = [Cell(k, v) for k, v in cells.items()]
    cells = list(cells)
    if not cells:
      raise ValueError(f"Study {name!r}: no cells.")
    seen: set[str] = set()
    for c in cells:
      if not isinstance(c, Cell):
        raise TypeError(f"Study {name!r}: cells must be Cell objects; got {c!r}.")
      if c.name in seen:
        raise ValueError(f"Study {name!r}: duplicate cell name {c.name!r}.")
      for n in c.needs:
        if n not in seen:
          raise ValueError(f"Study {name!r}: cell {c.name!r} needs {n!r}, which is not a "
                           "cell listed before it.")
      seen.add(c.name)
    seeds = _check_seeds(seeds, f"Study {name!r}")
    for label, fn in (("run", run), ("report", report)):
      if fn is not None and not callable(fn):
        raise TypeError(f"Study {name!r}: {label} must be callable; got {fn!r}.")
    if run is None and any(c.run is None for c in cells):
      raise ValueError(f"Study {name!r}: no run function for cells "
                       f"{[c.name for c in cells if c.run is None]}.")
    self.name, self.base, self.cells = name, base, cells
    self.seeds, self.run_fn, self.report_fn = seeds, run, report
    self.title = title or name
    self.object_name = object_name
    self.command_args = tuple(command_args)
    spec_path = pathlib.Path(spec).resolve() if spec is not None else None
    if root is None:
      root = _git_root(spec_path.parent if spec_path else pathlib.Path.cwd())
    self.root = pathlib.Path(root).resolve()
    self.spec = _relative(spec_path, self.root) if spec_path else None
    self.results_dir = str(results_dir) if results_dir is not None else None
    self.runs_dir = str(runs_dir) if runs_dir is not None else os.path.join(
        str(self.root), "workdirs", name)

  @classmethod
  def for_script(cls, name: str, base: str | os.PathLike | Callable[[dict], Any],
                 cells: Sequence[Cell] | Mapping[str, Mapping[str, Any]], *,
                 spec: str | os.PathLike, results: str, quick: bool = False,
                 **kwargs: Any) -> "Study":
    """A study defined in an experiment script, laid out as the project's scripts are.

    The full study is the script's ``STUDY`` and writes ``results.json`` and its report
    to ``results`` (a folder relative to the script's own).  The quick smoke version
    (``quick=True``, built by the script's ``make_study(quick=True)``) is its
    ``QUICK_STUDY``: its commands carry ``--quick`` and it writes under
    ``ROOT/workdirs/NAME/report``, never beside the real results.  Runs go to
    ``ROOT/workdirs/NAME`` in both cases.

    Args:
      name, base, cells: as for :class:`Study`.
      spec: the script (pass ``__file__``).
      results: the full study's results folder, relative to the script's folder.
      quick: build the quick version.
      **kwargs: any other :class:`Study` argument (``seeds``, ``run``, ``report``,
        ``title``, ``root``).

    Raises:
      TypeError: ``object_name``, ``command_args``, ``results_dir`` or ``runs_dir``
        among ``kwargs`` (this layout sets them); and :class:`Study`'s own errors.
    """
    for fixed in ("object_name", "command_args", "results_dir", "runs_dir"):
      if fixed in kwargs:
        raise TypeError(f"Study.for_script sets {fixed} itself; use Study(...) to choose "
                        "it.")
    study = cls(name, base, cells, spec=spec,
                object_name="QUICK_STUDY" if quick else "STUDY",
                command_args=("--quick",) if quick else (), **kwargs)
    study.results_dir = (os.path.join(study.runs_dir, "report") if quick else
                         os.path.join(os.path.dirname(os.path.abspath(spec)), results))
    return study

  # -- grid
  def cell(self, name: str) -> Cell:
    """The cell called ``name``; ValueError listing the names when there is none."""
    for c in self.cells:
      if c.name == name:
        return c
    raise ValueError(f"Study {self.name!r}: unknown cell {name!r}; expected one of "
                     f"{', '.join(c.name for c in self.cells)}.")

  def seeds_of(self, cell: Cell | str) -> tuple[int, ...]:
    """The seeds ``cell`` runs with: its own ``seeds``, else the study's."""
    c = cell if isinstance(cell, Cell) else self.cell(cell)
    return c.seeds if c.seeds is not None else self.seeds

  def all_seeds(self) -> tuple[int, ...]:
    """Every seed of the grid, sorted."""
    return tuple(sorted({s for c in self.cells for s in self.seeds_of(c)}))

  def grid(self) -> list[tuple[Cell, int]]:
    """Every ``(cell, seed)`` in run order: cells in order, each with its seeds."""
    return [(c, s) for c in self.cells for s in self.seeds_of(c)]

  def missing_needs(self, res: "Results", cell: Cell, seed: int) -> list[str]:
    """``needs`` of ``cell`` at ``seed`` not done yet (``name`` or ``name seed S``)."""
    if not cell.needs_all_seeds:
      return [n for n in cell.needs if not res.done(n, seed)]
    return [f"{n} seed {s}" for n in cell.needs for s in self.seeds_of(n)
            if not res.done(n, s)]

  def at_index(self, index: int) -> tuple[Cell, int]:
    """The ``index``-th entry of :meth:`grid` (a job array's task id); ValueError if out
    of range."""
    grid = self.grid()
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(grid):
      raise ValueError(f"index must be an integer in [0, {len(grid) - 1}] for study "
                       f"{self.name!r} ({len(grid)} (cell, seed) pairs); "
                       f"got {index!r}.")
    return grid[index]

  def workdir(self, runs_dir: str, name: str, seed: int) -> str:
    """The run folder of cell ``name`` at ``seed``: ``RUNS/NAME/seedS``."""
    return os.path.join(runs_dir, name, f"seed{seed}")

  def config(self, cell: Cell | str, seed: int) -> Any:
    """The resolved config of ``cell`` at ``seed`` (base + overrides + ``seed``)."""
    cell = self.cell(cell) if isinstance(cell, str) else cell
    overrides = dict(cell.overrides)
    overrides.setdefault("seed", seed)
    if callable(self.base):
      return self.base(overrides)
    from jaxdefense import configs  # the configs layer sits below; imported lazily
    base = os.fspath(self.base)
    path, _, _ = base.partition(":")
    if path.endswith(".py") and not os.path.isabs(path):
      base = os.path.join(str(self.root), base)
    return configs.get(base, overrides)

  def command(self, cell: Cell | str, seed: int) -> str:
    """The shell command that recomputes ``cell`` at ``seed`` from the repository root
    (``--force``: a cell already recorded is run again and its record replaced)."""
    name = cell.name if isinstance(cell, Cell) else cell
    spec = self.spec or "SPEC.py"
    return shlex.join(["python", spec, *self.command_args, "--cell", name,
                       "--seed", str(seed), "--force"])

  def describe(self) -> dict:
    """The study as JSON (what the results file keeps of it)."""
    base = self.base if isinstance(self.base, (str, os.PathLike)) else getattr(
        self.base, "__qualname__", repr(self.base))
    return {"name": self.name, "title": self.title, "spec": self.spec,
            "object": self.object_name, "command_args": list(self.command_args),
            "base": os.fspath(base) if isinstance(base, os.PathLike) else base,
            "seeds": list(self.seeds),
            "cells": {c.name: {"overrides": _jsonable(dict(c.overrides)),
                               "needs": list(c.needs), "description": c.label,
                               **({"seeds": list(c.seeds)} if c.seeds is not None else {}),
                               **({"needs_all_seeds": True} if c.needs_all_seeds else {})}
                      for c in self.cells}}


# ------------------------------------------------------------------ results
class Results:
  """The records of a study's results file.

  Attributes:
    path: the ``results.json`` path.
    data: the whole file as a dict (``study``, ``cells`` and any other keys).
  """

  def __init__(self, path: str, data: Mapping[str, Any]):
    self.path = str(path)
    self.data = dict(data)
    self.data.setdefault("format", FORMAT)
    self.data.setdefault("cells", [])

  @property
  def study(self) -> dict:
    """The study description stored in the file (``{}`` when none)."""
    return self.data.get("study") or {}

  @property
  def records(self) -> list[dict]:
    """Every cell record, in file order."""
    return self.data["cells"]

  def record(self, cell: str, seed: int) -> dict | None:
    """The record of ``(cell, seed)``, or ``None``."""
    for r in self.records:
      if r.get("cell") == cell and r.get("seed") == seed:
        return r
    return None

  def done(self, cell: str, seed: int) -> bool:
    """Whether ``(cell, seed)`` is recorded with status ``"done"``."""
    r = self.record(cell, seed)
    return r is not None and r.get("status") == "done"

  def cells(self) -> list[str]:
    """Names of the recorded cells, in first-seen order."""
    out: list[str] = []
    for r in self.records:
      if r.get("cell") not in out:
        out.append(r.get("cell"))
    return out

  def seeds(self, cell: str) -> list[int]:
    """The seeds of ``cell`` that are done."""
    return [r["seed"] for r in self.records if r.get("cell") == cell
            and r.get("status") == "done"]

  def has(self, cell: str, metric: str | None = None) -> bool:
    """Whether ``cell`` is done for some seed (and has ``metric``, a dotted path)."""
    return bool(self.values(cell, metric)) if metric else bool(self.seeds(cell))

  def metrics(self, cell: str, seed: int | None = None) -> dict:
    """The metrics of ``cell`` at ``seed`` (default: its first done seed); ``{}`` if
    not done."""
    for r in self.records:
      if r.get("cell") == cell and r.get("status") == "done" and (
          seed is None or r.get("seed") == seed):
        return r.get("metrics") or {}
    return {}

  def values(self, cell: str, metric: str, seeds: Iterable[int] | None = None
             ) -> list[float]:
    """``metric`` (a dotted path, e.g. ``"attacks.ifgsm"``) of ``cell`` per done seed,
    in seed order; seeds where it is missing are left out."""
    wanted = None if seeds is None else set(seeds)
    out = []
    for r in sorted((r for r in self.records if r.get("cell") == cell
                     and r.get("status") == "done"), key=lambda r: r.get("seed", 0)):
      if wanted is not None and r.get("seed") not in wanted:
        continue
      v = _lookup(r.get("metrics") or {}, metric)
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        out.append(float(v))
    return out

  def estimate(self, cell: str, metric: str, n: int | str | None = None
               ) -> _stats.Estimate:
    """Mean and standard error of ``metric`` over the done seeds of ``cell``.

    Args:
      n: test images behind one value (for the binomial error of a single seed), or
        the dotted path of a metric holding it (e.g. ``"n"``).
    """
    return _stats.estimate(self.values(cell, metric), self._n(cell, n))

  def compare(self, a: tuple[str, str], b: tuple[str, str], relation: str = ">", *,
              n: int | str | None = None, alpha: float = 0.05, margin: float = 0.0,
              common_seeds: bool = True) -> _stats.Comparison:
    """Decide "``a`` ``relation`` ``b``" for ``(cell, metric)`` pairs.

    One seed each: two-sided two-proportion z-test on ``n`` images (a number or the
    metric holding it); several seeds each: Welch's t-test; one against several (e.g.
    an ensemble cell against its members): a normal test.  See
    :func:`jaxdefense.evaluation._stats.compare`.

    Args:
      common_seeds: use only the seeds both cells have (default); ``False``: every done
        seed of each cell (cells with different seed sets, e.g. a one-seed ensemble).

    Raises:
      ValueError: a side without values, or as ``_stats.compare``.
    """
    common = (set(self.seeds(a[0])) & set(self.seeds(b[0]))) if common_seeds else None
    av, bv = self.values(*a, seeds=common), self.values(*b, seeds=common)
    if not av or not bv:
      raise ValueError(f"compare: no values for {a if not av else b} on a common seed.")
    return _stats.compare(av, bv, relation, n=self._n(a[0], n), n_b=self._n(b[0], n),
                          alpha=alpha, margin=margin)

  def _n(self, cell: str, n: int | str | None) -> int | None:
    if isinstance(n, str):
      v = _lookup(self.metrics(cell), n)
      return int(v) if isinstance(v, (int, float)) else None
    return n


def _lookup(d: Mapping[str, Any], path: str) -> Any:
  """``d[a][b][c]`` for the dotted ``path`` ``"a.b.c"``; a key that itself holds dots
  (e.g. an eps value ``"0.02"`` in ``"curve.0.02"``) is matched whole, longest first.
  ``None`` when nothing matches."""
  if not isinstance(d, Mapping):
    return None
  if path in d:
    return d[path]
  parts = path.split(".")
  for i in range(len(parts) - 1, 0, -1):
    head = ".".join(parts[:i])
    if head in d:
      found = _lookup(d[head], ".".join(parts[i:]))
      if found is not None:
        return found
  return None


def load_results(path: str | os.PathLike) -> Results:
  """Read a study's results (``DIR`` or ``DIR/results.json``).

  Returns:
    :class:`Results` (empty, with ``path`` set, when the file does not exist yet).

  Raises:
    ValueError: the file is not JSON or not a study results file (another format).
  """
  path = os.fspath(path)
  if os.path.isdir(path) or not path.endswith(".json"):
    path = os.path.join(path, RESULTS_FILE)
  if not os.path.exists(path):
    return Results(path, {"format": FORMAT, "cells": []})
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path!r} is not valid JSON: {e}") from None
  if not isinstance(data, dict) or data.get("format") != FORMAT:
    raise ValueError(f"{path!r} is not a study results file (expected \"format\": "
                     f"{FORMAT!r}; got {data.get('format') if isinstance(data, dict) else data!r}).")
  return Results(path, data)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  """An exclusive lock on ``path + ".lock"`` (POSIX record lock; released when the
  process dies)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".lock", "a+") as f:
    try:
      import fcntl
    except ImportError:  # not POSIX: one writer at a time is the user's business
      yield
      return
    fcntl.lockf(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.lockf(f, fcntl.LOCK_UN)


def _write_json(path: str, data: Any) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=str)
    f.write("\n")
  os.replace(tmp, path)


def _update(path: str, study: Study | None, record: dict) -> Results:
  """Put ``record`` (replacing the one of its cell and seed) into the file, locked."""
  with _locked(path):
    res = load_results(path)
    if study is not None:
      res.data["study"] = study.describe()
    cells = [r for r in res.records
             if not (r.get("cell") == record["cell"] and r.get("seed") == record["seed"])]
    cells.append(record)
    if study is not None:
      order = {(c.name, s): i for i, (c, s) in enumerate(study.grid())}
      cells.sort(key=lambda r: order.get((r.get("cell"), r.get("seed")), len(order)))
    res.data["cells"] = cells
    _write_json(res.path, _jsonable(res.data))
    return res


# ------------------------------------------------------------------ provenance
def _git_root(start: pathlib.Path) -> pathlib.Path:
  p = start.resolve()
  for q in (p, *p.parents):
    if (q / ".git").exists():
      return q
  return pathlib.Path.cwd().resolve()


def _relative(path: pathlib.Path, root: pathlib.Path) -> str:
  try:
    return path.resolve().relative_to(root).as_posix()
  except ValueError:
    return str(path)


def git_info(root: str | os.PathLike) -> dict:
  """``{"commit": sha or None, "dirty": bool or None}`` of the checkout at ``root``.

  ``dirty`` counts modified tracked files (untracked files are ignored).  Both are
  ``None`` when ``root`` is not a git checkout or git is not installed.
  """
  def git(*args):
    return subprocess.run(["git", "-C", os.fspath(root), *args], capture_output=True,
                          text=True, timeout=30)
  try:
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
      return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def machine_info() -> dict:
  """Platform, CPU count, Python and JAX versions, JAX backend and devices."""
  import jax
  return {"platform": platform.platform(), "machine": platform.machine(),
          "processor": platform.processor(), "cpu_count": os.cpu_count(),
          "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count()}


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=_default))


def _default(x: Any) -> Any:
  if hasattr(x, "to_dict"):
    return x.to_dict()
  if hasattr(x, "tolist"):
    return x.tolist()
  if isinstance(x, (set, frozenset)):
    return sorted(x)
  return str(x)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ running
def run_study(study: Study, *, cells: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None, index: int | None = None,
              results_dir: str | os.PathLike | None = None,
              runs_dir: str | os.PathLike | None = None, force: bool = False,
              keep_going: bool = False, argv: Sequence[str] | None = None,
              log: Callable[[str], None] = print) -> Results:
  """Run or resume a study: every cell not recorded as done (or the chosen ones).

  Args:
    study: the :class:`Study`.
    cells: run only these cells (default all).
    seeds: run only these seeds (default all of the study's).
    index: run only ``study.grid()[index]`` (a job array's task id); not with
      ``cells``/``seeds``.
    results_dir: folder of ``results.json`` (default ``study.results_dir``).
    runs_dir: folder of the runs (default ``study.runs_dir``).
    force: run chosen cells even when they are recorded as done.
    keep_going: after a failed cell (recorded as ``"failed"`` with its error), go on
      with the others and raise at the end; default: raise at once.
    argv: the invocation recorded as ``argv`` (default ``sys.argv``).
    log: progress messages (default ``print``).

  Returns:
    The :class:`Results` after the run.

  Raises:
    ValueError: unknown cells or seeds, a bad index, no results folder, or a cell
      whose ``needs`` are not done.
    RuntimeError: with ``keep_going``, the cells that failed.
    Exception: without ``keep_going``, whatever a cell raised (after recording it).
  """
  results_dir = results_dir if results_dir is not None else study.results_dir
  if results_dir is None:
    raise ValueError(f"run_study: no results_dir given and study {study.name!r} has none.")
  results_dir = os.fspath(results_dir)
  runs_dir = os.fspath(runs_dir) if runs_dir is not None else study.runs_dir
  path = os.path.join(results_dir, RESULTS_FILE)
  if index is not None:
    if cells is not None or seeds is not None:
      raise ValueError("run_study: give index, or cells/seeds, not both.")
    todo = [study.at_index(index)]
  else:
    chosen = [study.cell(n) for n in cells] if cells is not None else study.cells
    for s in seeds or ():
      if s not in study.all_seeds():
        raise ValueError(f"seed {s!r} is not one of study {study.name!r}'s seeds "
                         f"{list(study.all_seeds())}.")
    use_seeds = tuple(seeds) if seeds is not None else study.all_seeds()
    names = {c.name for c in chosen}
    todo = [(c, s) for c, s in study.grid() if c.name in names and s in use_seeds]
  explicit = index is not None or cells is not None
  invocation = shlex.join(list(sys.argv if argv is None else argv))
  provenance = git_info(study.root)
  machine = machine_info()
  failed = []
  res = load_results(path)
  for cell, seed in todo:
    res = load_results(path)
    if res.done(cell.name, seed) and not force:
      log(f"== {cell.name} seed {seed}: done, skipped")
      continue
    missing = study.missing_needs(res, cell, seed)
    if missing:
      first, _, first_seed = missing[0].partition(" seed ")
      msg = (f"cell {cell.name!r} (seed {seed}) needs {missing} done first; run them "
             f"(e.g. {study.command(first, int(first_seed) if first_seed else seed)}).")
      if explicit or not keep_going:
        raise ValueError(msg)
      log("== " + msg)
      failed.append((cell.name, seed, msg))
      continue
    workdir = study.workdir(runs_dir, cell.name, seed)
    os.makedirs(workdir, exist_ok=True)
    config = study.config(cell, seed)
    previous = res.record(cell.name, seed) or {}
    record = {"cell": cell.name, "seed": seed, "status": "running", **provenance,
              "command": study.command(cell, seed), "argv": invocation,
              "overrides": _jsonable(dict(cell.overrides)), "config": _jsonable(config),
              "workdir": _relative(pathlib.Path(workdir), study.root),
              "machine": machine, "started": _now(),
              "attempts": int(previous.get("attempts", 0)) + 1}
    _update(path, study, record)
    log(f"== {cell.name} seed {seed}: {cell.label} ({workdir})")
    t0, c0 = time.time(), time.process_time()
    ctx = CellContext(study, cell, seed, config, workdir, runs_dir, res)
    try:
      metrics = dict((cell.run or study.run_fn)(ctx) or {})
    except Exception as e:  # recorded, then raised or collected
      record.update(status="failed", finished=_now(),
                    error="".join(traceback.format_exception_only(type(e), e)).strip(),
                    timings={"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0})
      _update(path, study, record)
      if not keep_going:
        raise
      log(f"== {cell.name} seed {seed}: FAILED: {record['error']}")
      failed.append((cell.name, seed, record["error"]))
      continue
    timings = dict(metrics.pop("timings", None) or {})
    timings.update(wall_s=time.time() - t0, cpu_s=time.process_time() - c0)
    record.update(status="done", finished=_now(), metrics=_jsonable(metrics),
                  timings=_jsonable(timings))
    res = _update(path, study, record)
  if failed:
    raise RuntimeError(f"study {study.name!r}: {len(failed)} cell(s) failed: " +
                       "; ".join(f"{c} seed {s}: {m}" for c, s, m in failed))
  return load_results(path)


# ------------------------------------------------------------------ report
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: str | None = None) -> list[str]:
  """A markdown table as lines.

  Args:
    headers: column titles.
    rows: one sequence of cells per row (``None`` shows as ``–``; others with ``str``).
    align: one character per column, ``l`` or ``r`` (default: all ``---``).

  Returns:
    The lines (header, rule, rows).

  Raises:
    ValueError: a row or ``align`` whose length differs from ``headers``.
  """
  headers = list(headers)
  if align is not None and (len(align) != len(headers) or set(align) - {"l", "r"}):
    raise ValueError(f"align must be one 'l' or 'r' per column ({len(headers)}); "
                     f"got {align!r}.")
  rule = ["---:" if a == "r" else "---" for a in align] if align else ["---"] * len(headers)
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
  for i, row in enumerate(rows):
    row = list(row)
    if len(row) != len(headers):
      raise ValueError(f"row {i} has {len(row)} cells, expected {len(headers)}: {row!r}.")
    lines.append("| " + " | ".join("–" if v is None else str(v) for v in row) + " |")
  return lines


def _numeric_paths(d: Mapping[str, Any], prefix: str = "") -> list[str]:
  out = []
  for k, v in d.items():
    p = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out += _numeric_paths(v, p + ".")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out.append(p)
  return out


def _default_report(results: Results, out_dir: str) -> list[str]:
  del out_dir
  cells = [c for c in results.cells() if results.has(c)]
  metrics: list[str] = []
  for c in cells:
    for r in results.records:
      if r.get("cell") == c and r.get("status") == "done":
        metrics += [m for m in _numeric_paths(r.get("metrics") or {}) if m not in metrics]
  lines = ["## Metrics", "", "Mean over the done seeds ± its standard error (sample std / "
           "sqrt(k) over k >= 2 seeds; one seed: no error shown unless the study gives "
           "the number of test images).", ""]
  rows = [[f"`{c}`", len(results.seeds(c))] + [
      results.estimate(c, m).format(scale=1.0, digits=4) if results.values(c, m) else None
      for m in metrics] for c in cells]
  return lines + markdown_table(["cell", "seeds", *metrics], rows)


def write_report(study: Study | None, results: Results | str | os.PathLike,
                 out_dir: str | os.PathLike | None = None) -> str:
  """Write ``report.md`` (and the study's plots) from a study's results.

  The report holds the study's own sections (``study.report``; without a study, a
  table of every numeric metric), the statistics used, a provenance table (commit,
  status, machine, time and the command that recomputes each cell) and the command
  that rebuilds the report from a clean checkout.

  Args:
    study: the :class:`Study` (or ``None`` for the generic report).
    results: :class:`Results` or the folder / path of ``results.json``.
    out_dir: where to write (default: the folder of ``results.json``).

  Returns:
    The path of ``report.md``.
  """
  if not isinstance(results, Results):
    results = load_results(results)
  out_dir = os.fspath(out_dir) if out_dir is not None else os.path.dirname(results.path)
  os.makedirs(out_dir, exist_ok=True)
  meta = results.study
  title = study.title if study is not None else meta.get("title") or meta.get("name", "study")
  root = study.root if study is not None else _git_root(pathlib.Path(out_dir))
  rel = _relative(pathlib.Path(out_dir), root)
  spec = (study.spec if study is not None else None) or meta.get("spec")
  args = list(study.command_args if study is not None else meta.get("command_args", []))
  lines = [f"# {title}", "",
           f"Rebuild this report from a clean checkout (no training; it reads "
           f"`{RESULTS_FILE}` beside it): `python -m jaxdefense report {shlex.quote(rel)}`."]
  if spec:
    lines.append(f"Run or resume every missing cell: `{shlex.join(['python', spec, *args])}`; "
                 "one cell: the command in the provenance table (one cell per process, "
                 "e.g. a job array: `--index $SLURM_ARRAY_TASK_ID`).")
  lines.append("")
  report_fn = study.report_fn if study is not None and study.report_fn else _default_report
  body = list(report_fn(results, out_dir))
  lines += body
  # a study whose tests differ from the default ones (paired tests, say) writes its own
  # "## Statistics" section; the generic paragraph would then contradict it
  own_statistics = any(str(line).strip() == "## Statistics" for line in body)
  lines += [] if own_statistics else ["", "## Statistics", "",
            "Accuracies carry standard errors: over test images sqrt(p (1 - p) / n) for one "
            "seed, sample std / sqrt(k) over k >= 2 seeds.  A claim \"A > B\" is decided "
            "by a two-sided test at alpha = 0.05 (one seed: the two-proportion z-test with "
            "the pooled proportion, which ignores that both models saw the same images and "
            "is therefore conservative; two or more seeds: Welch's t-test over seeds): "
            "**held** when the difference is significant in the claimed direction, **did "
            "not hold** when significant in the other, **inconclusive** otherwise."]
  lines += ["", "## Provenance", ""]
  rows = []
  for r in results.records:
    commit = (r.get("commit") or "?")[:10] + (" (dirty)" if r.get("dirty") else "")
    m = r.get("machine") or {}
    machine = m.get("summary") or ", ".join(
        str(x) for x in (m.get("machine"), m.get("backend"),
                         f"{m.get('cpu_count')} CPUs" if m.get("cpu_count") else None) if x)
    wall = (r.get("timings") or {}).get("wall_s")
    rows.append([f"`{r.get('cell')}`", r.get("seed"), r.get("status"), commit, machine or None,
                 None if wall is None else f"{wall / 60:.1f}",
                 f"`{r.get('command')}`" if r.get("command") else None])
  lines += markdown_table(["cell", "seed", "status", "commit", "machine", "wall min",
                           "recompute"], rows)
  imported = [r for r in results.records if r.get("imported")]
  if imported:
    lines += ["", "Cells marked with a commit but no wall time were imported from the "
              "results of an earlier driver (" + "; ".join(sorted({
                  r["imported"].get("from", "?") for r in imported})) + "): the commit is "
              "the one that first recorded their numbers, the command the one that "
              "recomputes them on this runner."]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines).rstrip("\n") + "\n")
  return path


def load_study(results: Results, root: str | os.PathLike | None = None) -> Study | None:
  """The :class:`Study` named by a results file (its ``spec`` file and ``object``).

  The spec path is taken relative to ``root`` (default: the git top level above the
  results file).  Returns ``None`` when the results name no spec.

  Raises:
    FileNotFoundError: the spec file does not exist.
    ValueError: it defines no such study object.
  """
  meta = results.study
  spec = meta.get("spec")
  if not spec:
    return None
  root = pathlib.Path(root) if root is not None else _git_root(
      pathlib.Path(os.path.dirname(os.path.abspath(results.path))))
  path = pathlib.Path(spec) if os.path.isabs(spec) else root / spec
  if not path.is_file():
    raise FileNotFoundError(f"the study spec {str(path)!r} named by {results.path!r} does "
                            "not exist (run from the repository that produced it).")
  name = f"_jaxdefense_study_{abs(hash(str(path.resolve())))}"
  mod_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  obj = getattr(module, meta.get("object") or "STUDY", None)
  if callable(obj) and not isinstance(obj, Study):
    obj = obj()
  if not isinstance(obj, Study):
    raise ValueError(f"{str(path)!r} defines no Study named {meta.get('object')!r}.")
  return obj


def render_report(directory: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                  *, generic: bool = False) -> str:
  """Render ``DIR/results.json`` into ``report.md`` and plots (``jaxdefense report``).

  The study's own report code is loaded from the spec file the results name; with
  ``generic=True`` (or no spec) a generic table of every metric is written instead.

  Returns:
    The path of ``report.md``.

  Raises:
    FileNotFoundError: no ``results.json`` in ``directory``, or its spec is missing.
    ValueError: not a study results file.
  """
  results = load_results(directory)
  if not os.path.exists(results.path):
    raise FileNotFoundError(f"no {RESULTS_FILE} in {os.fspath(directory)!r}.")
  study = None if generic else load_study(results)
  return write_report(study, results, out_dir)


# ------------------------------------------------------------------ command line
def main(study: Study | Callable[[bool], Study], argv: Sequence[str] | None = None) -> int:
  """The command line of a study's script (``python SPEC.py ...``).

  ``study`` is the :class:`Study`, or a function ``make_study(quick: bool) -> Study``:
  then ``--quick`` anywhere on the command line selects ``make_study(True)`` (a
  smoke-scale study with its own folders) and is removed from the arguments, so a
  script ends with ``sys.exit(jaxdefense.evaluation.study_main(make_study))``.

  ::

    python SPEC.py [run]                         # run or resume every missing cell
    python SPEC.py --cell NAME [--cell ...] [--seed S ...] [--force]
    python SPEC.py --index I                     # grid entry I (job arrays)
    python SPEC.py list                          # the grid with indices and status
    python SPEC.py report                        # rebuild report.md and the plots

  ``--results DIR`` and ``--runs DIR`` move the results file and the run folders.  A
  ``run`` that completes writes the report as well.

  Returns:
    The exit code (0 on success).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if not isinstance(study, Study):
    if not callable(study):
      raise TypeError(f"study_main needs a Study or a function quick -> Study; got {study!r}.")
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    study = study(quick)
  p = argparse.ArgumentParser(prog=study.spec or study.name,
                              description=f"The {study.name!r} study ({study.title}).")
  p.add_argument("action", nargs="?", default="run", choices=("run", "list", "report"))
  p.add_argument("--cell", action="append", help="run this cell (repeatable)")
  p.add_argument("--seed", action="append", type=int, help="run this seed (repeatable)")
  p.add_argument("--index", type=int, help="run entry I of the grid (job arrays)")
  p.add_argument("--results", default=None, help="folder of results.json and the report")
  p.add_argument("--runs", default=None, help="folder of the run folders")
  p.add_argument("--force", action="store_true", help="rerun cells recorded as done")
  p.add_argument("--keep-going", action="store_true", help="continue after a failed cell")
  p.add_argument("--no-report", action="store_true", help="do not write the report")
  args = p.parse_args(argv)
  results_dir = args.results or study.results_dir
  if results_dir is None:
    p.error("--results is required (the study has no default results folder)")
  if args.action == "list":
    res = load_results(results_dir)
    for i, (c, s) in enumerate(study.grid()):
      r = res.record(c.name, s)
      print(f"{i:4d}  {c.name:24s} seed {s:<4d} {r.get('status') if r else 'missing'}")
    return 0
  if args.action == "run":
    if args.index is not None and (args.cell or args.seed):
      p.error("--index excludes --cell / --seed")
    try:
      run_study(study, cells=args.cell, seeds=args.seed, index=args.index,
                results_dir=results_dir, runs_dir=args.runs, force=args.force,
                keep_going=args.keep_going,
                argv=["python", study.spec, *study.command_args, *argv] if study.spec else None)
    except ValueError as e:
      p.error(str(e))
    if args.no_report or args.index is not None or args.cell:
      return 0
  print("wrote", write_report(study, results_dir))
  return 0
