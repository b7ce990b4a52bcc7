"""Demo: a small Euler ResNet-8 on the bundled 8x8 digits, about a minute on a CPU.

``jaxdefense demo`` trains this config twice, with the Euler step (ResNet) and with
the Euler-Maruyama step (EnResNet, ``model.step.name=euler_maruyama``).
"""

from __future__ import annotations

import ml_collections

from jaxdefense.configs._base import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.dataset = "digits"
  c.validation_size = 0
  c.batch_size = 64
  c.eval_batch_size = 360
  c.epochs = 12
  c.augment.enabled = False  # 8x8 digits: shifts by a pixel hurt more than they help
  c.augment.pad = 1
  c.augment.flip = False
  c.model.name = "resnet8"
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "cosine"
  c.checkpoint.max_to_keep = 1
  c.checkpoint.keep_best = False
  c.log_every_steps = 20
  return c
