"""Base config of the In-ResNet small study (``experiments/inresnet/small.py``).

Fashion-MNIST, pre-activation ResNet-20 (the In-ResNet paper's ResNet-110 family at
depth 20: three stages of three blocks, widths 16/32/64), natural training as the paper,
SGD 0.1 / momentum 0.9 / weight decay 1e-4 on every parameter (the authors' recipe, so
decay acts on the damping coefficients too), divided by 10 at epochs 4 and 6 of 8 (the
paper's 80/120 of 160, shortened), batch 128, best-validation checkpoint.  The cells of
the study set the step rule (``euler`` for the ResNet, ``damped`` with a kind).

  jaxdefense config --config experiments/inresnet/small_config.py
  jaxdefense config --config experiments/inresnet/small_config.py:quick   # smoke scale
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The study's base config; ``arg="quick"`` shrinks it to a few-minute smoke run."""
  from jaxdefense import configs
  if arg not in (None, "", "quick"):
    raise ValueError(f"small_config: the argument must be 'quick' or nothing; got {arg!r}.")
  c = configs.base_config()
  c.dataset = "fashion_mnist"
  c.validation_size = 1000
  c.train_size = 12000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = 8
  c.augment.enabled = True
  c.augment.pad = 2
  c.augment.flip = True
  c.model.name = "preact_resnet20"
  c.objective = {"name": "natural"}
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (4, 6)
  c.checkpoint.keep_best = True
  c.log_every_steps = 20
  c.progress_bar = True
  if arg == "quick":
    c.train_size, c.validation_size, c.epochs, c.schedule.milestones = 512, 256, 1, (1,)
    c.model.name = "preact_resnet20"
  return c
