"""Orbax checkpoints of a run (the latest ones and the best on validation), their
checksums, and the workdir itself (checks and the exclusive lock of a training run).

Layout of a workdir::

  workdir/checkpoints/<step>/{state,config,meta,checksums}   periodic, last ``max_to_keep``
  workdir/best/<step>/{state,config,meta,checksums}          best validation metric (one)
  workdir/run.lock                                           lock of the training run

Each checkpoint holds the train state's arrays (``TrainState.to_tree``), the config
(JSON), a little metadata (epoch, metrics) and the SHA-256 checksum of every array and of
the config and metadata (``checksums``, JSON).  Orbax writes all four items into one
temporary folder and renames it when complete, so a run killed at any moment leaves
either a complete checkpoint with its checksums or none (unfinished temporary folders
are ignored and cleaned up).  Every restore recomputes the checksums and raises
:class:`CheckpointError` on a mismatch; a checkpoint written before checksums existed
(no ``checksums`` item) is restored unverified, with a warning.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import pathlib
import socket
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

try:  # POSIX only; elsewhere a training run works without the workdir lock
  import fcntl
except ImportError:  # pragma: no cover - Windows
  fcntl = None

__all__ = ["CheckpointError", "Checkpoints", "LATEST", "BEST", "CHECKSUMS", "LOCK_FILE",
           "WorkdirLock", "WorkdirLockedError", "check_workdir", "compute_checksums"]

LATEST = "checkpoints"
BEST = "best"
CHECKSUMS = "checksums"
"""Name of the checkpoint item that holds the SHA-256 checksums (JSON)."""
LOCK_FILE = "run.lock"
"""Name of the lock file a training run holds in its workdir (it contains the holder's
process id, host and start time as JSON)."""
_CHECKSUM_FORMAT = 1


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored: corrupt files, arrays or JSON that differ
  from the checksums saved with them, or arrays that do not match the model / optimizer
  built from the config."""


class WorkdirLockedError(ValueError):
  """Another process holds the workdir's lock (a training run is already using it).

  A ``ValueError``, so the command line reports it as a one-line error.
  """


# ------------------------------------------------------------------ the workdir
def check_workdir(workdir: Any, name: str = "workdir") -> pathlib.Path:
  """``workdir`` as a path, checked to be a folder or a path a folder can be created at.

  Nothing is created.

  Args:
    workdir: a ``str`` or ``os.PathLike``.
    name: the argument's name in error messages.

  Returns:
    ``pathlib.Path(workdir)``.

  Raises:
    TypeError: ``workdir`` is not a str or path.
    ValueError: ``workdir`` is empty, is an existing file (not a folder), or lies under a
      path that is a file.
  """
  if not isinstance(workdir, (str, os.PathLike)):
    raise TypeError(f"{name} must be a str or os.PathLike folder path; got "
                    f"{type(workdir).__name__} {workdir!r}.")
  if isinstance(workdir, str) and not workdir.strip():
    raise ValueError(f"{name} must be a folder path; got the empty string {workdir!r}.")
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise ValueError(f"{name}={str(path)!r} is a file, not a folder; give a folder for the "
                     f"run (an existing run folder or a new path).")
  for parent in path.absolute().parents:
    if parent.exists():
      if not parent.is_dir():
        raise ValueError(f"{name}={str(path)!r} lies under {str(parent)!r}, which is a "
                         f"file, not a folder; a run folder cannot be created there.")
      break
  return path


def _read_holder(path: pathlib.Path, wait: float = 1.0) -> dict:
  """The JSON the lock's holder wrote (``{}`` if unreadable within ``wait`` seconds: the
  holder may have locked but not written yet)."""
  deadline = time.monotonic() + wait
  while True:
    try:
      info = json.loads(path.read_text())
      if isinstance(info, dict) and "pid" in info:
        return info
    except (OSError, ValueError):
      pass
    if time.monotonic() >= deadline:
      return {}
    time.sleep(0.05)


