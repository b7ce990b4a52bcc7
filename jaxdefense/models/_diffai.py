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
skipnet18_combo                              558,080 / 15,626,634 (figure 10)
resnet_large                                 639,976 / 65,819,474
resnet_large_combo                           639,976 / 65,819,474 (table 6, figure 11)
diffai_resnet18                              558,080 / 15,626,634 ("558k / 15m")
diffai_resnet34                              967,680 / 25,731,082 ("967k / 25m")
diffai_densenet100                           4,500,546 / 748,336 ("4.5m / 748k")
================== ========================= ========================================

``diffai_densenet100`` is a :class:`DiffAIDenseNet` (a DenseNet has no residual sum:
no step rule, no perturbations); every other preset is a :class:`DiffAINet`.

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
* SkipNet-18 Combo follows figure 10, which agrees with section 5.2 (CorrelateFixed k
  then DecorrelateMin floor(k / 2), k = 20, 10, 5; DeepLoss with the second pair).  The
  first and third pairs sit right after a residual sum, before the block's two trailing
  convolutions: the ``"residual{i}"`` point.  Figure 10 prints the DeepLoss weight as
  ``Until(90, Lin(%s, %s, %s, %s), 0.0)`` (unfilled); section 5.2 gives
  ``Until(90, Lin(0, 0.2, 50, 40), 0)``.
* ResNet-Large follows figure 11: ResNet-Tiny's wide block, seven of them
  (16-32-32-32-64-64-64 channels, all stride 1) and FC1000.  This reproduces table 6
  exactly (639,976 neurons, 65,819,474 parameters; "639k / 66m" in table 3); section
  6's "70k more neurons than SkipNet-18" is 81,896 by table 6's own counts.
  ``resnet_large`` is figure 11 without its abstract layers (as figure 6 is figure 7
  without FewCombo); ``resnet_large_combo`` has them.
* LargeCombo follows figure 11 (CorrelateMaxK 4 after the stem; CorrelateMaxK 4 then
  DecorrelateMin 4 before blocks 2, 3 and 5, DecorrelateMin 2 before block 6; DeepLoss
  after blocks 3 and 6, 1-based).  Section 5.2's prose differs (CorrelateFixed 4 then
  DecorrelateMin 4 before "wide residual blocks 1, 2, 3 and 4", DecorrelateMin 2 before
  block 5, DeepLoss after blocks 2 and 5) and cannot be mapped onto the seven blocks of
  the figure, whose layers reproduce table 6; the figure is built.
* DeepLoss weights: the figures give each DeepLoss layer its own schedule.  A
  :class:`~jaxdefense.nn.DeepLoss` layer holds a constant relative weight (1.0 here) and
  the objective scales all terms by one schedule (``DeepLoss(w, goal)`` in the training
  language); the figures' schedules are in :data:`DEEP_LOSS_SCHEDULES`.  LargeCombo's
  two different schedules cannot both be reproduced.
* DenseNet-100 follows figure 14: stem conv24 3x3 *without* ReLU; three dense blocks
  of 16 bottleneck layers ``concat([x, conv3x3_12(relu(conv1x1_48(relu(x))))])``
  (figure 14's ``SkipCat`` of the identity and the branch, in that order); transitions
  ``ReLU, conv1x1(c / 2), AvgPool``; then ``ReLU, AvgPool, CorrelateAll, Linear 10``.
  The figure prints the pooled sizes 32 -> 17 -> 9, i.e. 2x2 / stride-2 pooling with one
  zero of padding on each side counted in the mean (PyTorch's ``AvgPool2d(2, 2,
  padding=1)``); the last AvgPool's size is not printed and is read as a global average
  (9x9 -> 1x1), the only reading that gives table 3's 748k parameters (each further
  pooled position would add 3,420 to the classifier).  Table 3 gives only rounded sizes
  ("4.5m" neurons, "748k" parameters); the figure's exact ones are 4,500,546 (every
  ReLU output, including each bottleneck layer's ReLU over its whole concatenated
  input) and 748,336.  Its 99 convolutions are section 5.1's "99 layers".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdefense.dynamics import Euler
