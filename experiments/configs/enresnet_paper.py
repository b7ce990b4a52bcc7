"""Every model of the EnResNet paper's Tables 1 and 3, with its training recipe.

  jaxdefense train --config enresnet_paper:cifar10,en2_resnet20 --workdir runs/en2_r20
  jaxdefense train --config enresnet_paper:cifar100,resnet44 --workdir runs/c100_r44

The argument is ``DATASET,MODEL[,COEF]``: DATASET is ``cifar10`` or ``cifar100``; MODEL is
one of :data:`MODELS` (``resnet20`` is the noise-free baseline, ``en<n>_<net>`` the
``En_n`` ensemble of noisy nets, ``swe<n>_resnet20`` the shared-weights ensemble of
Table 7, ``ens2_resnet20`` the plain two-member ensemble without noise of section
3.3); COEF overrides the noise coefficient a (default 0.1; Table 6 uses 0.05 to 0.8).

Recipe (paper section 3.1 and the authors' code): pre-activation ResNets for CIFAR with
the Euler-Maruyama step ``x + F(x) + a * std(x + F(x)) * N(0, I)`` (std over the batch
tensor, noise also at test time); PGD adversarial training, eps 8/255, 10 steps of
2/255, uniform random start; SGD lr 0.1, momentum 0.9, weight decay 5e-4 (L2), divided
by 10 at epochs 80, 120 and 160 of 200; batch 128; random crop (pad 4) and flip; 45k/5k
train/validation split, best validation checkpoint.  Evaluate with ``jaxdefense attack
--suite enresnet`` (FGSM, IFGSM-20, C&W with EOT over 5 draws).
"""

from __future__ import annotations

from jaxdefense.configs.presets import cifar10_resnet20

#: MODEL (the paper's name) -> the model zoo's preset (jaxdefense.models.names()).  The
#: presets carry the step rule and the ensemble (see jaxdefense/models/_enresnet.py), so
#: an EnResNet is written down one way only.
MODELS = {
    "resnet20": "preact_resnet20",
    "en1_resnet20": "en_preact_resnet20",
    "en2_resnet20": "en2_preact_resnet20",
    "en5_resnet20": "en5_preact_resnet20",
    "swe2_resnet20": "swe2_preact_resnet20",
    "swe5_resnet20": "swe5_preact_resnet20",
    "ens2_resnet20": "ens2_preact_resnet20",
    "resnet44": "preact_resnet44",
    "en1_resnet44": "en_preact_resnet44",
    "en2_resnet44": "en2_preact_resnet44",
    "resnet110": "preact_resnet110",
    "en2_resnet110": "en2_preact_resnet110",
    "en1_wrn34_10": "en_wrn34_10",
}

DATASETS = ("cifar10", "cifar100")


def get_config(arg: str | None = None):
  parts = [p.strip() for p in (arg or "cifar10,en2_resnet20").split(",")]
  if len(parts) not in (2, 3) or parts[0] not in DATASETS or parts[1] not in MODELS:
    raise ValueError(
        f"enresnet_paper: argument must be DATASET,MODEL[,COEF] with DATASET in "
        f"{DATASETS} and MODEL in {sorted(MODELS)}; got {arg!r}.")
  dataset, name = parts[0], parts[1]
  c = cifar10_resnet20.get_config()  # SGD 0.1 / 0.9 / 5e-4, /10 at 80, 120, 160 of 200
  c.dataset = dataset
  c.validation_size = 5000
  c.checkpoint.keep_best = True
  c.model.name = MODELS[name]
  if len(parts) == 3:
    if not MODELS[name].startswith(("en", "swe")):
      raise ValueError(f"enresnet_paper: {name} has no noise, so a noise coefficient "
                       f"({parts[2]}) does not apply.")
    c.model.step.coef = float(parts[2])  # completes the preset's Euler-Maruyama rule
  c.objective = {"name": "pgd", "eps": 8 / 255, "step_size": 2 / 255, "steps": 10}
  return c
