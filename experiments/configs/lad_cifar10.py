"""LAD on CIFAR-10 / CIFAR-100 at the paper's scale (for a GPU): the ``paper`` runs of
``experiments/lad/``.

Pre-activation ResNet-18 (``preact_resnet18``; ``wrn34_10`` by ``--config.model.name``),
the usual schedules of the two base objectives: PGD-AT (Madry et al.) at eps 8/255 with
10 steps of 2/255, SGD 0.1 / momentum 0.9 / weight decay 5e-4, divided by 10 at epochs 75
and 90 of 100; TRADES (beta 6, eps 0.031, 10 steps of 0.007) with weight decay 2e-4 and
the same schedule.  LAD (``jaxdefense.objectives.LAD``) adds the layer-wise perturbations
with ``eta`` (default 0.05, sign-normalised adjoints; the introduction gives no value).

The argument is ``BASE:SPLITTING:DATASET`` (default ``pgd:lie_trotter:cifar10``): BASE
``pgd`` or ``trades``; SPLITTING ``none`` (the base objective alone), ``lie_trotter``
(LAD) or ``strang_marchuk`` (LAD-SM); DATASET ``cifar10`` or ``cifar100``::

  jaxdefense train --config experiments/configs/lad_cifar10.py:trades:strang_marchuk:cifar100 \\
      --workdir W --config.objective.eta=0.1
"""

from __future__ import annotations

from jaxdefense.configs import base_config

_BASES = {
    "pgd": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10},
    "trades": {"beta": 6.0, "eps": 0.031, "step_size": 0.007, "steps": 10},
}
_SPLITTINGS = ("none", "lie_trotter", "strang_marchuk")
_DATASETS = ("cifar10", "cifar100")


def get_config(arg: str | None = None):
  """The config for ``arg = "BASE:SPLITTING:DATASET"``."""
  parts = (arg or "pgd:lie_trotter:cifar10").split(":")
  base, splitting, dataset = (parts + ["lie_trotter", "cifar10"][len(parts) - 1:])[:3]
  if base not in _BASES or splitting not in _SPLITTINGS or dataset not in _DATASETS:
    raise ValueError(f"lad_cifar10: the argument must be BASE:SPLITTING:DATASET with BASE in "
                     f"{list(_BASES)}, SPLITTING in {list(_SPLITTINGS)} and DATASET in "
                     f"{list(_DATASETS)}; got {arg!r}.")
  c = base_config()
  c.dataset = dataset
  c.validation_size = 5000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = 100
  c.augment.enabled = True
  c.augment.pad = 4
  c.augment.crop = True
  c.augment.flip = True
  c.model.name = "preact_resnet18"
  fields = dict(_BASES[base])
  if splitting == "none":
    c.objective = {"name": base, **fields}
  else:
    c.objective = {"name": "lad", "base": base, "splitting": splitting, "eta": 0.05,
                   **fields}
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4 if base == "pgd" else 2e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (75, 90)
  c.checkpoint.keep_best = True
  c.log_every_steps = 100
  return c