from jaxdefense.models._fields import check_fields
from jaxdefense.models._registry import register
from jaxdefense.models._resnet import ResidualBlock
from jaxdefense.nn import _abstract_layers as A
from jaxdefense.nn import _layers as L

__all__ = ["Abstract", "DEEP_LOSS_SCHEDULES", "DiffAIDenseNet", "DiffAINet", "NAMES"]

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


def _check_abstract(entries: Sequence[Any], points: Sequence[str], owner: str) -> None:
  """Every ``abstract`` entry is a ``(point, Abstract)`` pair at a known point."""
  for entry in entries:
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2
        or not isinstance(entry[1], Abstract)):
      raise ValueError(f"{owner}.abstract: every entry must be a (point, Abstract) pair; "
                       f"got {entry!r}.")
    if entry[0] not in points:
      raise ValueError(f"{owner}.abstract: unknown point {entry[0]!r}; this network has "
                       f"{list(points)}.")


def _apply_abstract(entries: Sequence[Any], point: str, x: Any, train: bool) -> Any:
  """The ``abstract`` layers placed at ``point``, in order (inside a compact method)."""
  for where, layer in entries:
    if where == point:
      x = layer.build()(x, train=train)
  return x


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
      ``"residual{i}"`` (right after residual block ``i``, before its
      ``block_convs``), ``"block{i}"`` (after the block and its ``block_convs``; the
      same place as ``"residual{i}"`` when ``block_convs == 0``, and after it),
      ``"dense{i}"`` (0-based).  Identity on arrays.
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
            + tuple(p for i in range(len(self.blocks)) for p in (f"residual{i}", f"block{i}"))
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
    _check_abstract(self.abstract, self.points, "DiffAINet")
    if not self.blocks and not isinstance(self.step, Euler):
      raise ValueError(f"DiffAINet has no residual blocks, so step={self.step!r} cannot "
                       "apply; use step=Euler() (the default).")
    if perturbations is not None and len(perturbations) != self.num_blocks:
      raise ValueError(f"perturbations must have one entry per residual block "
                       f"({self.num_blocks}); got {len(perturbations)}.")

  def _abstract_at(self, point: str, x: Any, train: bool) -> Any:
    return _apply_abstract(self.abstract, point, x, train)

  @nn.compact
  def __call__(self, x: Any, train: bool = False, perturbations: Sequence[Any] | None = None,
               capture_states: bool = False) -> Any:
    self._check(perturbations)
    in_shape = tuple(x.shape)
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
      x = self._abstract_at(f"residual{i}", x, train)
      for _ in range(self.block_convs):
        x = L.relu(conv(features, 3, strides=1, padding=1)(x))
      x = self._abstract_at(f"block{i}", x, train)
    if len(x.shape) == 4 and min(x.shape[1:3]) < 1:
      raise ValueError(f"{type(self).__name__}: the input's spatial size {in_shape[1:3]} is "
                       f"too small for these convolutions (convs={self.convs!r}): the "
                       f"feature map shrinks to {tuple(x.shape[1:3])}; use larger images "
                       "(the DiffAI zoo is sized for 28x28 or 32x32 inputs).")
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


def _padded_avg_pool(x: Any, padding: int) -> Any:
  """2x2 / stride-2 average pooling after ``padding`` zeros on each spatial side.

  PyTorch's ``AvgPool2d(2, stride=2, padding=p)`` with its default
  ``count_include_pad=True``: every output is a window sum divided by 4, the padded
  zeros included.  Composed from :func:`jaxdefense.nn.linear_map` (zero padding, a
  linear map with non-negative weights) and :func:`jaxdefense.nn.avg_pool`, so it runs
  on arrays and on abstract values alike.
  """
  if padding:
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    x = L.linear_map(x, lambda a: jnp.pad(a, pads), fan_in=0)
  return L.avg_pool(x, 2, 2, "VALID")


