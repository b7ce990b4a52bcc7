"""Warm start: a new run that begins from the weights of another run.

The In-ResNet authors' "pretrain" option trains a plain ResNet first and then switches the
damping on; here that is two runs: the ResNet, then the In-ResNet with
``init.from_workdir`` set to the ResNet's workdir.  Every array of the new model whose
path exists in the source checkpoint (``params`` and the other model collections, e.g.
``batch_stats``) is copied; arrays the source lacks (the damping coefficients) keep their
initial values.  The step counter, the optimizer state (the moments of a fresh optimizer
do not depend on the parameter values) and the data order start fresh.  The warm start
applies once, when the run starts from nothing: a resumed run continues from its own
checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

from jaxdefense.training._restore import restore
from jaxdefense.training._state import TrainState

__all__ = ["WarmStart", "warm_start"]

_WHICH = ("latest", "best")


@dataclasses.dataclass(frozen=True)
class WarmStart:
  """What :func:`warm_start` copied.

  Attributes:
    source: the source workdir.
    which: ``"latest"`` or ``"best"``.
    step: the source checkpoint's step.
    copied: paths (``"collection/a/b"``) copied from the source.
    kept: paths of the new model that the source lacks (left at their initial values).
    unused: paths of the source that the new model lacks.
  """
  source: str
  which: str
  step: int
  copied: tuple[str, ...]
  kept: tuple[str, ...]
  unused: tuple[str, ...]

  def describe(self) -> str:
    """One line for the run's log."""
    text = (f"initialised from {self.source} ({self.which} checkpoint, step {self.step}): "
            f"{len(self.copied)} arrays copied")
    if self.kept:
      text += f"; {len(self.kept)} kept at their initial values ({_short(self.kept)})"
    if self.unused:
      text += f"; {len(self.unused)} of the source unused ({_short(self.unused)})"
    return text + "."


def _short(paths: tuple[str, ...], n: int = 4) -> str:
  return ", ".join(paths[:n]) + (f", ... ({len(paths) - n} more)" if len(paths) > n else "")


def _flat(collections: dict[str, Any]) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(collections).items()}


def warm_start(state: TrainState, source: str, which: str = "best",
               log: Callable[[str], None] | None = None) -> tuple[TrainState, WarmStart]:
  """``state`` with every model array that ``source``'s checkpoint also has copied in.

  Args:
    state: a freshly initialised state (as :class:`~jaxdefense.training.Experiment`'s
      ``init_state``); its shardings are kept.
    source: the workdir of a finished (or running) run.
    which: the source checkpoint, ``"best"`` (best on validation, default) or
      ``"latest"``.
    log: optional printer for the one-line summary.

  Returns:
    ``(state, summary)``: the state with the copied arrays (step and optimizer state as
    given) and a :class:`WarmStart`.

  Raises:
    ValueError: ``which`` not "latest" or "best" (named as ``init.which``); an array
      present in both with different shapes (named by its path, with both shapes); no
      array in common (the source is another architecture).
    FileNotFoundError, CheckpointError: as :func:`~jaxdefense.training.restore`.
  """
  if which not in _WHICH:
    raise ValueError(f"init.which must be one of {_WHICH}; got {which!r}.")
  src, _ = restore(source, which=which)
  target = _flat({"params": state.params, **state.model_state})
  given = _flat({"params": src.params, **src.model_state})
  mismatched = [f"{p}: {tuple(given[p].shape)} in the source, {tuple(v.shape)} here"
                for p, v in target.items() if p in given and given[p].shape != v.shape]
  if mismatched:
    raise ValueError(f"init.from_workdir={source!r}: arrays of the same path have other "
                     f"shapes, so the source is another architecture or width: "
                     + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))
  copied = tuple(p for p in target if p in given)
  if not copied:
    raise ValueError(f"init.from_workdir={source!r}: no array of this model exists in the "
                     f"source checkpoint (source paths e.g. {_short(tuple(given), 3)}; here "
                     f"{_short(tuple(target), 3)}).")
  merged = {p: (jax.device_put(given[p].astype(v.dtype), v.sharding) if p in given else v)
            for p, v in target.items()}
  tree = traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in merged.items()})
  params = tree.pop("params")
  summary = WarmStart(source=str(source), which=which, step=int(np.asarray(src.step)),
                      copied=copied, kept=tuple(p for p in target if p not in given),
                      unused=tuple(p for p in given if p not in target))
  if log is not None:
    log("[jaxdefense] " + summary.describe())
  return state.replace(params=params, model_state={**state.model_state, **tree}), summary
