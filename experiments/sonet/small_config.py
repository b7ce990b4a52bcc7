"""Base config of the SONet gradient-masking study (``experiments/sonet/small.py``).

Fashion-MNIST, natural training (as the SONet abstract), pre-activation ResNet-8 as the
plain baseline and ``sonet_resnet8`` (the same network with its first residual block
replaced by a skew-symmetric conv ODE block solved by Dopri5, rtol = atol = 1e-3); SGD
0.1 / momentum 0.9 / weight decay 5e-4, divided by 10 at epochs 3 and 4 of 5, batch 128,
best-validation checkpoint.  The cells set ``model.name``.

  jaxdefense config --config experiments/sonet/small_config.py
  jaxdefense config --config experiments/sonet/small_config.py:quick   # smoke scale
"""

from __future__ import annotations

import ml_collections


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
  c.epochs = 5
  c.augment.enabled = True
  c.augment.pad = 2
  c.augment.flip = True
  c.model.name = "preact_resnet8"
  c.objective = {"name": "natural"}
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (3, 4)
  c.checkpoint.keep_best = True
  c.log_every_steps = 20
  c.progress_bar = True
  if arg == "quick":
    c.train_size, c.validation_size, c.epochs, c.schedule.milestones = 256, 128, 1, (1,)
  return c
