"""Model zoo: presets by name, built from :mod:`jaxdefense.nn` and :mod:`jaxdefense.dynamics`.

>>> model = create("resnet20", num_classes=10)
>>> model = create("preact_resnet20", step=jaxdefense.dynamics.EulerMaruyama(coef=0.1))

Every model is a ``flax.linen.Module`` called as ``model.apply(variables, x,
train=False, rngs={"noise": key})`` on NHWC images in [0, 1].  Callers above the zoo
(evaluation, attacks, objectives, experiments) use one contract instead,
:func:`bind` -> :class:`ModelFn` ("a model ready to call": ``m(x, key) -> logits``,
``m.apply(x, key) -> (logits, state)``).
"""

from jaxdefense.models._registry import count_params as count_params
from jaxdefense.models._registry import create as create
from jaxdefense.models._registry import describe as describe
from jaxdefense.models._registry import names as names
from jaxdefense.models._registry import register as register
from jaxdefense.models._resnet import MLP as MLP
from jaxdefense.models._resnet import ResNet as ResNet
from jaxdefense.models._resnet import ResidualBlock as ResidualBlock
from jaxdefense.models._ensemble import Ensemble as Ensemble
from jaxdefense.models._ensemble import member_variables as member_variables
from jaxdefense.models._enresnet import average_logits as average_logits
from jaxdefense.models._enresnet import enresnet as enresnet
from jaxdefense.models._sonet import ODE_FIELDS as ODE_FIELDS
from jaxdefense.models._sonet import SONet as SONet  # also registers the sonet presets
from jaxdefense.models._sonet import fixed_step_twin as fixed_step_twin
from jaxdefense.models._sonet import with_solver as with_solver
from jaxdefense.models._diffai import DiffAINet as DiffAINet  # also registers the DiffAI zoo
from jaxdefense.models._bound import ModelFn as ModelFn
from jaxdefense.models._bound import bind as bind
from jaxdefense.models._bound import check_compute_dtype as check_compute_dtype
from jaxdefense.models._bound import is_stochastic as is_stochastic
from jaxdefense.models._stepped import step_of as step_of
from jaxdefense.models._stepped import with_step as with_step

__all__ = [
    "DiffAINet", "Ensemble", "MLP", "ModelFn", "ODE_FIELDS", "ResNet", "ResidualBlock",
    "SONet", "average_logits", "bind", "check_compute_dtype", "count_params", "create",
    "describe", "enresnet",
    "fixed_step_twin", "is_stochastic", "member_variables", "names", "register", "step_of",
    "with_solver", "with_step",
]
