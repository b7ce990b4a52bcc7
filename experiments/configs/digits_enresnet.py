"""CPU-scale EnResNet: an ensemble of two noisy pre-activation ResNet-8s on digits.

The small twin of ``enresnet_paper:cifar10,en2_resnet20`` (natural training; switch to
adversarial training with ``--config.objective.name=pgd`` plus its options once
wanted), a few minutes on a laptop CPU.
"""

from __future__ import annotations

from jaxdefense.configs import base_config


def get_config(members: str | None = None):
  c = base_config()
  c.dataset = "digits"
  c.validation_size = 200
  c.batch_size = 64
  c.eval_batch_size = 200
  c.epochs = 20
  c.augment.enabled = True
  c.augment.pad = 1
  c.augment.flip = False
  c.model.name = "preact_resnet8"
  c.model.step.name = "euler_maruyama"
  c.model.step.coef = 0.1
  c.ensemble.size = int(members) if members else 2
  c.optimizer.learning_rate = 0.1
  c.schedule.name = "piecewise"
  c.schedule.milestones = (10, 15)
  c.log_every_steps = 20
  return c
