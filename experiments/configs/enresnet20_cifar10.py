"""EnResNet-20 on CIFAR-10 with PGD adversarial training (Wang et al., EnResNet).

Pre-activation ResNet-20 with the Euler-Maruyama step (noise coefficient a = 0.1, noise
in training and at test time), ``En_n`` ensemble of ``n`` independent members (``n``
is the config argument: ``--config enresnet20_cifar10:5`` for En5ResNet20), PGD-AT with
eps 8/255 and 10 steps of 2/255, SGD 0.1 / momentum 0.9 / PyTorch weight decay 5e-4,
divided by 10 at epochs 80, 120, 160 of 200, batch 128, 45k/5k split with the best
validation checkpoint.
"""

from __future__ import annotations

from jaxdefense.configs import base_config


def get_config(members: str | None = None):
  c = base_config()
  c.dataset = "cifar10"
  c.validation_size = 5000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = 200
  c.augment.pad = 4
  c.augment.flip = True
  c.model.name = "preact_resnet20"
  c.model.step.name = "euler_maruyama"
  c.model.step.coef = 0.1
  c.model.step.std = "batch"
  c.ensemble.size = int(members) if members else 1
  c.objective = {"name": "pgd", "eps": 8 / 255, "step_size": 2 / 255, "steps": 10}
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (80, 120, 160)
  c.schedule.factor = 0.1
  c.checkpoint.keep_best = True
  c.log_every_steps = 100
  return c
