"""Ensembles over independently trained runs: logit averaging across checkpoints.

The In-ResNet paper's Table 6 (and the EnResNet paper's "integration of separately
trained models") evaluates the average of the logits of several runs of one
architecture trained with different seeds.  :func:`restore_ensemble` restores each run
with :func:`jaxdefense.training.restore` and combines the models with
:func:`jaxdefense.models.average_logits`; the result is an ordinary
:class:`~jaxdefense.models.ModelFn`, so every evaluation and attack takes it as it is.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

from jaxdefense import _checks
from jaxdefense import models as _models
from jaxdefense import training as _training

__all__ = ["restore_ensemble"]


def _classes_of(module: Any) -> int | None:
  """``num_classes`` of a zoo module (an ``Ensemble``'s member's), or ``None``."""
  for m in (module, getattr(module, "member", None)):
    value = getattr(m, "num_classes", None)
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  return None


def _check_workdirs(workdirs: Any) -> list[pathlib.Path]:
  if isinstance(workdirs, (str, bytes, os.PathLike)):
    raise TypeError(f"workdirs must be a sequence of run folders (one per member); got "
                    f"the single path {os.fsdecode(workdirs)!r}: pass [path] for an "
                    "ensemble of one run.")
  try:
    items = list(workdirs)
  except TypeError:
    raise TypeError(f"workdirs must be a sequence of run folders; got "
                    f"{_checks._summary(workdirs)}.") from None
  if not items:
    raise ValueError("workdirs must name at least one run folder; got none.")
  paths, seen = [], {}
  for i, w in enumerate(items):
    if not isinstance(w, (str, os.PathLike)):
      raise TypeError(f"workdirs[{i}] must be a path (str or os.PathLike); got "
                      f"{_checks._summary(w)}.")
    path = pathlib.Path(w)
    if not path.exists():
      raise FileNotFoundError(f"workdirs[{i}] = {str(path)!r} does not exist; expected the "
                              "folder of a training run (jaxdefense train --workdir).")
    if not path.is_dir():
      raise ValueError(f"workdirs[{i}] = {str(path)!r} is a file; expected the folder of a "
                       "training run.")
    resolved = path.resolve()
    if resolved in seen:
      raise ValueError(f"workdirs[{i}] = {str(path)!r} repeats workdirs[{seen[resolved]}]; "
                       "an ensemble averages independently trained runs, each once.")
    seen[resolved] = i
    paths.append(path)
  return paths


def restore_ensemble(workdirs: Sequence[str | os.PathLike], *, which: str = "latest",
                     weights: Sequence[float] | None = None,
                     average: str = "logits") -> _models.ModelFn:
  """One model averaging the logits of several saved runs (an ensemble of runs).

  Each run is restored with :func:`jaxdefense.training.restore` (its ``which``
  checkpoint) and bound in evaluation mode (:func:`jaxdefense.training.bound_model`);
  the members are combined by :func:`jaxdefense.models.average_logits`:
  ``logits(x) = sum_i w_i logits_i(x)`` with ``w_i = 1 / n`` by default.

  Args:
    workdirs: the runs' folders (``jaxdefense train --workdir``), one per member, at
      least one, no folder twice.  The runs must classify the same data set (same
      ``config.dataset``, hence image shape) into the same number of classes; their
      architectures may differ.
    which: ``"latest"`` (default) or ``"best"`` checkpoint of every run.
    weights: optional non-negative weights, one per run (normalised to sum 1); default
      uniform.
    average: ``"logits"`` (default, the formula above) or ``"probs"``: the log of the
      weighted mean of the members' probabilities (the Feynman–Kac reading; see
      :class:`jaxdefense.models.Ensemble`).

  Returns:
    A :class:`~jaxdefense.models.ModelFn` ``m(x [B, H, W, C], key=None) -> logits
    [B, K]``.  It is stochastic when any member draws noise at evaluation time
    (EnResNet); ``key`` is then required, member ``i`` gets
    ``jax.random.split(key, n)[i]``, and attacks use EOT
    (:func:`~jaxdefense.evaluation.evaluate_robustness` does it by itself).

  Raises:
    TypeError: ``workdirs`` is a single path or not a sequence of paths.
    ValueError: no workdirs, a workdir that is a file or is given twice, runs of
      different data sets or numbers of classes, bad ``which`` or ``weights``, a
      corrupt checkpoint (:class:`jaxdefense.training.CheckpointError`).
    FileNotFoundError: a workdir that does not exist or holds no ``which``
      checkpoint.
  """
  paths = _check_workdirs(workdirs)
  members, runs = [], []
  for path in paths:
    state, config = _training.restore(path, which=which)
    model = _training.bound_model(state)
    members.append(model)
    runs.append((str(path), config.dataset, _classes_of(model.module)))
  datasets = {d for _, d, _ in runs}
  if len(datasets) > 1:
    listing = ", ".join(f"{p!r}: {d}" for p, d, _ in runs)
    raise ValueError(f"workdirs must be runs on one data set; got {listing}.")
  classes = {k for _, _, k in runs if k is not None}
  if len(classes) > 1:
    listing = ", ".join(f"{p!r}: {k}" for p, _, k in runs)
    raise ValueError(f"workdirs must be runs whose models have the same num_classes; got "
                     f"{listing}.")
  return _models.average_logits(members, weights, average=average)
