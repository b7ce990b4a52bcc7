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

from jaxdefense import _xla_flags

_xla_flags.install_on_import()  # before any module below can start JAX's backend

from jaxdefense import data  # noqa: E402
from jaxdefense import dynamics  # noqa: E402
from jaxdefense import nn  # noqa: E402
from jaxdefense import models  # noqa: E402
from jaxdefense import attacks  # noqa: E402
from jaxdefense import certify  # noqa: E402
from jaxdefense import objectives  # noqa: E402
from jaxdefense import training  # noqa: E402
from jaxdefense import analysis  # noqa: E402
from jaxdefense import evaluation  # noqa: E402
from jaxdefense import configs  # noqa: E402

__version__ = "0.1.0"
