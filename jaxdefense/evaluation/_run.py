"""Robustness evaluation of a saved training run (what ``jaxdefense attack`` calls)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax

from jaxdefense import data as _data
from jaxdefense import models as _models
from jaxdefense import training as _training
from jaxdefense.evaluation._diagnose import Diagnosis, diagnose
from jaxdefense.evaluation._robustness import RobustnessReport, evaluate_robustness


def run_logits_fn(workdir: str | os.PathLike, *, which: str = "latest"
                  ) -> tuple[_models.ModelFn, bool, Any]:
  """The model of a saved run, ready to call.

  Returns:
    ``(model, stochastic, config)``: ``model`` is ``jaxdefense.models.bind(module,
    variables)`` of the restored state in evaluation mode, a
    :class:`~jaxdefense.models.ModelFn` (``model(x)``, or ``model(x, key)`` when the
    network draws noise at test time); ``stochastic`` is ``model.stochastic`` (read from
    the module by :func:`jaxdefense.models.is_stochastic`); ``config`` the run's config.

  Raises:
    FileNotFoundError / ValueError: see :func:`jaxdefense.training.restore`.
    TypeError: a restored state whose ``apply_fn`` is not a Flax module's.
  """
  state, config = _training.restore(workdir, which=which)
  model = _training.bound_model(state)
  return model, model.stochastic, config


def evaluate_run(workdir: str | os.PathLike, *, key: Any = None, which: str = "latest",
                 suite: Any = "quick", eps: float = 8 / 255, num_examples: int | None = 1000,
                 corruptions: Sequence[str] = (), severities: Sequence[int] = (1, 2, 3, 4, 5),
                 corruption_dir: str | os.PathLike | None = None, eot_samples: int = 5,
                 batch_size: int = 128, data_dir: str | None = None,
                 progress: bool = True, save: bool = True,
                 with_diagnosis: bool = False) -> tuple[RobustnessReport, Diagnosis | None]:
  """Attack and corrupt the test set of a saved run; write the tables into its workdir.

  Args:
    workdir: a run's folder (``jaxdefense train --workdir``).
    key: PRNG key (default ``jax.random.key(0)``).
    which: ``"latest"`` or ``"best"`` checkpoint.
    suite, eps, corruptions, severities: see :func:`evaluate_robustness`.
    corruption_dir, eot_samples, batch_size, progress: see :func:`evaluate_robustness`.
    num_examples: evaluate the first ``num_examples`` test examples (``None``: all).
    data_dir: overrides the run's data folder.
    save: write ``robustness.md`` / ``robustness.json`` (and ``diagnosis.json``) into
      ``workdir``.
    with_diagnosis: also run :func:`diagnose` on the first 256 examples.

  Returns:
    ``(report, diagnosis_or_None)``.
  """
  key = jax.random.key(0) if key is None else key
  model, _, config = run_logits_fn(workdir, which=which)
  test = _data.load(config.dataset, "test", data_dir=data_dir or config.data_dir)
  if num_examples is not None:
    test = test.take(int(num_examples))
  step = f" ({config.model.step.name})" if config.model.step.name else ""
  meta = {"title": f"{config.model.name}{step} on {config.dataset}, "
                   f"{which} checkpoint", "workdir": str(workdir), "dataset": config.dataset}
  report = evaluate_robustness(model, test.images, test.labels, key=key, eps=eps,
                               suite=suite, corruptions=corruptions, severities=severities,
                               corruption_dir=corruption_dir, eot_samples=eot_samples,
                               batch_size=batch_size, progress=progress, meta=meta)
  diagnosis = None
  if with_diagnosis:
    sub = test.take(256)
    diagnosis = diagnose(model, sub.images, sub.labels, key=jax.random.fold_in(key, 1),
                         eps=eps, eot_samples=eot_samples,
                         batch_size=min(batch_size, 256), progress=progress)
  if save:
    report.save(workdir)
    if diagnosis is not None:
      import json
      with open(os.path.join(workdir, "diagnosis.json"), "w") as f:
        json.dump(diagnosis.to_json(), f, indent=2)
  return report, diagnosis
