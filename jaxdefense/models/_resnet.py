"""The residual family: CIFAR ResNets, pre-activation ResNets, WRN, ResNeXt.

One class, :class:`ResNet`, and one block, :class:`ResidualBlock`; presets differ only
in fields.  Every block ends with its step rule applied to ``(shortcut(x), f(x))``
(through :func:`jaxdefense.dynamics.apply_step`), where ``step`` is a rule from
:mod:`jaxdefense.dynamics`, so the same presets are ResNets (``Euler``), EnResNets
(``EulerMaruyama``) and In-ResNets (``Damped``), and they run on arrays and on abstract
values.  The DiffAI zoo (:mod:`jaxdefense.models._diffai`) uses the same block.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdefense import _checks
from jaxdefense.dynamics import Damped, Euler, StepContext, apply_step
from jaxdefense.nn import _layers as L
from jaxdefense.nn._abstract import is_abstract
from jaxdefense.models import _slots
from jaxdefense.models._fields import check_fields
from jaxdefense.models._registry import register

_KINDS = ("basic", "preact", "bottleneck", "preact_bottleneck", "resnext")
_PREACT = ("preact", "preact_bottleneck")
_SHORTCUTS = ("pad", "conv", "conv_always")


def is_transition(stride: int, in_channels: int, features: int) -> bool:
  """Whether a residual block changes resolution or width (its ``StepContext.transition``)."""
  return stride != 1 or in_channels != features


class ResidualBlock(nn.Module):
  """One residual block ``x -> step(shortcut(x), f(x))``.

  Post-activation kinds return ``relu(step(...))``, pre-activation kinds ``step(...)``.
  The step rule is applied in exactly one place, through
  :func:`jaxdefense.dynamics.apply_step`.

  Attributes:
    features: output channels.
    stride: spatial stride of the block (on its first 3x3 conv for basic blocks, on the
      3x3 conv for bottlenecks).
    kind: ``basic`` (post-activation, He et al. 2016a), ``preact`` (He et al. 2016b),
      ``bottleneck`` / ``preact_bottleneck`` (1x1-3x3-1x1 with ``inner`` channels) or
      ``resnext`` (post-activation bottleneck with a grouped 3x3 conv).
    step: the residual step rule (default ``Euler()``), or its name in
      :data:`jaxdefense.dynamics.STEP_RULES` (``"euler_maruyama"``...) or a config dict
      ``{"name": ..., **fields}``, converted at construction.
    index: block index in the network (for the step's context).
    shortcut: ``"pad"`` (parameter-free option A) or ``"conv"`` (1x1 projection) for
      transition blocks (stride or width change; identity otherwise), or
      ``"conv_always"``: a 1x1 projection on every block (DiffAI's ResNet-Tiny).
    inner: channels inside a bottleneck (ignored for basic blocks).
    groups: groups of the 3x3 conv (ResNeXt cardinality).
    dropout: dropout rate between the two convs of a basic block (WRN), training only.
    batch_norm: batch norm after every conv (and before it in pre-activation kinds);
      ``False`` drops every batch norm of the block (DiffAI's networks).
    use_bias: biases on every conv (default ``False``).
    kernel_init: initialiser of every conv kernel (default He-normal,
      :data:`jaxdefense.nn.he_normal`; DiffAI uses :data:`jaxdefense.nn.torch_default`).

  Call: ``block(x, train=False, perturbation=None)`` with ``x`` ``[B, H, W, C]`` (array
  or abstract value) returns ``[B, H / stride, W / stride, features]``.

  Raises:
    ValueError: at construction, ``features``, ``stride`` or ``groups`` below 1, a
      negative ``index`` or ``inner``, ``dropout`` outside ``[0, 1)``, an unknown step
      rule name; at the call, an unknown ``kind`` or ``shortcut``, ``"pad"`` that would
      reduce channels.
    TypeError: a non-integer size field.
  """
  features: int
  stride: int = 1
  kind: str = "basic"
  step: Any = Euler()
  index: int = 0
  shortcut: str = "conv"
  inner: int = 0
  groups: int = 1
  dropout: float = 0.0
  batch_norm: bool = True
  use_bias: bool = False
  kernel_init: Any = L.he_normal

  def __post_init__(self):
    check_fields(self, positive=("features", "stride", "groups"),
                 nonnegative=("index", "inner"), rates=("dropout",))
    super().__post_init__()

  def _conv(self, features: int, kernel: int, stride: int, **kw: Any) -> L.Conv:
    return L.Conv(features, kernel, stride, use_bias=self.use_bias,
                  kernel_init=self.kernel_init, **kw)

  def _bn(self, y: Any, train: bool) -> Any:
    return L.BatchNorm()(y, train) if self.batch_norm else y

  def _branch(self, h: Any, train: bool) -> Any:
    bn = self._bn
    preact = self.kind in _PREACT
    if self.kind in ("basic", "preact"):
      y = self._conv(self.features, 3, self.stride)(h)
      y = L.relu(bn(y, train))
      if self.dropout > 0 and not is_abstract(y):  # identity at evaluation (abstract runs)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
      y = self._conv(self.features, 3, 1)(y)
      return y if preact else bn(y, train)
    # bottleneck, preact_bottleneck, resnext
    y = self._conv(self.inner, 1, 1)(h)
    y = L.relu(bn(y, train))
    y = self._conv(self.inner, 3, self.stride, feature_group_count=self.groups)(y)
    y = L.relu(bn(y, train))
    y = self._conv(self.features, 1, 1)(y)
    return y if preact else bn(y, train)

  def _shortcut(self, x: Any, h: Any, transition: bool, train: bool) -> Any:
    """Identity on the block input ``x``, or a projection / padding of ``h`` (``x``
    pre-activated in pre-activation kinds, ``x`` itself otherwise)."""
    if self.shortcut == "conv_always" or (transition and self.shortcut == "conv"):
      sc = self._conv(self.features, 1, self.stride, padding=0)(h)
      return sc if self.kind in _PREACT else self._bn(sc, train)
    if transition:
      return L.PadShortcut(self.features, self.stride)(h)
    return x

  @nn.compact
  def __call__(self, x: Any, train: bool = False, perturbation: Any = None) -> Any:
    _checks.check_choice(self.kind, "kind", _KINDS)
    _checks.check_choice(self.shortcut, "shortcut", _SHORTCUTS)
    in_ch = x.shape[-1]
    transition = is_transition(self.stride, in_ch, self.features)
    ctx = StepContext(self.index, transition, train)
    preact = self.kind in _PREACT
    h = L.relu(self._bn(x, train)) if preact else x
    sc = self._shortcut(x, h, transition, train)
    fx = self._branch(h, train)
    out = apply_step(self, self.step, sc, fx, ctx, perturbation)
    return out if preact else L.relu(out)


class ResNet(nn.Module):
  """A residual network for small images (CIFAR, MNIST, digits), NHWC in [0, 1].

  Layout: [Normalize] -> 3x3 stem conv -> stages of residual blocks -> [BN-ReLU for
  pre-activation nets] -> global average pool -> dense logits.

  Attributes:
    stage_sizes: number of blocks in each stage.
    widths: output channels of each stage.
    kind: block kind (see :class:`ResidualBlock`).
    step: residual step rule from :mod:`jaxdefense.dynamics` (default ``Euler()``), or
      its name (``"euler"``, ``"euler_maruyama"``, ``"damped"``: the rule with its
      default fields) or a config dict ``{"name": ..., **fields}``, converted at
      construction.
    num_classes: number of logits, ``>= 1``.
    stem_width: channels of the stem conv.
    strides: stride of the first block of each stage.
    shortcut: ``"pad"`` or ``"conv"`` transition shortcuts.
    inner: bottleneck inner channels per stage (bottleneck kinds only).
    groups: grouped-conv cardinality (ResNeXt).
    dropout: dropout in basic blocks (WRN).
    normalize: ``(mean, std)`` per channel, applied first (so inputs stay in [0, 1]).

  Call: ``model.apply(variables, x, train=False, perturbations=None,
  capture_states=False, rngs={"noise": key})``.  ``perturbations`` is a sequence with
  one additive perturbation (or ``None``) per block, added to that block's output, or
  one more whose first entry is added to the stem output (LAD; see
  ``jaxdefense.models._slots``); ``capture_states=True`` returns ``(logits, states)``
  with the value at every perturbation slot (every block's output, after the stem
  output when ``L + 1`` perturbations are given).

  Raises:
    ValueError: at construction (so at ``models.create``), ``num_classes``,
      ``stem_width``, ``groups``, a width, stride or inner width below 1, a negative
      stage size, ``dropout`` outside ``[0, 1)``, a ``normalize`` std that is not
      finite and positive, an unknown step rule name; at the call, images of the wrong
      rank or outside [0, 1] (checked on concrete inputs), a perturbation list of
      another length than ``L`` or ``L + 1``, images whose channels differ from those the variables were
      initialised with.
    TypeError: a non-integer size field.
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  kind: str = "basic"
  step: Any = Euler()
  num_classes: int = 10
  stem_width: int = 16
  strides: Sequence[int] = (1, 2, 2)
  shortcut: str = "pad"
  inner: Sequence[int] | None = None
  groups: int = 1
  dropout: float = 0.0
  normalize: tuple[Sequence[float], Sequence[float]] | None = None

  def __post_init__(self):
    check_fields(self, positive=("num_classes", "stem_width", "groups"),
                 positive_seqs=("widths", "strides", "inner"),
                 nonnegative_seqs=("stage_sizes",), rates=("dropout",))
    super().__post_init__()

  @property
  def num_blocks(self) -> int:
    return int(sum(self.stage_sizes))

  @nn.compact
  def __call__(self, x: Any, train: bool = False, perturbations: Sequence[Any] | None = None,
               capture_states: bool = False) -> Any:
    _checks.check_choice(self.kind, "kind", _KINDS)
    _checks.check_choice(self.shortcut, "shortcut", ("pad", "conv"))
    if len(self.widths) != len(self.stage_sizes) or len(self.strides) != len(self.stage_sizes):
      raise ValueError(f"widths {tuple(self.widths)} and strides {tuple(self.strides)} need "
                       f"one entry per stage ({len(self.stage_sizes)}).")
    if not is_abstract(x):
      _checks.check_images(x, "x")
    if isinstance(self.step, Damped):
      self._check_something_damped(train)
    with_stem, stem_delta, perturbations = _slots.split_perturbations(
        perturbations, self.num_blocks, "ResNet")
    if self.normalize is not None:
      x = L.Normalize(*self.normalize)(x)
    x = L.Conv(self.stem_width, 3, 1)(x)
    if self.kind not in _PREACT:
      x = L.relu(L.BatchNorm()(x, train))
    states = []
    if with_stem:
      x = _slots.add(x, stem_delta)
      states.append(x)
    index = 0
    for stage, (n, width, stride) in enumerate(zip(self.stage_sizes, self.widths,
                                                   self.strides)):
      for i in range(n):
        x = ResidualBlock(
            features=width, stride=stride if i == 0 else 1, kind=self.kind, step=self.step,
            index=index, shortcut=self.shortcut,
            inner=self.inner[stage] if self.inner else 0, groups=self.groups,
            dropout=self.dropout, name=f"block{index}")(
                x, train, None if perturbations is None else perturbations[index])
        states.append(x)
        index += 1
    if self.kind in _PREACT:
      x = L.relu(L.BatchNorm()(x, train))
    x = L.global_avg_pool(x)
    logits = L.Dense(self.num_classes)(x)
    return (logits, states) if capture_states else logits


  def _check_something_damped(self, train: bool) -> None:
    """A ``Damped`` step that damps no block would silently be a plain ResNet."""
    in_ch, index = self.stem_width, 0
    for n, width, stride in zip(self.stage_sizes, self.widths, self.strides):
      for i in range(n):
        transition = is_transition(stride if i == 0 else 1, in_ch, width)
        if self.step.damped(StepContext(index, transition, train)):
          return
        in_ch, index = width, index + 1
    raise ValueError(
        f"step {self.step!r} damps no block of this ResNet (stage sizes "
        f"{tuple(self.stage_sizes)}): skip_first={self.step.skip_first} keeps block 0 and "
        f"skip_transitions={self.step.skip_transitions} keeps every stage's first block a "
        "plain ResNet step, which is every block here.  Use a deeper preset (e.g. "
        "preact_resnet20) or set skip_first=False / skip_transitions=False.")


class MLP(nn.Module):
  """A multilayer perceptron on flattened images: [Normalize] -> (Dense, ReLU)* -> Dense.

  Attributes:
    hidden: widths of the hidden layers, each ``>= 1`` (default ``(256, 256)``).
    num_classes: number of logits, ``>= 1``.
    normalize: ``(mean, std)`` per channel, applied first, or ``None``.

  Call: ``model.apply(variables, x, train=False)`` with ``x`` ``[B, H, W, C]`` images
  (or ``[B, D]`` features, or an abstract value of either shape); returns
  ``[B, num_classes]``.

  Raises:
    ValueError: at construction, ``num_classes`` or a hidden width below 1, a
      ``normalize`` std that is not finite and positive; at the call, a concrete input
      that is not of rank 2 or 4, or of another size than the one the variables were
      initialised with.
    TypeError: a non-integer size field.
  """
  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10
  normalize: tuple[Sequence[float], Sequence[float]] | None = None

  def __post_init__(self):
    check_fields(self, positive=("num_classes",), positive_seqs=("hidden",))
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Any, train: bool = False) -> Any:
    if not is_abstract(x):
      _checks.check_rank(x, "x", (2, 4))
    if self.normalize is not None:
      x = L.Normalize(*self.normalize)(x)
    if len(x.shape) > 2:
      x = L.flatten(x)
    for h in self.hidden:
      x = L.relu(L.Dense(h)(x))
    return L.Dense(self.num_classes)(x)


# ------------------------------------------------------------------------ presets
def _cifar_depth(depth: int, per_block: int) -> int:
  if (depth - 2) % (3 * per_block):
    raise ValueError(f"depth {depth} is not 3 * {per_block} * n + 2.")
  return (depth - 2) // (3 * per_block)


def _cifar_resnet(depth: int, **kw: Any) -> ResNet:
  n = _cifar_depth(depth, 2)
  return ResNet(**{"stage_sizes": (n, n, n), "widths": (16, 32, 64), "kind": "basic",
                   "shortcut": "pad", **kw})


def _preact_resnet(depth: int, **kw: Any) -> ResNet:
  n = _cifar_depth(depth, 2)
  return ResNet(**{"stage_sizes": (n, n, n), "widths": (16, 32, 64), "kind": "preact",
                   "shortcut": "conv", **kw})


for _d in (20, 32, 44, 56, 110):
  register(f"resnet{_d}", f"CIFAR ResNet-{_d} (He et al. 2016a, basic blocks, option-A "
           "shortcuts)")(functools.partial(_cifar_resnet, _d))
for _d in (20, 44, 56, 110):
  register(f"preact_resnet{_d}", f"pre-activation ResNet-{_d} (He et al. 2016b; the EnResNet "
           "and In-ResNet base network)")(functools.partial(_preact_resnet, _d))


@register("preact_resnet164", "pre-activation ResNet-164 with bottleneck blocks (1.7M)")
def preact_resnet164(**kw: Any) -> ResNet:
  n = _cifar_depth(164, 3)
  return ResNet(**{"stage_sizes": (n, n, n), "widths": (64, 128, 256), "inner": (16, 32, 64),
                   "kind": "preact_bottleneck", "shortcut": "conv", **kw})


@register("preact_resnet18", "pre-activation ResNet-18 (4 stages of 2 blocks, widths 64-512, "
          "~11M parameters; the usual PGD-AT / TRADES / LAD CIFAR network)")
def preact_resnet18(**kw: Any) -> ResNet:
  return ResNet(**{"stage_sizes": (2, 2, 2, 2), "widths": (64, 128, 256, 512),
                   "strides": (1, 2, 2, 2), "stem_width": 64, "kind": "preact",
                   "shortcut": "conv", **kw})


@register("wrn34_10", "WideResNet-34-10 (Zagoruyko & Komodakis 2016), ~46M parameters")
def wrn34_10(**kw: Any) -> ResNet:
  return ResNet(**{"stage_sizes": (5, 5, 5), "widths": (160, 320, 640), "kind": "preact",
                   "shortcut": "conv", **kw})


@register("resnext29_8x64d", "ResNeXt-29 8x64d (Xie et al. 2017), ~34M parameters")
def resnext29_8x64d(**kw: Any) -> ResNet:
  return ResNet(**{"stage_sizes": (3, 3, 3), "widths": (256, 512, 1024),
                   "inner": (512, 1024, 2048), "groups": 8, "stem_width": 64,
                   "kind": "resnext", "shortcut": "conv", **kw})


@register("resnet8", "small CIFAR-style ResNet-8 (one basic block per stage) for 8x8 and "
          "28x28 inputs")
def resnet8(**kw: Any) -> ResNet:
  return _cifar_resnet(8, **kw)


@register("preact_resnet8", "small pre-activation ResNet-8 for 8x8 and 28x28 inputs")
def preact_resnet8(**kw: Any) -> ResNet:
  return _preact_resnet(8, **kw)


@register("mlp", "multilayer perceptron (two hidden layers of 256)")
def mlp(**kw: Any) -> MLP:
  return MLP(**kw)
