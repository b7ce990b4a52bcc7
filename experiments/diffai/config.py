"""DiffAI at CPU scale: Fashion-MNIST, eps = 0.1, ConvSmall and ConvMed.

Certified (IBP-style) training with the DiffAI "Baseline" scheme of table 2,
``Mix(Point, Sub(Lin(eps ramp), Box), Lin(0, 0.5, ...))``, shortened to a few epochs so
that both networks train and evaluate in about 15 minutes on a 2-core CPU.

  python experiments/diffai/run.py                       # both networks (one cell each)
  python experiments/diffai/run.py --cell conv_med --seed 0   # one network
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist"
  c.model = "conv_small"      # the study's cells set conv_small / conv_med
  c.eps = 0.1                 # l-inf radius for training and evaluation, [0, 1] pixels
  c.train_eps_factor = 1.0    # train at factor * eps
  c.domain = "box"            # training domain (IBP)
  c.epochs = 6
  c.batch_size = 100
  c.learning_rate = 1e-3      # Adam, as DiffAI; cosine decay to 0 over the run
  c.weight_decay = 0.0
  c.hold_epochs = 0.5         # eps(t) = 0 and mix(t) = 0 for this many epochs (warm-up)
  c.ramp_epochs = 3.0         # then linear ramps of eps to 1 * eps and mix to final_mix
  c.final_mix = 0.5           # weight of the worst-case loss at the end (IBP's 1 - kappa)
  c.seed = 0
  # Evaluation: clean, PGD and certified (box) on the whole test set; the zonotope
  # domains (input correlated, so ~785x the cost of a forward pass) on a prefix.
  c.pgd_steps = 20
  c.pgd_restarts = 1
  c.eval_batch_size = 500
  c.zonotope_examples = 1000
  c.zonotope_batch_size = 50
  c.deepz_examples = 500
  c.deepz_batch_size = 10
  c.normalize = ((0.2860,), (0.3530,))   # Fashion-MNIST channel statistics
  return c
