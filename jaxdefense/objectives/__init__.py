"""Training objectives: ``loss, aux = objective(model, x, y, key)``.

>>> objective = from_config({"name": "pgd", "eps": 8/255, "step_size": 2/255, "steps": 10})
>>> model = jaxdefense.models.bind(module, variables, train=True, rngs=rngs)
>>> loss, aux = objective(model, x, y, key)

An objective is a frozen dataclass (hashable, so it can be a static argument of
``jax.jit``).  ``model`` is a :class:`~jaxdefense.models.ModelFn` in training mode with
the current parameters (``models.ModelFn.wrap(f)`` turns a plain ``f(x) -> logits``
into one); every forward pass is ``model.apply(x, key=None) -> (logits, model_state)``.
``aux["logits"]`` holds the logits of the examples the loss trains on and
``aux["model_state"]`` the state of that pass (new batch statistics).  Inner
maximisations run on ``model.frozen(...)`` (cut from the parameter gradient), in
evaluation mode (``model.with_mode(False)``) for ``attack_mode="eval"``, with one fresh
noise draw per attack iteration for a stochastic model.
"""

from jaxdefense.objectives._adversarial import Natural as Natural
from jaxdefense.objectives._adversarial import Objective as Objective
from jaxdefense.objectives._adversarial import PGDAdversarial as PGDAdversarial
from jaxdefense.objectives._adversarial import TRADES as TRADES
from jaxdefense.objectives._adversarial import kl_divergence as kl_divergence
from jaxdefense.objectives._certified import CertifiedObjective as CertifiedObjective
from jaxdefense.objectives._certified import Lin as Lin
from jaxdefense.objectives._lad import LAD as LAD
from jaxdefense.objectives._registry import from_config as from_config
from jaxdefense.objectives._registry import get as get
from jaxdefense.objectives._registry import names as names
from jaxdefense.objectives._registry import register as register
from jaxdefense.objectives._language import BiSample as BiSample
from jaxdefense.objectives._language import Box as Box
from jaxdefense.objectives._language import DeepLossWeight as DeepLossWeight
from jaxdefense.objectives._language import DeepZ as DeepZ
from jaxdefense.objectives._language import DiffAIObjective as DiffAIObjective
from jaxdefense.objectives._language import Goal as Goal
from jaxdefense.objectives._language import HBox as HBox
from jaxdefense.objectives._language import IFGSM as IFGSM
from jaxdefense.objectives._language import Mix as Mix
from jaxdefense.objectives._language import Normal as Normal
from jaxdefense.objectives._language import Point as Point
from jaxdefense.objectives._language import Sample as Sample
from jaxdefense.objectives._language import Sub as Sub
from jaxdefense.objectives._language import Uniform as Uniform
from jaxdefense.objectives._language import Until as Until
from jaxdefense.objectives._language import Zonotope as Zonotope
from jaxdefense.objectives._parser import LanguageError as LanguageError
from jaxdefense.objectives._parser import PRESETS as PRESETS
from jaxdefense.objectives._parser import parse as parse

__all__ = [
    "CertifiedObjective", "LAD", "Lin", "Natural", "Objective", "PGDAdversarial", "TRADES",
    "from_config", "get", "kl_divergence", "names", "register",
    # DiffAI's training language
    "BiSample", "Box", "DeepLossWeight", "DeepZ", "DiffAIObjective", "Goal", "HBox", "IFGSM",
    "LanguageError", "Mix", "Normal", "PRESETS", "Point", "Sample", "Sub", "Uniform", "Until",
    "Zonotope", "parse",
]
