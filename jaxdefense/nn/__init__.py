"""Layers that run on concrete arrays and on abstract values.

The same layer objects serve concrete execution (training, evaluation), noisy and
perturbed execution (through the step rules of :mod:`jaxdefense.dynamics`) and
abstract execution: when a layer receives an :class:`AbstractValue` (a ``Box`` or a
``HybridZonotope`` from :mod:`jaxdefense.certify`) it propagates the set through the
same linear function it applies to arrays.
"""

from jaxdefense.nn._abstract import AbstractValue as AbstractValue
from jaxdefense.nn._abstract import is_abstract as is_abstract
from jaxdefense.nn._layers import AvgPool as AvgPool
from jaxdefense.nn._layers import BatchNorm as BatchNorm
from jaxdefense.nn._layers import Conv as Conv
from jaxdefense.nn._layers import Dense as Dense
from jaxdefense.nn._layers import Flatten as Flatten
from jaxdefense.nn._layers import GlobalAvgPool as GlobalAvgPool
from jaxdefense.nn._layers import Normalize as Normalize
from jaxdefense.nn._layers import PadShortcut as PadShortcut
from jaxdefense.nn._layers import ReLU as ReLU
from jaxdefense.nn._layers import Sequential as Sequential
from jaxdefense.nn._layers import Sigmoid as Sigmoid
from jaxdefense.nn._layers import Tanh as Tanh
from jaxdefense.nn._layers import add as add
from jaxdefense.nn._layers import check_mean_std as check_mean_std
from jaxdefense.nn._layers import avg_pool as avg_pool
from jaxdefense.nn._layers import concatenate as concatenate
from jaxdefense.nn._layers import flatten as flatten
from jaxdefense.nn._layers import global_avg_pool as global_avg_pool
from jaxdefense.nn._layers import he_normal as he_normal
from jaxdefense.nn._layers import linear_map as linear_map
from jaxdefense.nn._layers import relu as relu
from jaxdefense.nn._layers import scale_shift as scale_shift
from jaxdefense.nn._layers import sigmoid as sigmoid
from jaxdefense.nn._layers import tanh as tanh
from jaxdefense.nn._layers import torch_default as torch_default
from jaxdefense.nn._skew import SkewSymmetricConv as SkewSymmetricConv
from jaxdefense.nn._skew import SkewSymmetricDense as SkewSymmetricDense
from jaxdefense.nn._skew import skew_kernel as skew_kernel
from jaxdefense.nn._abstract_layers import Concretize as Concretize
from jaxdefense.nn._abstract_layers import CorrelateAll as CorrelateAll
from jaxdefense.nn._abstract_layers import CorrelateFixed as CorrelateFixed
from jaxdefense.nn._abstract_layers import CorrelateMaxK as CorrelateMaxK
from jaxdefense.nn._abstract_layers import CorrelateMaxPool as CorrelateMaxPool
from jaxdefense.nn._abstract_layers import DecorrelateAll as DecorrelateAll
from jaxdefense.nn._abstract_layers import DecorrelateMinK as DecorrelateMinK
from jaxdefense.nn._abstract_layers import DeepLoss as DeepLoss
from jaxdefense.nn._abstract_layers import deep_loss as deep_loss

__all__ = [
    # abstract values (certification): the protocol a domain implements
    "AbstractValue", "is_abstract",
    # layers: arrays and abstract values alike
    "AvgPool", "BatchNorm", "Conv", "Dense", "Flatten", "GlobalAvgPool", "Normalize",
    "PadShortcut", "ReLU", "Sequential", "Sigmoid", "Tanh",
    # functions behind the layers, for custom layers that stay certifiable
    "add", "avg_pool", "check_mean_std", "concatenate", "flatten", "global_avg_pool",
    "linear_map", "relu",
    "scale_shift", "sigmoid", "tanh",
    # initialisers
    "he_normal", "torch_default",
    # skew-symmetric (stable) vector fields of ODE blocks (SONet)
    "SkewSymmetricConv", "SkewSymmetricDense", "skew_kernel",
    # abstract-only layers of DiffAI (identity on arrays) and the deep loss
    "Concretize", "CorrelateAll", "CorrelateFixed", "CorrelateMaxK", "CorrelateMaxPool",
    "DecorrelateAll", "DecorrelateMinK", "DeepLoss", "deep_loss",
]
