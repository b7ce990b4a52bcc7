"""SONet on CIFAR-10 at the abstract's scale (for a GPU): the ``paper`` run of
``experiments/sonet/``.

The abstract: "replacing only the first layer of a ResNet by such a ODE block ... under
PGD-20 (l_inf = 0.031) attack on CIFAR-10 dataset, it achieves 91.57% natural accuracy and
62.35% robust accuracy", with natural training.  We train ``sonet_resnet20`` (the
pre-activation ResNet-20 with its first block replaced by a skew-symmetric conv ODE block,
Dopri5 at rtol = atol = 1e-3) or, as the baseline, ``preact_resnet20``; natural training,
SGD 0.1 / momentum 0.9 / weight decay 5e-4, divided by 10 at epochs 100 and 150 of 200,
batch 128, random crop and flip, 5,000 training images held out for checkpoint selection.
The abstract does not give the depth, width or schedule: these are ours.

The argument picks the model: ``sonet`` (default) or ``resnet``::

  jaxdefense train --config experiments/configs/sonet_cifar10.py:sonet --workdir W
  jaxdefense attack --workdir W --suite "pgd:steps=20,step_size=2/255" --eps 0.031
"""

from __future__ import annotations

from jaxdefense.configs import base_config

_MODELS = {"sonet": "sonet_resnet20", "resnet": "preact_resnet20"}


def get_config(arg: str | None = None):
  """The config for ``arg`` in ``sonet`` (default) / ``resnet``."""
  arg = arg or "sonet"
  if arg not in _MODELS:
    raise ValueError(f"sonet_cifar10: the argument must be one of {list(_MODELS)}; got "
                     f"{arg!r}.")
  c = base_config()
  c.dataset = "cifar10"
  c.validation_size = 5000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = 200
  c.augment.enabled = True
  c.augment.pad = 4
  c.augment.crop = True
  c.augment.flip = True
  c.model.name = _MODELS[arg]
  c.objective = {"name": "natural"}
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (100, 150)
  c.checkpoint.keep_best = True
  c.log_every_steps = 100
  return c