class _DenseLayer(nn.Module):
  """One bottleneck layer of a DiffAI dense block (figure 14's ``SkipNet1 / SkipNet2 /
  SkipCat``): ``concat([x, conv3x3(relu(conv1x1(relu(x))))], channels)``."""
  growth: int
  bottleneck: int

  @nn.compact
  def __call__(self, x: Any) -> Any:
    conv = functools.partial(L.Conv, use_bias=True, kernel_init=L.torch_default)
    y = conv(self.bottleneck, 1, strides=1, padding=0)(L.relu(x))
    y = conv(self.growth, 3, strides=1, padding=1)(L.relu(y))
    return L.concatenate([x, y], axis=-1)


class DiffAIDenseNet(nn.Module):
  """DiffAI's DenseNet-100 family (figure 14): a DenseNet-BC without batch norm.

  Layout: ``[Normalize] -> conv3x3(stem) -> dense block 0 -> transition 0 -> ... ->
  dense block n-1 -> ReLU -> global average pooling -> [CorrelateAll] ->
  Dense(num_classes)``.

  * The stem is a 3x3 / stride-1 / pad-1 convolution *without* a ReLU (figure 14).
  * A dense block has ``layers[i]`` bottleneck layers; each maps ``x`` (``c``
    channels) to ``concat([x, conv3x3_growth(relu(conv1x1_bottleneck(relu(x))))])``
    (``c + growth`` channels; figure 14's ``SkipCat dim=1`` of the identity
    ``SkipNet1`` and the ``SkipNet2`` branch, in that order).
  * A transition (between dense blocks) is ``ReLU -> conv1x1(floor(reduction * c)) ->
    2x2 / stride-2 average pooling`` with ``pool_padding`` zeros on each side (counted
    in the mean, PyTorch's ``count_include_pad``): with the default 1, 32x32 -> 17x17
    -> 9x9, the sizes figure 14 prints.

  Every convolution and the dense layer have a bias and PyTorch's default
  initialisation, as :class:`DiffAINet`.  There is no residual sum, so there is no
  step rule and no per-block perturbation.

  Attributes:
    stem: channels of the first convolution (default 24, ``2 * growth``).
    growth: channels each bottleneck layer adds (default 12).
    layers: bottleneck layers per dense block (default ``(16, 16, 16)``: 3 x 16 x 2
      convolutions + stem + 2 transitions + the last layer = 100 layers).
    bottleneck: channels of each layer's 1x1 convolution (default 48, ``4 * growth``).
    reduction: a transition keeps ``floor(reduction * c)`` of ``c`` channels, in
      ``(0, 1]`` (default 0.5).
    pool_padding: zeros added on each spatial side before each 2x2 pooling (default 1).
    abstract: ``(point, Abstract)`` pairs as in :class:`DiffAINet`; points
      ``"input"`` (after normalisation), ``"stem"``, ``"block{i}"`` (after dense block
      ``i``), ``"transition{i}"`` (after transition ``i``).
    num_classes: output logits ``K >= 1`` (default 10).
    normalize: ``(mean, std)`` per channel, or ``None``.
    correlate_last: put ``CorrelateAll(only_train=False)`` before the last layer.

  Call: ``model.apply(variables, x, train=False)`` with ``x`` ``[B, H, W, C]`` (array
  or abstract value) returns logits ``[B, num_classes]``.

  Raises:
    ValueError: at construction, a size below 1, ``pool_padding`` below 0,
      ``reduction`` outside ``(0, 1]``, a bad ``normalize``; at the call, an empty
      ``layers``, an unknown abstract point or a malformed ``abstract`` entry.
    TypeError: a non-integer size.
  """
  stem: int = 24
  growth: int = 12
  layers: Sequence[int] = (16, 16, 16)
  bottleneck: int = 48
  reduction: float = 0.5
  pool_padding: int = 1
  abstract: Sequence[tuple[str, Abstract]] = ()
  num_classes: int = 10
  normalize: tuple[Sequence[float], Sequence[float]] | None = None
  correlate_last: bool = True

  def __post_init__(self):
    check_fields(self, positive=("stem", "growth", "bottleneck", "num_classes"),
                 nonnegative=("pool_padding",), positive_seqs=("layers",))
    if (isinstance(self.reduction, bool) or not isinstance(self.reduction, (int, float))
        or not 0.0 < float(self.reduction) <= 1.0):
      raise ValueError(f"DiffAIDenseNet.reduction must be a number in (0, 1]; got "
                       f"{self.reduction!r}.")
    super().__post_init__()

  @property
  def points(self) -> tuple[str, ...]:
    """The names of the points where ``abstract`` layers can go, in network order."""
    n = len(self.layers)
    return (("input", "stem")
            + tuple(p for i in range(n)
                    for p in ((f"block{i}", f"transition{i}") if i < n - 1
                              else (f"block{i}",))))

  def _check(self) -> None:
    if not len(self.layers):
      raise ValueError("DiffAIDenseNet.layers must name at least one dense block.")
    _check_abstract(self.abstract, self.points, "DiffAIDenseNet")

  def _abstract_at(self, point: str, x: Any, train: bool) -> Any:
    return _apply_abstract(self.abstract, point, x, train)

  @nn.compact
  def __call__(self, x: Any, train: bool = False) -> Any:
    self._check()
    conv = functools.partial(L.Conv, use_bias=True, kernel_init=L.torch_default)
    if self.normalize is not None:
      mean, std = self.normalize
      x = L.Normalize(tuple(mean), tuple(std))(x)
    x = self._abstract_at("input", x, train)
    x = conv(self.stem, 3, strides=1, padding=1, name="stem")(x)
    x = self._abstract_at("stem", x, train)
    last = len(self.layers) - 1
    for i, n in enumerate(self.layers):
      for j in range(n):
        x = _DenseLayer(self.growth, self.bottleneck, name=f"block{i}_layer{j}")(x)
      x = self._abstract_at(f"block{i}", x, train)
      if i < last:
        features = max(1, int(math.floor(self.reduction * x.shape[-1])))
        x = conv(features, 1, strides=1, padding=0, name=f"transition{i}")(L.relu(x))
        x = _padded_avg_pool(x, self.pool_padding)
        x = self._abstract_at(f"transition{i}", x, train)
    x = L.global_avg_pool(L.relu(x))
    if self.correlate_last:
      x = A.CorrelateAll(only_train=False)(x, train=train)
    return L.Dense(self.num_classes, name="classifier")(x)


