"""Base config of the LAD small study (``experiments/lad/small.py``).

Fashion-MNIST, pre-activation ResNet-8, adversarial training at eps = 0.1 (l-inf, the
radius of the EnResNet small study on the same data), PGD-5 with step eps / 4 as the
inner attack, SGD 0.1 / momentum 0.9 / weight decay 5e-4 divided by 10 at epochs 4 and 5
of 6, batch 128, best-validation checkpoint.  The cells set the objective: ``pgd``,
``trades`` (beta 6) or ``lad`` on either base with a splitting and ``eta``.

  jaxdefense config --config experiments/lad/small_config.py
  jaxdefense config --config experiments/lad/small_config.py:quick   # smoke scale
"""

from __future__ import annotations

import ml_collections

EPS = 0.1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The study's base config; ``arg="quick"`` shrinks it to a smoke run."""
  from jaxdefense import configs
  if arg not in (None, "", "quick"):
    raise ValueError(f"small_config: the argument must be 'quick' or nothing; got {arg!r}.")
  c = configs.base_config()
  c.dataset = "fashion_mnist"
  c.validation_size = 1000
  c.train_size = 12000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = 6
  c.augment.enabled = True
  c.augment.pad = 2
  c.augment.flip = True
  c.model.name = "preact_resnet8"
  c.objective = {"name": "pgd", "eps": EPS, "step_size": EPS / 4, "steps": 5}
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (4, 5)
  c.checkpoint.keep_best = True
  c.log_every_steps = 10
  c.progress_bar = True
  if arg == "quick":
    c.train_size, c.validation_size, c.epochs, c.schedule.milestones = 256, 128, 1, (1,)
    c.objective.steps = 1
  return c
