"""ResNet-8 on the bundled 8x8 digits with a validation split and best checkpoint."""

from __future__ import annotations

import ml_collections

from jaxdefense.configs._base import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.dataset = "digits"
  c.validation_size = 200
  c.batch_size = 64
  c.eval_batch_size = 200
  c.epochs = 30
  c.augment.enabled = True
  c.augment.pad = 1  # shift by at most one pixel, no flip (mirrored digits change meaning)
  c.augment.flip = False
  c.model.name = "resnet8"
  c.optimizer.learning_rate = 0.1
  c.schedule.name = "piecewise"
  c.schedule.milestones = (15, 25)
  c.schedule.factor = 0.1
  c.log_every_steps = 20
  return c
