"""Reading a run back: ``restore`` and ``evaluate_checkpoint``.

No data is needed to restore: the experiment is rebuilt from the config stored in the
checkpoint (validated once, in :func:`restore`) and the checkpoint's metadata.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from jaxdefense import _checks
from jaxdefense import configs as _configs
from jaxdefense import data as _data
from jaxdefense.data import _sharding
from jaxdefense.training import _experiment
from jaxdefense.training._checkpoint import (BEST, LATEST, CheckpointError, Checkpoints,
                                               check_workdir)
from jaxdefense.training._experiment import Experiment
from jaxdefense.training._state import TrainState
from jaxdefense.training._steps import evaluate, make_eval_step

__all__ = ["restore", "evaluate_checkpoint"]

_META_KEYS = ("num_classes", "image_shape", "steps_per_epoch", "total_steps")


def _experiment_from_meta(config: ml_collections.ConfigDict, meta: dict,
                          where: str) -> Experiment:
  """The experiment of a checkpoint from its validated ``config`` and its ``meta``."""
  missing = [k for k in _META_KEYS if k not in meta]
  if missing:
    raise CheckpointError(f"checkpoint {where} lacks metadata {missing}.")
  return _experiment.make_experiment(config, num_classes=meta["num_classes"],
                                     image_shape=meta["image_shape"],
                                     steps_per_epoch=meta["steps_per_epoch"],
                                     total_steps=meta["total_steps"])


def restore(workdir: str | os.PathLike, *, which: str = "latest", step: int | None = None,
            mesh: Mesh | None = None) -> tuple[TrainState, ml_collections.ConfigDict]:
  """Restore a checkpoint of a run and the config it was trained with.

  No data is loaded: the model and optimizer are rebuilt from the config and the
  metadata stored in the checkpoint.  The stored config is validated here (once) with
  ``jaxdefense.configs.validate``.  The arrays, config and metadata are verified against
  the SHA-256 checksums saved with the checkpoint (checkpoints written before checksums
  existed are restored unverified, with a warning).  Restoring takes no lock: a run
  may be read while it trains.

  Args:
    workdir: the run's folder (as given to ``train_and_evaluate``).
    which: ``"latest"`` (periodic checkpoints, default) or ``"best"`` (best on
      validation).
    step: a specific step (default None: the newest of ``which``).
    mesh: device mesh for the replicated state (default None: all devices).

  Returns:
    ``(state, config)``: the ``TrainState`` (``state.params``, ``state.model_state``,
    ``state.step``...) replicated on ``mesh``, and the validated, locked ``ConfigDict``.

  Raises:
    FileNotFoundError: no checkpoint in ``workdir`` (for ``which="best"``: the run has
      no best checkpoint; the message says why and which checkpoints exist).
    CheckpointError: (a ``ValueError``) corrupt files, arrays, config or metadata that
      differ from their saved checksums (the message names the step and the
      checkpoints to fall back to), missing metadata, or a checkpoint that does not
      match the model built from its own config.
    ValueError: ``which`` not "latest" or "best"; a negative ``step``; ``workdir`` a
      file; a stored config that no longer validates.
    TypeError: ``workdir`` not a str or path; ``step`` not an integer.
  """
  workdir = check_workdir(workdir)
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best'; got {which!r}.")
  if step is not None:
    step = _checks.check_int(step, "step", minimum=0)
  folder = workdir / (LATEST if which == "latest" else BEST)
  if which == "best" and not _has_steps(folder):
    raise FileNotFoundError(_no_best_message(workdir))
  if not folder.is_dir():
    raise FileNotFoundError(f"no {which} checkpoints in {str(workdir)!r} (no folder "
                            f"{str(folder)!r}); train first, e.g. `jaxdefense train "
                            f"--config demo --workdir {workdir}`.")
  mesh = _sharding.make_mesh() if mesh is None else mesh
  ckpt = Checkpoints(workdir, keep_best=(which == "best"), read_only=True)
  try:
    step, config_dict, meta = ckpt.restore_config(step, which)
    config = _configs.validate(config_dict)  # the one validation of a restore
    exp = _experiment_from_meta(config, meta, f"{ckpt.workdir}/{which}/{step}")
    abstract = exp.abstract_state(mesh)
    tree, _ = ckpt.restore(abstract.to_tree(), step, which)
  finally:
    ckpt.close()
  return abstract.from_tree(tree), exp.config


def _has_steps(folder: pathlib.Path) -> bool:
  """Whether ``folder`` holds a committed checkpoint (a step folder, no temporary)."""
  return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def _no_best_message(workdir: pathlib.Path) -> str:
  """Why a run has no best checkpoint, and which checkpoints it has."""
  latest = workdir / LATEST
  steps = sorted(int(p.name) for p in latest.iterdir()
                 if p.is_dir() and p.name.isdigit()) if latest.is_dir() else []
  why = ("best checkpoints are kept only for runs with a validation split "
         "(validation_size > 0) and checkpoint.keep_best=True, after each validation")
  try:  # the run's config.json says which condition failed
    config = json.loads((workdir / "config.json").read_text())
    val = config.get("validation_size")
    keep = (config.get("checkpoint") or {}).get("keep_best")
    if isinstance(val, int) and val <= 0:
      why = (f"this run has no validation split (validation_size={val}), so nothing "
             "selects a best checkpoint")
    elif keep is False:
      why = "this run was trained with checkpoint.keep_best=False"
    elif steps:
      why = ("the run keeps best checkpoints, but none is there (one is saved after each "
             "validation, so none exists before the first; or it was removed)")
  except (OSError, ValueError, AttributeError):
    pass
  have = (f"its periodic checkpoints are at steps {steps}: use which='latest' "
          f"(`jaxdefense eval --which latest`)" if steps else
          f"it has no checkpoint at all; train first, e.g. `jaxdefense train --config demo "
          f"--workdir {workdir}`")
  return f"no 'best' checkpoint in {str(workdir)!r}: {why}; {have}."


def evaluate_checkpoint(workdir: str | os.PathLike, *, which: str = "latest",
                        splits: Sequence[str] = ("test",), data_dir: str | None = None,
                        batch_size: int | None = None, mesh: Mesh | None = None,
                        step: int | None = None) -> list[dict[str, Any]]:
  """Clean accuracy of a saved run on some splits of its data set.

  Args:
    workdir: the run's folder.
    which: ``"latest"`` (default) or ``"best"``.
    splits: among ``"train"``, ``"validation"``, ``"test"`` (default test only).
    data_dir: overrides the config's ``data_dir`` (default None: the config's).
    batch_size: evaluation batch (default None: the config's ``eval_batch_size``).
    mesh: device mesh (default None: all devices).
    step: a specific checkpoint step (default None: the newest of ``which``), e.g. an
      older one when the newest is damaged.

  Returns:
    One row per split: ``{"split", "loss", "accuracy", "examples", "step", "run"}``
    (``run`` describes the model, e.g. ``"resnet8 (euler) on digits"``).

  Raises:
    FileNotFoundError / CheckpointError: see :func:`restore`.
    ValueError: unknown split; ``validation`` for a run without a validation split.
  """
  mesh = _sharding.make_mesh() if mesh is None else mesh
  state, config = restore(workdir, which=which, step=step, mesh=mesh)
  step = int(jax.device_get(state.step))
  run = _experiment.describe(config)
  eval_step = make_eval_step(mesh)
  bs = int(batch_size or config.eval_batch_size)
  rows = []
  for split in splits:
    if split not in _data.SPLITS:
      raise ValueError(f"split must be one of {list(_data.SPLITS)}; got {split!r}.")
    if split == "validation" and config.validation_size <= 0:
      raise ValueError(f"the run in {str(workdir)!r} has no validation split "
                       "(validation_size=0).")
    ds = _data.load(config.dataset, split, data_dir=data_dir or config.data_dir,
                    validation_size=config.validation_size if split != "test" else 0,
                    seed=config.seed)
    if split == "train" and config.train_size > 0:
      ds = ds.take(config.train_size)
    m = evaluate(state, ds, bs, mesh=mesh, eval_step=eval_step)
    rows.append({"split": split, "loss": m["loss"], "accuracy": m["accuracy"],
                 "examples": m["count"], "step": step, "run": run})
  return rows
