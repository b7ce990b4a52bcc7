"""The DiffAI network zoo (Mirman, Singh & Vechev 2019, appendix D, tables 6, 8 and 11).

Every network is one class, :class:`DiffAINet`, written like :class:`~jaxdefense.models.
ResNet`: fields say how many layers of each kind there are, and the layers are the
library's own (:mod:`jaxdefense.nn` convolutions, dense layers and abstract layers, and
the :class:`~jaxdefense.models.ResidualBlock` of the ResNet zoo).  So a residual DiffAI
net takes a residual ``step`` rule like every ResNet (``Euler`` by default;
``dynamics.Damped`` gives a certifiable In-ResNet, ``EulerMaruyama`` a noisy one), and
per-block LAD ``perturbations``.  Shapes come from the input, so each preset works on
28x28x1 (MNIST, Fashion-MNIST) and 32x32x3 (CIFAR-10) images, and on abstract inputs
(``Box``, ``HybridZonotope``) without a second definition.

Every network ends, as in the paper ("for all of our networks, we use CorrelateAll
before the last linear layer during both training and testing"), with
``CorrelateAll(only_train=False)`` and ``Dense(num_classes)``; ``correlate_last=False``
removes the CorrelateAll.  All convolutions and dense layers have biases (the counts of
tables 8 and 11 need them) and PyTorch's default initialisation, as DiffAI.

Registered names and sizes (neurons = ReLU outputs per example; parameters), checked in
``tests/test_diffai_zoo.py``:

================== ========================= ========================================
name               MNIST 28x28x1 (table 8)   CIFAR 32x32x3 (table 11 / table 3, 6)
================== ========================= ========================================
ffnn               500 / 119,910             500 / 348,710
conv_small         3,604 / 89,606            4,852 / 125,318
conv_med           4,804 / 166,406           6,244 / 214,918
conv_big           48,064 / 1,974,762        62,464 / 2,466,858
conv_large_ibp     175,816 / 5,426,402       229,576 / 6,963,554
truncated_vgg      151,040 / 13,109,706      197,120 / 17,043,018
resnet_tiny        (any input)               311,796 / 16,467,958 (see below)
skipnet18                                    558,080 / 15,626,634
diffai_resnet18                              558,080 / 15,626,634 ("558k / 15m")
diffai_resnet34                              967,680 / 25,731,082 ("967k / 25m")
================== ========================= ========================================

Readings of ambiguous text (documented where the table alone does not pin it down):

* ConvLargeIBP's hidden dense layer has 200 units (not IBP's 512): only 200 reproduces
  both tables' parameter *and* neuron counts (5,426,402 / 175,816 on MNIST).
* TruncatedVGG downsamples with a stride-2 third convolution (no max pooling: the
  paper's networks have none, and the counts are the same either way).
* ResNet-Tiny follows figure 6 (five wide blocks, 16-32-32-32-32 channels, FC 500),
  which reproduces table 6's 311,796 neurons exactly.  Table 6 prints 18,415,231
  parameters ("18m" in table 3 and figure 1), which no reading can give: every layer of
  the figure has an even parameter count, so the sum cannot be odd.  Figure 6 gives
  16,467,958 and that is what is built.
* SkipNet-18 follows figure 9 (three residual connections are drawn, the text says
  four); the figure reproduces table 6's 558,080 neurons and 15,626,634 parameters.
* FewCombo and ManyFixed follow figures 7 and 8 (``only_train=True`` on their layers,
  ``Concretize`` = DecorrelateAll), which agree with section 5.2's prose.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import numpy as np

from jaxdefense.dynamics import Euler
from jaxdefense.models._fields import check_fields
from jaxdefense.models._registry import register
from jaxdefense.models._resnet import ResidualBlock
from jaxdefense.nn import _abstract_layers as A
from jaxdefense.nn import _layers as L

__all__ = ["Abstract", "DiffAINet", "NAMES"]

_ABSTRACT_LAYERS = {
    "correlate_all": A.CorrelateAll,
    "correlate_fixed": A.CorrelateFixed,
    "correlate_max_k": A.CorrelateMaxK,
    "correlate_max_pool": A.CorrelateMaxPool,
    "decorrelate_all": A.DecorrelateAll,
    "concretize": A.Concretize,
    "decorrelate_min_k": A.DecorrelateMinK,
    "deep_loss": A.DeepLoss,
}

# Residual blocks of the paper's figures, as fields of the shared ResidualBlock:
# no batch norm, biases, PyTorch's initialisation; "wide" (ResNet-Tiny, figure 6) always
# projects its shortcut with a 1x1 convolution, "basic" (figures 9, 12, 13) projects
# only when the block changes resolution or width.
_BLOCKS = {
    "wide": {"kind": "basic", "shortcut": "conv_always"},
    "basic": {"kind": "basic", "shortcut": "conv"},
}


@dataclasses.dataclass(frozen=True)
class Abstract:
  """An abstract layer of :mod:`jaxdefense.nn` by name and keyword arguments.

  A hashable description, so that it can be a field of :class:`DiffAINet` and be
  written in a config: ``Abstract.of("correlate_max_k", k=32, only_train=True)``.

  Attributes:
    kind: one of ``correlate_all``, ``correlate_fixed``, ``correlate_max_k``,
      ``correlate_max_pool``, ``decorrelate_all``, ``concretize``,
      ``decorrelate_min_k``, ``deep_loss`` (the layers of
      :mod:`jaxdefense.nn._abstract_layers`).
    kwargs: sorted ``(name, value)`` pairs, the layer's fields.

  Raises:
    ValueError: an unknown ``kind``.
  """
  kind: str
  kwargs: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.kind not in _ABSTRACT_LAYERS:
      raise ValueError(f"unknown abstract layer {self.kind!r}; expected one of "
                       f"{sorted(_ABSTRACT_LAYERS)}.")

  @classmethod
  def of(cls, kind: str, **kwargs: Any) -> "Abstract":
    """``Abstract(kind, sorted(kwargs.items()))``; raises ``ValueError`` on a bad kind."""
    return cls(kind, tuple(sorted(kwargs.items())))

  def build(self) -> nn.Module:
    """The :mod:`jaxdefense.nn` layer, e.g. ``CorrelateMaxK(k=32, only_train=True)``.

    Raises:
      TypeError: a keyword the layer does not take.
    """
    return _ABSTRACT_LAYERS[self.kind](**dict(self.kwargs))


def _check_int_tuples(value: Any, name: str, length: int, what: str) -> None:
  for item in value:
    if (not isinstance(item, (tuple, list)) or len(item) != length
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
                   for v in item)):
      raise ValueError(f"DiffAINet.{name}: every entry must be {what} (ints >= 0); "
                       f"got {item!r}.")


class DiffAINet(nn.Module):
  """DiffAI's feed-forward and residual networks.

  Layout: ``[Normalize] -> convs (conv-ReLU) -> blocks (each a ResidualBlock, then
  block_convs conv-ReLU layers) -> flatten -> dense (dense-ReLU) -> [CorrelateAll] ->
  Dense(num_classes)``, with the abstract layers of ``abstract`` inserted at named
  points.  Every convolution and dense layer has a bias and PyTorch's default
  initialisation (:data:`jaxdefense.nn.torch_default`).

  Attributes:
    convs: leading conv-ReLU layers, ``(features, kernel, stride, padding)`` each.
    blocks: residual blocks, ``(features, stride)`` each.
    block: ``"basic"`` (``relu(step(shortcut(x), conv3x3(relu(conv3x3_s(x)))))`` with an
      identity shortcut, or a strided 1x1 convolution when the block changes
      resolution or width; figures 9, 12, 13) or ``"wide"`` (ResNet-Tiny's
      ``relu(step(conv1x1(x), conv3x3(relu(conv3x3(x)))))``, figure 6).
    block_convs: 3x3 conv-ReLU layers (stride 1, the block's width) after every block
      (SkipNet-18, figure 9); default 0.
    dense: hidden dense-ReLU widths.
    abstract: ``(point, Abstract)`` pairs: the abstract layer runs after ``point``, in
      the order given.  Points: ``"input"`` (after normalisation), ``"conv{i}"``,
      ``"block{i}"`` (after the block and its ``block_convs``), ``"dense{i}"``
      (0-based).  Identity on arrays.
    step: residual step rule of :mod:`jaxdefense.dynamics` for every block (default
      ``Euler()``; ``Damped(...)`` with a scalar coefficient stays certifiable), or its
      name / config dict (converted at construction).  A network without blocks
      accepts only ``Euler``.
    num_classes: output logits ``K >= 1`` (default 10).
    normalize: ``(mean, std)`` per channel (a :class:`~jaxdefense.nn.Normalize` first
      layer, so attacks and certification work in ``[0, 1]`` pixel space), or ``None``.
    correlate_last: put ``CorrelateAll(only_train=False)`` before the last layer.

  Call: ``model.apply(variables, x, train=False, perturbations=None,
  capture_states=False, rngs=...)`` with ``x`` ``[B, H, W, C]`` images (or an abstract
  value of that shape); returns logits ``[B, num_classes]`` (or ``(logits, states)``
  with every block's output when ``capture_states``).  ``perturbations``: one additive
  perturbation (or ``None``) per block, added to that block's output (LAD).  ``train``
  switches the ``only_train`` abstract layers and goes to the step rule (the networks
  have no batch norm or dropout); a noisy step needs ``rngs={"noise": key}``.

  Raises:
    ValueError: at construction, ``num_classes`` or a ``dense`` width below 1, a
      ``normalize`` std that is not finite and positive, an unknown step rule name; at
      the call, malformed ``convs`` / ``blocks`` / ``block_convs``, an unknown
      ``block`` or abstract point, a non-Euler ``step`` without blocks, a perturbation
      list of the wrong length, an input whose channels differ from those the
      variables were initialised with.
    TypeError: a non-integer ``num_classes`` or ``dense`` width.
  """
  convs: Sequence[Sequence[int]] = ()
  blocks: Sequence[Sequence[int]] = ()
  block: str = "basic"
  block_convs: int = 0
  dense: Sequence[int] = ()
  abstract: Sequence[tuple[str, Abstract]] = ()
  step: Any = Euler()
  num_classes: int = 10
  normalize: tuple[Sequence[float], Sequence[float]] | None = None
  correlate_last: bool = True

  def __post_init__(self):
    check_fields(self, positive=("num_classes",), positive_seqs=("dense",))
    super().__post_init__()

  @property
  def num_blocks(self) -> int:
    """Number of residual blocks (the length of ``perturbations``)."""
    return len(self.blocks)

  @property
  def points(self) -> tuple[str, ...]:
    """The names of the points where ``abstract`` layers can go, in network order."""
    return (("input",) + tuple(f"conv{i}" for i in range(len(self.convs)))
            + tuple(f"block{i}" for i in range(len(self.blocks)))
            + tuple(f"dense{i}" for i in range(len(self.dense))))

  def _check(self, perturbations: Sequence[Any] | None) -> None:
    _check_int_tuples(self.convs, "convs", 4, "(features, kernel, stride, padding)")
    _check_int_tuples(self.blocks, "blocks", 2, "(features, stride)")
    if self.block not in _BLOCKS:
      raise ValueError(f"DiffAINet.block must be one of {sorted(_BLOCKS)}; "
                       f"got {self.block!r}.")
    if (isinstance(self.block_convs, bool)
        or not isinstance(self.block_convs, (int, np.integer))
        or self.block_convs < 0):
      raise ValueError(f"DiffAINet.block_convs must be an int >= 0; got "
                       f"{self.block_convs!r}.")
    points = self.points
    for entry in self.abstract:
      if (not isinstance(entry, (tuple, list)) or len(entry) != 2
          or not isinstance(entry[1], Abstract)):
        raise ValueError(f"DiffAINet.abstract: every entry must be a (point, Abstract) "
                         f"pair; got {entry!r}.")
      if entry[0] not in points:
        raise ValueError(f"DiffAINet.abstract: unknown point {entry[0]!r}; this network "
                         f"has {list(points)}.")
    if not self.blocks and not isinstance(self.step, Euler):
      raise ValueError(f"DiffAINet has no residual blocks, so step={self.step!r} cannot "
                       "apply; use step=Euler() (the default).")
    if perturbations is not None and len(perturbations) != self.num_blocks:
      raise ValueError(f"perturbations must have one entry per residual block "
                       f"({self.num_blocks}); got {len(perturbations)}.")

  def _abstract_at(self, point: str, x: Any, train: bool) -> Any:
    for where, layer in self.abstract:
      if where == point:
        x = layer.build()(x, train=train)
    return x

  @nn.compact
  def __call__(self, x: Any, train: bool = False, perturbations: Sequence[Any] | None = None,
               capture_states: bool = False) -> Any:
    self._check(perturbations)
    conv = functools.partial(L.Conv, use_bias=True, kernel_init=L.torch_default)
    if self.normalize is not None:
      mean, std = self.normalize
      x = L.Normalize(tuple(mean), tuple(std))(x)
    x = self._abstract_at("input", x, train)
    for i, (features, kernel, stride, padding) in enumerate(self.convs):
      x = L.relu(conv(features, kernel, strides=stride, padding=padding)(x))
      x = self._abstract_at(f"conv{i}", x, train)
    states = []
    for i, (features, stride) in enumerate(self.blocks):
      x = ResidualBlock(
          features=features, stride=stride, step=self.step, index=i, batch_norm=False,
          use_bias=True, kernel_init=L.torch_default, name=f"block{i}",
          **_BLOCKS[self.block])(x, train, None if perturbations is None else perturbations[i])
      states.append(x)
      for _ in range(self.block_convs):
        x = L.relu(conv(features, 3, strides=1, padding=1)(x))
      x = self._abstract_at(f"block{i}", x, train)
    for i, features in enumerate(self.dense):
      if len(x.shape) > 2:
        x = L.flatten(x)
      x = L.relu(L.Dense(features)(x))
      x = self._abstract_at(f"dense{i}", x, train)
    if len(x.shape) > 2:
      x = L.flatten(x)
    if self.correlate_last:
      x = A.CorrelateAll(only_train=False)(x, train=train)
    logits = L.Dense(self.num_classes)(x)
    return (logits, states) if capture_states else logits


# ----------------------------------------------------------------------------- presets
def _train_only(point: str, kind: str, **kw: Any) -> tuple[str, Abstract]:
  return (point, Abstract.of(kind, only_train=True, **kw))


_TINY = {"convs": ((16, 3, 1, 1),), "block": "wide",
         "blocks": ((16, 1), (32, 1), (32, 1), (32, 1), (32, 1)), "dense": (500,)}


def _resnet(stage_blocks: Sequence[int]) -> dict[str, Any]:
  blocks = []
  for stage, (width, n) in enumerate(zip((64, 128, 256, 512), stage_blocks)):
    blocks += [(width, 2 if (i == 0 and stage > 0) else 1) for i in range(n)]
  return {"convs": ((64, 3, 1, 1),), "blocks": tuple(blocks), "dense": (512, 512)}


# name -> (description, DiffAINet fields)
_PRESETS: dict[str, tuple[str, Mapping[str, Any]]] = {
    "ffnn": ("DiffAI FFNN: five dense layers of 100 (tables 8, 11)",
             {"dense": (100,) * 5}),
    "conv_small": ("DiffAI ConvSmall: conv16 4x4/2, conv32 4x4/2, FC100 (tables 8, 11)",
                   {"convs": ((16, 4, 2, 0), (32, 4, 2, 0)), "dense": (100,)}),
    "conv_med": ("DiffAI ConvMed: conv16 4x4/2 pad 1, conv32 4x4/2 pad 1, FC100",
                 {"convs": ((16, 4, 2, 1), (32, 4, 2, 1)), "dense": (100,)}),
    "conv_big": ("DiffAI ConvBig: conv32, conv32/2, conv64, conv64/2, FC512 x2",
                 {"convs": ((32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)),
                  "dense": (512, 512)}),
    "conv_large_ibp": ("DiffAI ConvLargeIBP: conv64 x2, conv128/2, conv128 x2, FC200",
                       {"convs": ((64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1),
                                  (128, 3, 1, 1), (128, 3, 1, 1)), "dense": (200,)}),
    "truncated_vgg": ("DiffAI TruncatedVGG: conv64 x2, conv128/2, conv128, FC512",
                      {"convs": ((64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1),
                                 (128, 3, 1, 1)), "dense": (512,)}),
    "resnet_tiny": ("DiffAI ResNet-Tiny (figure 6): five wide blocks, FC500", _TINY),
    "resnet_tiny_few_combo": (
        "ResNet-Tiny with FewCombo abstract layers (figure 7)",
        {**_TINY, "abstract": (
            _train_only("input", "correlate_max_k", k=32),
            _train_only("conv0", "decorrelate_min_k", k=8),
            _train_only("block0", "decorrelate_min_k", k=4),
            _train_only("block1", "concretize"),
            _train_only("block4", "correlate_max_k", k=10))}),
    "resnet_tiny_many_fixed": (
        "ResNet-Tiny with ManyFixed abstract layers (figure 8)",
        {**_TINY, "abstract": (
            _train_only("input", "correlate_max_k", k=32),
            _train_only("conv0", "correlate_fixed", k=16),
            _train_only("conv0", "decorrelate_min_k", k=16),
            _train_only("block0", "correlate_fixed", k=8),
            _train_only("block0", "decorrelate_min_k", k=8),
            _train_only("block1", "correlate_fixed", k=8),
            _train_only("block1", "decorrelate_min_k", k=8),
            _train_only("block2", "correlate_fixed", k=4),
            _train_only("block2", "decorrelate_min_k", k=4),
            _train_only("block3", "concretize"))}),
    "skipnet18": ("DiffAI SkipNet-18 (figure 9)",
                  {"convs": ((64, 3, 1, 1),) * 5,
                   "blocks": ((128, 2), (256, 2), (512, 2)), "block_convs": 2,
                   "dense": (512, 512)}),
    "diffai_resnet18": ("DiffAI ResNet-18 (figure 12): basic blocks, FC512 x2",
                        _resnet((2, 2, 2, 2))),
    "diffai_resnet34": ("DiffAI ResNet-34 (figure 13): basic blocks, FC512 x2",
                        _resnet((3, 4, 6, 3))),
}

NAMES: tuple[str, ...] = tuple(_PRESETS)
"""The registered DiffAI presets, in the order of the paper's tables."""


def _preset(fields: Mapping[str, Any], **overrides: Any) -> DiffAINet:
  return DiffAINet(**{**fields, **overrides})


for _name, (_description, _fields) in _PRESETS.items():
  register(_name, _description)(functools.partial(_preset, _fields))
