"""ResNet-20 on CIFAR-10 with the recipe of the EnResNet / In-ResNet papers.

SGD, momentum 0.9, PyTorch-style (coupled) weight decay 5e-4, batch 128, learning rate
0.1 divided by 10 at epochs 80, 120 and 160 of 200; random crop (pad 4) and flip.
"""

from __future__ import annotations

import ml_collections

from jaxdefense.configs._base import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.dataset = "cifar10"
  c.validation_size = 0
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = 200
  c.augment.enabled = True
  c.augment.pad = 4
  c.augment.crop = True
  c.augment.flip = True
  c.model.name = "resnet20"
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (80, 120, 160)
  c.schedule.factor = 0.1
  c.checkpoint.keep_best = False
  c.log_every_steps = 100
  return c