# ----------------------------------------------------------------------------- presets
def _train_only(point: str, kind: str, **kw: Any) -> tuple[str, Abstract]:
  return (point, Abstract.of(kind, only_train=True, **kw))


_TINY = {"convs": ((16, 3, 1, 1),), "block": "wide",
         "blocks": ((16, 1), (32, 1), (32, 1), (32, 1), (32, 1)), "dense": (500,)}


# SkipNet-18 (figure 9): five conv64, then three strided basic blocks, each followed by
# two 3x3 conv-ReLU layers of its width.
_SKIPNET18 = {"convs": ((64, 3, 1, 1),) * 5,
              "blocks": ((128, 2), (256, 2), (512, 2)), "block_convs": 2,
              "dense": (512, 512)}

# ResNet-Large (figure 11): ResNet-Tiny's wide blocks, seven of them, and FC1000.
_LARGE = {"convs": ((16, 3, 1, 1),), "block": "wide",
          "blocks": ((16, 1), (32, 1), (32, 1), (32, 1), (64, 1), (64, 1), (64, 1)),
          "dense": (1000,)}


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
    "skipnet18": ("DiffAI SkipNet-18 (figure 9)", _SKIPNET18),
    "skipnet18_combo": ("DiffAI SkipNet-18 with Combo abstract layers (figure 10)",
                        {**_SKIPNET18, "abstract": (
                            _train_only("residual0", "correlate_fixed", k=20),
                            _train_only("residual0", "decorrelate_min_k", k=10),
                            _train_only("block0", "correlate_fixed", k=10),
                            _train_only("block0", "decorrelate_min_k", k=5),
                            _train_only("block0", "deep_loss", weight=1.0),
                            _train_only("residual1", "correlate_fixed", k=5),
                            _train_only("residual1", "decorrelate_min_k", k=2))}),
    "resnet_large": ("DiffAI ResNet-Large (figure 11 without its abstract layers): "
                     "seven wide blocks 16-32-32-32-64-64-64, FC1000", _LARGE),
    "resnet_large_combo": (
        "DiffAI ResNet-Large with LargeCombo abstract layers (figure 11)",
        {**_LARGE, "abstract": (
            _train_only("conv0", "correlate_max_k", k=4),
            _train_only("block0", "correlate_max_k", k=4),
            _train_only("block0", "decorrelate_min_k", k=4),
            _train_only("block1", "correlate_max_k", k=4),
            _train_only("block1", "decorrelate_min_k", k=4),
            _train_only("block2", "deep_loss", weight=1.0),
            _train_only("block3", "correlate_max_k", k=4),
            _train_only("block3", "decorrelate_min_k", k=4),
            _train_only("block4", "correlate_max_k", k=4),
            _train_only("block4", "decorrelate_min_k", k=2),
            _train_only("block5", "deep_loss", weight=1.0))}),
    "diffai_resnet18": ("DiffAI ResNet-18 (figure 12): basic blocks, FC512 x2",
                        _resnet((2, 2, 2, 2))),
    "diffai_resnet34": ("DiffAI ResNet-34 (figure 13): basic blocks, FC512 x2",
                        _resnet((3, 4, 6, 3))),
}

