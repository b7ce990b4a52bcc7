"""The DiffAI network zoo (Mirman, Singh & Vechev 2019, appendix D, tables 6, 8 and 11).

Every network is one class, :class:`DiffAINet`, run over a *program*: a tuple of small
frozen layer specs (:class:`ConvReLU`, :class:`DenseReLU`, :class:`WideBlock`,
:class:`BasicBlock`, :class:`Abstract`).  The presets registered here are the paper's
networks; shapes come from the input, so each works on 28x28x1 (MNIST, Fashion-MNIST)
and 32x32x3 (CIFAR-10) images, and on abstract inputs (``Box``, ``HybridZonotope``)
without a second definition.

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
from typing import Any, Sequence

import flax.linen as nn

from jaxdefense.models._registry import register
from jaxdefense.nn import _abstract_layers as A
from jaxdefense.nn import _layers as L

__all__ = [
    "Abstract", "BasicBlock", "ConvReLU", "DenseReLU", "DiffAINet", "WideBlock",
    "PROGRAMS",
]


# ------------------------------------------------------------------------ layer specs
@dataclasses.dataclass(frozen=True)
class ConvReLU:
  """``relu(conv(x))`` with a ``kernel x kernel`` kernel, bias, given stride/padding."""
  features: int
  kernel: int = 3
  stride: int = 1
  padding: int = 1


@dataclasses.dataclass(frozen=True)
class DenseReLU:
  """``relu(dense(flatten(x)))``."""
  features: int


@dataclasses.dataclass(frozen=True)
class WideBlock:
  """ResNet-Tiny's block: ``relu(conv1x1(x) + conv3x3(relu(conv3x3(x))))``.

  ParNet1 is the 1x1 convolution (padding 0), ParNet2 the two 3x3 ones (padding 1).
  """
  features: int


@dataclasses.dataclass(frozen=True)
class BasicBlock:
  """ResNet basic block: ``relu(conv3x3(relu(conv3x3_s(x))) + shortcut(x))``.

  The shortcut is the identity, or a strided 1x1 convolution when the stride is not 1
  or the width changes (figures 9, 12, 13).
  """
  features: int
  stride: int = 1


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


@dataclasses.dataclass(frozen=True)
class Abstract:
  """An abstract layer of :mod:`jaxdefense.nn` by name and keyword arguments.

  ``Abstract.of("correlate_max_k", k=32, only_train=True)``.  Names:
  ``correlate_all``, ``correlate_fixed``, ``correlate_max_k``, ``correlate_max_pool``,
  ``decorrelate_all``, ``concretize``, ``decorrelate_min_k``, ``deep_loss``.
  """
  kind: str
  kwargs: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.kind not in _ABSTRACT_LAYERS:
      raise ValueError(f"unknown abstract layer {self.kind!r}; expected one of "
                       f"{sorted(_ABSTRACT_LAYERS)}.")

  @classmethod
  def of(cls, kind: str, **kwargs: Any) -> "Abstract":
    return cls(kind, tuple(sorted(kwargs.items())))

  def build(self) -> nn.Module:
    return _ABSTRACT_LAYERS[self.kind](**dict(self.kwargs))


def _conv(features: int, kernel: int, stride: int, padding: int) -> L.Conv:
  return L.Conv(features, kernel, strides=stride, padding=padding, use_bias=True,
                kernel_init=L.torch_default)


class DiffAINet(nn.Module):
  """A feed-forward or residual network described by a program of layer specs.

  ``normalize -> program -> flatten -> [CorrelateAll] -> Dense(num_classes)``.

  Attributes:
    program: tuple of :class:`ConvReLU`, :class:`DenseReLU`, :class:`WideBlock`,
      :class:`BasicBlock` and :class:`Abstract` specs.
    num_classes: output logits ``K``.
    normalize: ``(mean, std)`` per channel (a :class:`~jaxdefense.nn.Normalize` first
      layer, so attacks and certification work in ``[0, 1]`` pixel space), or ``None``.
    correlate_last: put ``CorrelateAll(only_train=False)`` before the last layer.

  Call: ``model.apply(variables, x, train=False)`` with ``x`` ``[B, H, W, C]`` images
  (or an abstract value of that shape); returns ``[B, num_classes]``.  ``train``
  only switches the ``only_train`` abstract layers (the networks have no batch norm
  or dropout).
  """
  program: tuple = ()
  num_classes: int = 10
  normalize: tuple[Sequence[float], Sequence[float]] | None = None
  correlate_last: bool = True

  @nn.compact
  def __call__(self, x: Any, train: bool = False) -> Any:
    if self.normalize is not None:
      mean, std = self.normalize
      x = L.Normalize(tuple(mean), tuple(std))(x)
    for spec in self.program:
      if isinstance(spec, ConvReLU):
        x = L.relu(_conv(spec.features, spec.kernel, spec.stride, spec.padding)(x))
      elif isinstance(spec, DenseReLU):
        if len(x.shape) > 2:
          x = L.flatten(x)
        x = L.relu(L.Dense(spec.features)(x))
      elif isinstance(spec, WideBlock):
        short = _conv(spec.features, 1, 1, 0)(x)
        y = L.relu(_conv(spec.features, 3, 1, 1)(x))
        y = _conv(spec.features, 3, 1, 1)(y)
        x = L.relu(L.add(short, y))
      elif isinstance(spec, BasicBlock):
        y = L.relu(_conv(spec.features, 3, spec.stride, 1)(x))
        y = _conv(spec.features, 3, 1, 1)(y)
        if spec.stride != 1 or x.shape[-1] != spec.features:
          short = _conv(spec.features, 1, spec.stride, 0)(x)
        else:
          short = x
        x = L.relu(L.add(short, y))
      elif isinstance(spec, Abstract):
        x = spec.build()(x, train=train)
      else:
        raise TypeError(f"DiffAINet: unknown layer spec {spec!r}.")
    if len(x.shape) > 2:
      x = L.flatten(x)
    if self.correlate_last:
      x = A.CorrelateAll(only_train=False)(x, train=train)
    return L.Dense(self.num_classes)(x)


# ----------------------------------------------------------------------------- presets
def _train_only(kind: str, **kw: Any) -> Abstract:
  return Abstract.of(kind, only_train=True, **kw)


_TINY_BODY = (WideBlock(16), WideBlock(32), WideBlock(32), WideBlock(32), WideBlock(32))

PROGRAMS: dict[str, tuple] = {
    "ffnn": tuple(DenseReLU(100) for _ in range(5)),
    "conv_small": (ConvReLU(16, 4, 2, 0), ConvReLU(32, 4, 2, 0), DenseReLU(100)),
    "conv_med": (ConvReLU(16, 4, 2, 1), ConvReLU(32, 4, 2, 1), DenseReLU(100)),
    "conv_big": (ConvReLU(32, 3, 1, 1), ConvReLU(32, 4, 2, 1), ConvReLU(64, 3, 1, 1),
                 ConvReLU(64, 4, 2, 1), DenseReLU(512), DenseReLU(512)),
    "conv_large_ibp": (ConvReLU(64, 3, 1, 1), ConvReLU(64, 3, 1, 1), ConvReLU(128, 3, 2, 1),
                       ConvReLU(128, 3, 1, 1), ConvReLU(128, 3, 1, 1), DenseReLU(200)),
    "truncated_vgg": (ConvReLU(64, 3, 1, 1), ConvReLU(64, 3, 1, 1), ConvReLU(128, 3, 2, 1),
                      ConvReLU(128, 3, 1, 1), DenseReLU(512)),
    # Figure 6.
    "resnet_tiny": (ConvReLU(16, 3, 1, 1),) + _TINY_BODY + (DenseReLU(500),),
    # Figure 7 (FewCombo).
    "resnet_tiny_few_combo": (
        _train_only("correlate_max_k", k=32),
        ConvReLU(16, 3, 1, 1),
        _train_only("decorrelate_min_k", k=8),
        WideBlock(16),
        _train_only("decorrelate_min_k", k=4),
        WideBlock(32),
        _train_only("concretize"),
        WideBlock(32), WideBlock(32), WideBlock(32),
        _train_only("correlate_max_k", k=10),
        DenseReLU(500)),
    # Figure 8 (ManyFixed).
    "resnet_tiny_many_fixed": (
        _train_only("correlate_max_k", k=32),
        ConvReLU(16, 3, 1, 1),
        _train_only("correlate_fixed", k=16), _train_only("decorrelate_min_k", k=16),
        WideBlock(16),
        _train_only("correlate_fixed", k=8), _train_only("decorrelate_min_k", k=8),
        WideBlock(32),
        _train_only("correlate_fixed", k=8), _train_only("decorrelate_min_k", k=8),
        WideBlock(32),
        _train_only("correlate_fixed", k=4), _train_only("decorrelate_min_k", k=4),
        WideBlock(32),
        _train_only("concretize"),
        WideBlock(32),
        DenseReLU(500)),
    # Figure 9.
    "skipnet18": tuple(ConvReLU(64) for _ in range(5)) + (
        BasicBlock(128, 2), ConvReLU(128), ConvReLU(128),
        BasicBlock(256, 2), ConvReLU(256), ConvReLU(256),
        BasicBlock(512, 2), ConvReLU(512), ConvReLU(512),
        DenseReLU(512), DenseReLU(512)),
}


def _resnet_program(blocks: Sequence[int]) -> tuple:
  prog: list = [ConvReLU(64)]
  for stage, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
    for i in range(n):
      prog.append(BasicBlock(width, 2 if (i == 0 and stage > 0) else 1))
  return tuple(prog) + (DenseReLU(512), DenseReLU(512))


PROGRAMS["diffai_resnet18"] = _resnet_program((2, 2, 2, 2))   # figure 12
PROGRAMS["diffai_resnet34"] = _resnet_program((3, 4, 6, 3))   # figure 13

_DESCRIPTIONS = {
    "ffnn": "DiffAI FFNN: five dense layers of 100 (tables 8, 11)",
    "conv_small": "DiffAI ConvSmall: conv16 4x4/2, conv32 4x4/2, FC100 (tables 8, 11)",
    "conv_med": "DiffAI ConvMed: conv16 4x4/2 pad 1, conv32 4x4/2 pad 1, FC100",
    "conv_big": "DiffAI ConvBig: conv32, conv32/2, conv64, conv64/2, FC512 x2",
    "conv_large_ibp": "DiffAI ConvLargeIBP: conv64 x2, conv128/2, conv128 x2, FC200",
    "truncated_vgg": "DiffAI TruncatedVGG: conv64 x2, conv128/2, conv128, FC512",
    "resnet_tiny": "DiffAI ResNet-Tiny (figure 6): five wide blocks, FC500",
    "resnet_tiny_few_combo": "ResNet-Tiny with FewCombo abstract layers (figure 7)",
    "resnet_tiny_many_fixed": "ResNet-Tiny with ManyFixed abstract layers (figure 8)",
    "skipnet18": "DiffAI SkipNet-18 (figure 9)",
    "diffai_resnet18": "DiffAI ResNet-18 (figure 12): basic blocks, FC512 x2",
    "diffai_resnet34": "DiffAI ResNet-34 (figure 13): basic blocks, FC512 x2",
}


def _make(name: str):
  def factory(**overrides: Any) -> DiffAINet:
    overrides.setdefault("program", PROGRAMS[name])
    return DiffAINet(**overrides)
  factory.__name__ = name
  factory.__doc__ = _DESCRIPTIONS[name] + (
      ".\n\nOverrides: num_classes (10), normalize ((mean, std) or None), "
      "correlate_last (True), program.")
  return factory


for _name in PROGRAMS:
  globals()[_name] = register(_name, _DESCRIPTIONS[_name])(_make(_name))
