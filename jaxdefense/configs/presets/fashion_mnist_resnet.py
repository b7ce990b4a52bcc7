"""ResNet-20 on Fashion-MNIST (28x28 grey-scale), SGD with epoch milestones."""

from __future__ import annotations

import ml_collections

from jaxdefense.configs._base import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.dataset = "fashion_mnist"
  c.validation_size = 5000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = 30
  c.augment.enabled = True
  c.augment.pad = 2
  c.augment.flip = False
  c.model.name = "resnet20"
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (15, 25)
  c.log_every_steps = 100
  return c
