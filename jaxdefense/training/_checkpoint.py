"""Orbax checkpoints of a run: the latest ones (periodic) and the best on validation.

Layout of a workdir::

  workdir/checkpoints/<step>/{state,config,meta}   periodic, last ``max_to_keep``
  workdir/best/<step>/{state,config,meta}          best validation metric (one kept)

Each checkpoint holds the train state's arrays (``TrainState.to_tree``), the config
(JSON) and a little metadata (epoch, metrics).  Orbax writes into a temporary folder
and renames it when complete, so a run killed at any moment leaves either a complete
checkpoint or none (unfinished temporary folders are ignored and cleaned up).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpoints", "LATEST", "BEST"]

LATEST = "checkpoints"
BEST = "best"


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored: corrupt files, or arrays that do not match
  the model / optimizer built from the config."""


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


class Checkpoints:
  """The checkpoint managers of one workdir.

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
              "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}

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
    """Save a checkpoint at ``int(tree["step"])`` (skipped if that step exists).

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
                              meta=ocp.args.JsonSave(meta))
    saved = mngr.save(step, args=args, metrics=metrics if best else None, force=True)
    mngr.wait_until_finished()
    return bool(saved)

  def restore_config(self, step: int | None = None, which: str = "latest"
                     ) -> tuple[int, dict, dict]:
    """``(step, config dict, meta)`` of a checkpoint (default: the newest).

    Raises:
      FileNotFoundError: no checkpoint.
      CheckpointError: unreadable config or metadata.
    """
    mngr = self._manager(which)
    step = self._step(mngr, step, which)
    try:
      out = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                       meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many kinds on damaged files
      raise CheckpointError(self._corrupt_message(mngr, step, e)) from e
    if not isinstance(out.config, dict):
      raise CheckpointError(f"checkpoint {mngr.directory}/{step} has no readable config.")
    return step, out.config, dict(out.meta or {})

  def restore(self, abstract_tree: Any, step: int | None = None,
              which: str = "latest") -> tuple[Any, dict]:
    """Restore the state arrays into the structure, shapes and shardings of
    ``abstract_tree`` (a tree of ``jax.ShapeDtypeStruct`` with shardings).

    Returns:
      ``(tree, meta)``.

    Raises:
      FileNotFoundError: no checkpoint.
      CheckpointError: corrupt files, or arrays that do not match ``abstract_tree``.
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
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_tree), meta=ocp.args.JsonRestore()))
    except CheckpointError:
      raise
    except Exception as e:  # orbax raises many kinds on damaged or mismatched files
      raise CheckpointError(self._corrupt_message(mngr, step, e)) from e
    _compare(out.state, abstract_tree, where)
    return out.state, dict(out.meta or {})

  def _step(self, mngr: ocp.CheckpointManager, step: int | None, which: str) -> int:
    mngr.reload()
    steps = list(mngr.all_steps())
    if step is None:
      step = mngr.latest_step()
    if step is None or step not in steps:
      raise FileNotFoundError(f"no {which} checkpoint{'' if step is None else f' at step {step}'}"
                              f" in {mngr.directory} (steps found: {sorted(steps)}).")
    return step

  @staticmethod
  def _corrupt_message(mngr: ocp.CheckpointManager, step: int, e: Exception) -> str:
    detail = str(e).strip().splitlines()
    detail = detail[0][:300] if detail else ""
    return (f"cannot restore checkpoint {mngr.directory}/{step}: its files are corrupt or "
            f"do not match the model and optimizer built from the config "
            f"({type(e).__name__}: {detail}). Remove that step's folder to fall back to an "
            f"older checkpoint, or start in a fresh workdir.")

  def close(self) -> None:
    """Finish pending writes and release the managers."""
    for m in (self._latest, self._best):
      if m is not None:
        m.wait_until_finished()
        m.close()
