"""In-ResNet on CIFAR-10 as the paper trains it (the ``paper`` study of
``experiments/inresnet/``).

Pre-activation ResNet-110 (basic blocks) or -164 (bottleneck blocks), natural training,
SGD 0.1 / momentum 0.9 / weight decay 1e-4 on every parameter (damping coefficients
included, as the authors), divided by 10 at epochs 80 and 120 of 160, batch 128, random
crop and flip, 5,000 training images held out for checkpoint selection.  Damped blocks
(all but the first block and the two stage transitions) use ``dynamics.Damped`` with the
authors' storage and initial coefficients: U(0.2, 0.25) at depth 110 and U(0.1, 0.2) at
depth 164.

The argument is ``DEPTH:KIND`` (default ``110:relu``): DEPTH 110 or 164, KIND ``resnet``
(the baseline, no damping) or a ``Damped`` kind (``relu`` = In-ResNet, ``lambda``,
``sig``, ``gating``, ``gating_sig``)::

  jaxdefense train --config experiments/configs/in_resnet_cifar10.py:164:lambda --workdir W

The authors' "pretrain" option (a ResNet first, then the damping switched on) is a warm
start from the ResNet's run: the damping coefficients keep their initial values, every
other array is copied::

  jaxdefense train --config experiments/configs/in_resnet_cifar10.py:110:resnet --workdir R
  jaxdefense train --config experiments/configs/in_resnet_cifar10.py:110:relu --workdir W \
      --config.init.from_workdir=R
"""

from __future__ import annotations

from jaxdefense.configs import base_config

_KINDS = ("resnet", "relu", "lambda", "sig", "gating", "gating_sig")
_INIT = {110: (0.2, 0.25), 164: (0.1, 0.2)}


def get_config(arg: str | None = None):
  """The config for ``arg = "DEPTH:KIND"`` (default ``"110:relu"``)."""
  depth_text, _, kind = (arg or "110").partition(":")
  kind = kind or "relu"
  if depth_text not in ("110", "164") or kind not in _KINDS:
    raise ValueError(f"in_resnet_cifar10: the argument must be DEPTH:KIND with DEPTH 110 or "
                     f"164 and KIND one of {list(_KINDS)}; got {arg!r}.")
  depth = int(depth_text)
  c = base_config()
  c.dataset = "cifar10"
  c.validation_size = 5000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = 160
  c.augment.enabled = True
  c.augment.pad = 4
  c.augment.crop = True
  c.augment.flip = True
  c.model.name = f"preact_resnet{depth}"
  if kind == "resnet":
    c.model.step.name = "euler"
  else:
    c.model.step.name = "damped"
    c.model.step.kind = kind
    c.model.step.init_range = _INIT[depth]
  c.objective = {"name": "natural"}
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (80, 120)
  c.checkpoint.keep_best = True
  c.log_every_steps = 100
  return c
