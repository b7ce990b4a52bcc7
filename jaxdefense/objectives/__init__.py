"""Training objectives: ``loss, aux = objective(apply_fn, x, y, key)``.

>>> objective = from_config({"name": "pgd", "eps": 8/255, "step_size": 2/255, "steps": 10})
>>> loss, aux = objective(lambda x: model.apply(variables, x, train=True), x, y, key)

An objective is a frozen dataclass (hashable, so it can be a static argument of
``jax.jit``).  ``apply_fn`` is the model in train mode with the current parameters:
either ``apply_fn(x) -> logits`` or the training loop's ``apply_fn(x, *, key=None) ->
(logits, model_state)`` (then ``aux["model_state"]`` carries the new batch statistics
and attack iterations draw fresh model noise).  ``aux["logits"]`` holds the logits of
the examples the loss trains on.  Inner maximisations are cut from the parameter
gradient (``stop_gradient``).  The adversarial objectives also accept
``attack_logits_fn=`` to run the inner attack on another view of the model (e.g.
eval-mode batch norm).
"""

from jaxdefense.objectives._adversarial import Natural as Natural
from jaxdefense.objectives._adversarial import Objective as Objective
from jaxdefense.objectives._adversarial import PGDAdversarial as PGDAdversarial
from jaxdefense.objectives._adversarial import TRADES as TRADES
from jaxdefense.objectives._adversarial import frozen as frozen
from jaxdefense.objectives._adversarial import kl_divergence as kl_divergence
from jaxdefense.objectives._adversarial import split_output as split_output
from jaxdefense.objectives._certified import CertifiedObjective as CertifiedObjective
from jaxdefense.objectives._certified import Lin as Lin
from jaxdefense.objectives._registry import from_config as from_config
from jaxdefense.objectives._registry import get as get
from jaxdefense.objectives._registry import names as names
from jaxdefense.objectives._registry import register as register

__all__ = [
    "CertifiedObjective", "Lin", "Natural", "Objective", "PGDAdversarial", "TRADES", "from_config", "frozen", "get",
    "kl_divergence", "names", "register", "split_output",
]