class WorkdirLock:
  """Exclusive lock of a workdir for one training run (an OS file lock).

  ``acquire`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``workdir/run.lock`` and writes
  ``{"pid", "host", "started"}`` into it.  The operating system releases the lock when
  the process ends in any way (exit, exception, ``SIGKILL``), so a killed run never
  leaves a stale lock; the file itself stays (its content is only read while locked).
  A second lock of the same workdir (from another process or from another ``WorkdirLock``
  in the same process) fails at once with :class:`WorkdirLockedError`.  On platforms
  without ``fcntl``, or file systems that refuse locks, a warning is issued and the run
  goes on unlocked.  Use as a context manager or call ``acquire`` / ``release``.

  Args:
    workdir: an existing folder (see :func:`check_workdir`).
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self._fd: int | None = None

  @property
  def locked(self) -> bool:
    """Whether this object holds the lock."""
    return self._fd is not None

  def acquire(self) -> "WorkdirLock":
    """Take the lock (without waiting).

    Returns:
      ``self``.

    Raises:
      WorkdirLockedError: another holder has it; the message names its process id.
      RuntimeError: this object already holds it.
      OSError: the lock file cannot be created (e.g. no write permission).
    """
    if self._fd is not None:
      raise RuntimeError(f"{self.path} is already locked by this WorkdirLock.")
    if fcntl is None:  # pragma: no cover - Windows
      warnings.warn(f"cannot lock {self.path.parent} on this platform (no fcntl): make "
                    "sure no other run uses this workdir.", RuntimeWarning, stacklevel=2)
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        info = _read_holder(self.path)
        who = (f"process {info['pid']} on host {info.get('host', '?')}, started "
               f"{info.get('started', '?')}" if info else "another process (its id could "
               "not be read)")
        raise WorkdirLockedError(
            f"workdir {str(self.path.parent)!r} is in use by another training run: "
            f"{who} holds {str(self.path)!r}. Two runs in one workdir would overwrite "
            "each other's checkpoints, config.json and metrics; wait for that run to "
            f"end or stop it (kill {info.get('pid', 'PID')}), or choose another workdir."
        ) from None
      warnings.warn(f"cannot lock {self.path} ({e.strerror}): make sure no other run "
                    "uses this workdir.", RuntimeWarning, stacklevel=2)
      return self
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Give the lock back (does nothing if not held)."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc: Any) -> None:
    self.release()


# ------------------------------------------------------------------ checksums
def _hash_json(obj: Any) -> str:
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def _host_leaves(tree: Any) -> list[tuple[str, np.ndarray | None]]:
  """``[(name, host array)]`` of the leaves of ``tree`` (one transfer for all).

  An array split across processes (not fully addressable and not replicated) cannot be
  read whole by one process: it comes back as ``None`` (not checksummed).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = ["/".join(_key_name(k) for k in path) for path, _ in flat]
  local = []
  for _, leaf in flat:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      local.append(leaf.addressable_data(0) if leaf.is_fully_replicated else None)
    else:
      local.append(leaf)
  host = jax.device_get(local)
  return [(n, None if a is None else np.asarray(a)) for n, a in zip(names, host)]


def _hash_array(a: np.ndarray) -> str:
  h = hashlib.sha256(f"{a.dtype.name}{tuple(a.shape)}".encode())
  h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
  return h.hexdigest()


def compute_checksums(tree: Any, config: Any, meta: Any) -> dict:
  """The checksum record saved with a checkpoint.

  Args:
    tree: the state arrays (``TrainState.to_tree()``).
    config, meta: the JSON items saved with them.

  Returns:
    ``{"format": 1, "algorithm": "sha256", "arrays": {name: hex digest},
    "config": hex digest, "meta": hex digest}``; an array's digest covers its dtype,
    shape and bytes; a JSON item's covers its canonical text (sorted keys).
  """
  arrays = {n: _hash_array(a) for n, a in _host_leaves(tree) if a is not None}
  return {"format": _CHECKSUM_FORMAT, "algorithm": "sha256", "arrays": arrays,
          "config": _hash_json(config), "meta": _hash_json(meta)}


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_table(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{"params/Dense_0/kernel": (shape, dtype)}`` for arrays, shape structs or metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(_key_name(k) for k in path)] = (tuple(np.shape(leaf)) if not hasattr(
        leaf, "shape") else tuple(leaf.shape), np.dtype(leaf.dtype))
  return out