# name -> (description, DiffAIDenseNet fields)
_DENSE_PRESETS: dict[str, tuple[str, Mapping[str, Any]]] = {
    "diffai_densenet100": (
        "DiffAI DenseNet-100 (figure 14): stem conv24, 3 dense blocks of 16 bottleneck "
        "layers (growth 12), transitions with reduction 0.5", {}),
}

NAMES: tuple[str, ...] = tuple(_PRESETS) + tuple(_DENSE_PRESETS)
"""The registered DiffAI presets, in the order of the paper's tables."""

DEEP_LOSS_SCHEDULES: dict[str, tuple[str, ...]] = {
    "skipnet18_combo": ("Until(90, Lin(0, 0.2, 50, 40), 0)",),
    "resnet_large_combo": ("Until(1, 0, Lin(0.5, 0, 50, 3))",
                           "Until(24, Lin(0, 0.1, 20, 4), Lin(0.1, 0, 50, 0))"),
}
"""The weight schedules of the figures' DeepLoss layers, in network order, in the
training language (:func:`jaxdefense.objectives.parse`; e.g.
``parse(f"DeepLoss({s}, Box)")``).  A :class:`~jaxdefense.nn.DeepLoss` layer holds a
constant relative weight (1.0 in the presets) and the schedule belongs to the objective,
which scales all layers' terms by one schedule; figure 11's two different schedules
therefore cannot both be reproduced exactly."""


def _preset(cls: type, fields: Mapping[str, Any], **overrides: Any) -> nn.Module:
  return cls(**{**fields, **overrides})


for _name, (_description, _fields) in _PRESETS.items():
  register(_name, _description)(functools.partial(_preset, DiffAINet, _fields))
for _name, (_description, _fields) in _DENSE_PRESETS.items():
  register(_name, _description)(functools.partial(_preset, DiffAIDenseNet, _fields))
