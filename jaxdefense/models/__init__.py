"""Model zoo: presets by name, built from :mod:`jaxdefense.nn` and :mod:`jaxdefense.dynamics`.

>>> model = create("resnet20", num_classes=10)
>>> model = create("preact_resnet20", step=jaxdefense.dynamics.EulerMaruyama(coef=0.1))

Every model is a ``flax.linen.Module`` called as ``model.apply(variables, x,
train=False, rngs={"noise": key})`` on NHWC images in [0, 1].
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
from jaxdefense.models import _diffai  # registers the DiffAI zoo