def _compare(stored: Any, wanted: Any, where: str) -> None:
  """Raise ``CheckpointError`` naming the first array that differs in shape or dtype."""
  got, want = _leaf_table(stored), _leaf_table(wanted)
  only_ckpt = sorted(set(got) - set(want))
  only_model = sorted(set(want) - set(got))
  if only_ckpt or only_model:
    raise CheckpointError(
        f"checkpoint {where} does not match the config (another model or optimizer?): "
        f"arrays only in the checkpoint: {only_ckpt[:4]}{' ...' if len(only_ckpt) > 4 else ''}"
        f"; only in the state built from the config: {only_model[:4]}"
        f"{' ...' if len(only_model) > 4 else ''}.")
  for name, (shape, dtype) in want.items():
    if got[name] != (shape, dtype):
      raise CheckpointError(
          f"checkpoint {where} does not match the config: {name} is "
          f"{got[name][0]} {got[name][1]} in the checkpoint but {shape} {dtype} in the "
          f"state built from the config (another model or optimizer?).")


_WARNED_UNVERIFIED: set[str] = set()


class Checkpoints:
  """The checkpoint managers of one workdir.

  Every checkpoint is saved with the SHA-256 checksums of its arrays, config and
  metadata (:func:`compute_checksums`, in the same atomic commit), and every restore
  (:meth:`restore`, :meth:`restore_config`) verifies them: a mismatch raises
  :class:`CheckpointError` naming the checkpoint's folder, step and the damaged items,
  and how to fall back to another checkpoint.  Checkpoints saved before checksums
  existed are restored unverified (one warning per checkpoint and process).

  Args:
    workdir: the run's folder.
    max_to_keep: periodic checkpoints kept (the oldest are deleted).
    keep_best: also keep the best checkpoint by ``best_metric`` under ``workdir/best``.
    best_metric: ``"accuracy"`` (higher is better) or ``"loss"`` (lower is better).
    read_only: open existing checkpoints to read them: no folders are created and
      nothing is deleted.
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 2,
               keep_best: bool = True, best_metric: str = "accuracy",
               read_only: bool = False):
    self.workdir = pathlib.Path(workdir).resolve()
    self.best_metric = best_metric

    def handlers():
      return {"state": ocp.StandardCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
              CHECKSUMS: ocp.JsonCheckpointHandler()}

    self._latest = ocp.CheckpointManager(
        self.workdir / LATEST,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep, create=not read_only,
            enable_async_checkpointing=False, cleanup_tmp_directories=not read_only),
        item_handlers=handlers())
    self._best = None
    if keep_best or (read_only and (self.workdir / BEST).is_dir()):
      self._best = ocp.CheckpointManager(
          self.workdir / BEST,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None if read_only else 1, create=not read_only,
              enable_async_checkpointing=False, cleanup_tmp_directories=not read_only,
              best_fn=lambda m: float(m[best_metric]),
              best_mode="min" if best_metric == "loss" else "max",
              keep_checkpoints_without_metrics=False),
          item_handlers=handlers())

  @property
  def keeps_best(self) -> bool:
    """Whether a best-on-validation manager is open."""
    return self._best is not None

  def _manager(self, which: str) -> ocp.CheckpointManager:
    if which == LATEST or which == "latest":
      return self._latest
    if which == BEST:
      if self._best is None:
        raise ValueError(f"no best checkpoints in {self.workdir} (the run had no "
                         "validation split or checkpoint.keep_best=False).")
      return self._best
    raise ValueError(f"which must be 'latest' or 'best'; got {which!r}.")

  def latest_step(self, which: str = "latest") -> int | None:
    """Step of the newest complete checkpoint (``None`` if there is none)."""
    mngr = self._manager(which)
    mngr.reload()
    return mngr.latest_step()

  def steps(self, which: str = "latest") -> list[int]:
    """Steps of every complete checkpoint."""
    return list(self._manager(which).all_steps())

  def save(self, tree: Any, config: dict, meta: dict, *, best: bool = False,
           metrics: dict | None = None) -> bool:
    """Save a checkpoint at ``int(tree["step"])`` (skipped if that step exists), with
    the checksums of ``tree``, ``config`` and ``meta`` in the same commit.

    Args:
      tree: ``TrainState.to_tree()``.
      config: the config as a JSON-able dict.
      meta: JSON-able metadata (epoch, metrics...).
      best: save into the best-on-validation manager (``metrics`` required).
      metrics: validation metrics for ``best``.

    Returns:
      Whether a checkpoint was written.
    """
    step = int(jax.device_get(tree["step"]))
    mngr = self._manager(BEST if best else LATEST)
    if step in mngr.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(tree),
                              config=ocp.args.JsonSave(config),
                              meta=ocp.args.JsonSave(meta),
                              **{CHECKSUMS: ocp.args.JsonSave(
                                  compute_checksums(tree, config, meta))})
    saved = mngr.save(step, args=args, metrics=metrics if best else None, force=True)
    mngr.wait_until_finished()
    return bool(saved)

  def _has_checksums(self, mngr: ocp.CheckpointManager, step: int) -> bool:
    """Whether the checkpoint has a checksums item (warns once if it has none)."""
    where = pathlib.Path(str(mngr.directory)) / str(step)
    if (where / CHECKSUMS).exists():
      return True
    if str(where) not in _WARNED_UNVERIFIED:
      _WARNED_UNVERIFIED.add(str(where))
      warnings.warn(f"checkpoint {where} has no checksums (it was saved by an older "
                    "jaxdefense): it is restored without verifying its files.",
                    UserWarning, stacklevel=3)
    return False

  def restore_config(self, step: int | None = None, which: str = "latest"
                     ) -> tuple[int, dict, dict]:
    """``(step, config dict, meta)`` of a checkpoint (default: the newest).

    Raises:
      FileNotFoundError: no checkpoint.
      CheckpointError: unreadable config or metadata, or config / metadata that differ
        from their saved checksums.
    """
    mngr = self._manager(which)
    step = self._step(mngr, step, which)
    verify = self._has_checksums(mngr, step)
    items = {"config": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
    if verify:
      items[CHECKSUMS] = ocp.args.JsonRestore()
    try:
      out = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many kinds on damaged files
      raise CheckpointError(self._corrupt_message(mngr, step, e)) from e
    if not isinstance(out.config, dict):
      raise CheckpointError(f"checkpoint {mngr.directory}/{step} has no readable config.")
    meta = dict(out.meta or {})
    if verify:
      record = self._record(mngr, step, out[CHECKSUMS])
      bad = [name for name, obj in (("config", out.config), ("meta", meta))
             if record.get(name) != _hash_json(obj)]
      if bad:
        raise CheckpointError(self._mismatch_message(mngr, step, which, bad))
    return step, out.config, meta

  def restore(self, abstract_tree: Any, step: int | None = None,
              which: str = "latest") -> tuple[Any, dict]:
    """Restore the state arrays into the structure, shapes and shardings of
    ``abstract_tree`` (a tree of ``jax.ShapeDtypeStruct`` with shardings), and verify
    them (and the metadata) against the checksums saved with them.

    Returns:
      ``(tree, meta)``.

    Raises:
      FileNotFoundError: no checkpoint.
      CheckpointError: corrupt files, arrays or metadata that differ from their saved
        checksums (the message names them, the step, and the checkpoints to fall back
        to), or arrays that do not match ``abstract_tree``.
    """
    mngr = self._manager(which)
    step = self._step(mngr, step, which)
    where = f"{mngr.directory}/{step}"
    try:
      stored = mngr.item_metadata(step)["state"]
    except Exception:  # unreadable metadata: let the restore below report it
      stored = None
    if stored is not None:
      _compare(stored, abstract_tree, where)
    verify = self._has_checksums(mngr, step)
    items = {"state": ocp.args.StandardRestore(abstract_tree),
             "meta": ocp.args.JsonRestore()}
    if verify:
      items[CHECKSUMS] = ocp.args.JsonRestore()
    try:
      out = mngr.restore(step, args=ocp.args.Composite(**items))
    except CheckpointError:
      raise
    except Exception as e:  # orbax raises many kinds on damaged or mismatched files
      raise CheckpointError(self._corrupt_message(mngr, step, e)) from e
    _compare(out.state, abstract_tree, where)
    meta = dict(out.meta or {})
    if verify:
      record = self._record(mngr, step, out[CHECKSUMS])
      want = record.get("arrays")
      if not isinstance(want, dict):
        raise CheckpointError(self._mismatch_message(mngr, step, which, [CHECKSUMS]))
      bad = [f"state/{name}" for name, a in _host_leaves(out.state)
             if a is not None and want.get(name) != _hash_array(a)]
      if record.get("meta") != _hash_json(meta):
        bad.append("meta")
      if bad:
        raise CheckpointError(self._mismatch_message(mngr, step, which, bad))
    return out.state, meta

  def _record(self, mngr: ocp.CheckpointManager, step: int, record: Any) -> dict:
    if (not isinstance(record, dict) or record.get("format") != _CHECKSUM_FORMAT
        or record.get("algorithm") != "sha256"):
      raise CheckpointError(
          f"checkpoint {mngr.directory}/{step}: its {CHECKSUMS} item is unreadable or of "
          f"an unknown format ({str(record)[:80]!r}); "
          + self._fallback(mngr, step, "latest" if mngr is self._latest else "best"))
    return record

  def _step(self, mngr: ocp.CheckpointManager, step: int | None, which: str) -> int:
    mngr.reload()
    steps = list(mngr.all_steps())
    if step is None:
      step = mngr.latest_step()
    if step is None or step not in steps:
      raise FileNotFoundError(f"no {which} checkpoint{'' if step is None else f' at step {step}'}"
                              f" in {mngr.directory} (steps found: {sorted(steps)}).")
    return step

  def _fallback(self, mngr: ocp.CheckpointManager, step: int, which: str) -> str:
    """How to fall back from a damaged checkpoint: the other checkpoints of the workdir
    (not verified here) and the ways to pick one."""
    others = sorted(s for s in mngr.all_steps() if s != step)
    folder = f"{mngr.directory}/{step}"
    best = []
    if which == "latest" and self._best is not None:
      best = sorted(self._best.all_steps())
    elif which == "best":
      best, others = others, sorted(self._latest.all_steps())
    parts = []
    if which == "latest" and others:
      parts.append(f"restore an older step with jaxdefense.training.restore(workdir, "
                   f"step=N) or evaluate_checkpoint(workdir, step=N) (other periodic "
                   f"checkpoints: steps {others})")
    if which == "best":
      if best:
        parts.append(f"restore another best checkpoint with jaxdefense.training.restore("
                     f"workdir, which='best', step=N) (steps {best})")
      if others:
        parts.append(f"use the periodic checkpoints (which='latest', `jaxdefense eval "
                     f"--which latest`; steps {others})")
    elif best:
      parts.append(f"use the best checkpoint (which='best', `jaxdefense eval --which "
                   f"best`; steps {best})")
    if which == "latest":
      parts.append(f"or move the folder {folder} out of {mngr.directory}: training then "
                   + (f"resumes from step {others[-1]}" if others else "starts again from "
                      "step 0") + " and `jaxdefense eval` reads the newest remaining step")
    else:
      parts.append(f"or move the folder {folder} out of {mngr.directory}")
    return "To fall back: " + "; ".join(parts) + "."

  def _mismatch_message(self, mngr: ocp.CheckpointManager, step: int, which: str,
                        bad: list[str]) -> str:
    shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    return (f"checkpoint {mngr.directory}/{step} (step {step}) is corrupt: {shown} "
            f"differ{'s' if len(bad) == 1 else ''} from the SHA-256 checksum saved with "
            f"the checkpoint (its files under {mngr.directory}/{step} changed after they "
            f"were written: disk, copy or transfer damage). "
            + self._fallback(mngr, step, which))

  def _corrupt_message(self, mngr: ocp.CheckpointManager, step: int, e: Exception) -> str:
    detail = str(e).strip().splitlines()
    detail = detail[0][:300] if detail else ""
    which = "latest" if mngr is self._latest else "best"
    return (f"cannot restore checkpoint {mngr.directory}/{step} (step {step}): its files "
            f"are corrupt or do not match the model and optimizer built from the config "
            f"({type(e).__name__}: {detail}). " + self._fallback(mngr, step, which))

  def close(self) -> None:
    """Finish pending writes and release the managers."""
    for m in (self._latest, self._best):
      if m is not None:
        m.wait_until_finished()
        m.close()
