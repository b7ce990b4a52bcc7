"""jaxdefense: robust deep learning seen through differential equations, in JAX/Flax.

Subpackages (imports flow downward only)::

  data        data sets as NumPy arrays, batch iterators, augmentation, corruptions
  dynamics    residual step rules (Euler, EulerMaruyama, Damped, ...) and diffrax blocks
  nn          layers that run on arrays and on abstract values (Box, HybridZonotope)
  models      the model zoo (`models.create(name)`), ensembles
  attacks     adversarial attacks as pure functions of (logits_fn, x, y, key)
  certify     abstract domains and certified bounds
  objectives  training losses (natural, PGD-AT, TRADES, certified)
  training    TrainState, jit'd steps, the training loop, checkpoints, sharding
  analysis    learned damping, loss landscapes, Jacobian / Lyapunov spectra
  evaluation  clean / robust / certified / corruption tables, diagnostics
  configs     ml_collections configs by name or path
"""

from jaxdefense import data
from jaxdefense import dynamics
from jaxdefense import nn
from jaxdefense import models
from jaxdefense import attacks
from jaxdefense import certify
from jaxdefense import objectives
from jaxdefense import training
from jaxdefense import analysis
from jaxdefense import evaluation
from jaxdefense import configs

__version__ = "0.1.0"
