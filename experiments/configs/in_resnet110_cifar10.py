"""In-ResNet-110 on CIFAR-10 (damped step, natural training).

Pre-activation ResNet-110 whose blocks (except the first and the two stage transitions)
use ``x_{n+1} = (1 - relu(lambda_n)) x_n + f_n(x_n)``, lambda_n ~ U(0.2, 0.25) at
initialisation; the config argument picks the variant (``relu`` default, ``lambda``,
``sig``, ``gating``, ``gating_sig``): ``--config in_resnet110_cifar10:lambda``.
Weight decay 1e-4 (on lambda too), SGD 0.1 divided by 10 at epochs 80, 120, 160 of 200.
"""

from __future__ import annotations

from jaxdefense.configs import base_config


def get_config(kind: str | None = None):
  c = base_config()
  c.dataset = "cifar10"
  c.validation_size = 5000
  c.batch_size = 128
  c.epochs = 200
  c.model.name = "preact_resnet110"
  c.model.step.name = "damped"
  c.model.step.kind = kind or "relu"
  c.model.step.init_range = (0.2, 0.25)
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (80, 120, 160)
  c.log_every_steps = 100
  return c
