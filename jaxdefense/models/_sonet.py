"""SONet: networks with stable skew-symmetric neural ODE blocks, and their fixed-step twins.

The SONet abstract (papers/sonet_stable_neural_ode_abstract.txt) fixes two things we
build: ODE blocks whose vector field is skew-symmetric (input-output stable), solved by
the adaptive DOPRI5, and "replacing only the first layer of a ResNet by such a ODE
block".  Everything else (the field's form, the activation, the damping, where the
blocks sit in the all-ODE network) is our interpretation, documented in
``shared/papers/NOTES.md`` section 3 and kept in fields:

* ``sonet_resnet20`` / ``sonet_resnet8``: the pre-activation ResNet-20 / ResNet-8 with
  its first residual block (16 -> 16 channels, stride 1) replaced by one ODE block with
  a :class:`~jaxdefense.nn.SkewSymmetricConv` field;
* ``sonet_small``: an all-ODE network for Fashion-MNIST and digits: stem conv -> ODE
  block (16 channels) -> strided conv -> ODE block (32 channels) -> pool -> dense.

:func:`fixed_step_twin` gives the same network with a fixed-step solver (same weights),
the source model of the transfer attacks of the gradient-masking study.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn

from jaxdefense import _checks
from jaxdefense.dynamics import DEFAULT_CHECKPOINTS, ODEBlock
from jaxdefense.models import _slots
from jaxdefense.models._ensemble import Ensemble
from jaxdefense.models._fields import check_fields
from jaxdefense.models._registry import register
from jaxdefense.models._resnet import ResidualBlock
from jaxdefense.nn import _layers as L
from jaxdefense.nn._skew import SkewSymmetricConv

__all__ = ["SONet", "fixed_step_twin", "with_solver", "ODE_FIELDS"]

ODE_FIELDS = ("solver", "t1", "n_steps", "adaptive", "rtol", "atol", "max_steps", "adjoint",
              "checkpoints")
"""The fields of a :class:`SONet` that configure its ODE solves (see
:class:`jaxdefense.dynamics.ODEBlock`)."""


class SONet(nn.Module):
  """Stem -> skew-symmetric ODE blocks -> pre-activation residual stages -> logits.

  Layout: [Normalize] -> 3x3 stem conv (``ode_widths[0]`` channels) -> for each width
  ``w_i`` of ``ode_widths``: (for ``i > 0``: 3x3 conv with stride 2 to ``w_i`` channels,
  batch norm, ReLU) and an :class:`~jaxdefense.dynamics.ODEBlock` whose field is a
  :class:`~jaxdefense.nn.SkewSymmetricConv` on ``[0, t1]`` -> residual stages
  (``stage_sizes`` blocks of ``kind`` per stage, as :class:`~jaxdefense.models.ResNet`)
  -> batch norm, ReLU -> global average pool -> dense.

  Attributes:
    ode_widths: channels of each ODE block (``(16,)`` for the ResNet variants).
    stage_sizes: residual blocks per stage after the ODE blocks (``()`` for none).
    widths: output channels of each residual stage.
    strides: stride of the first block of each residual stage.
    kind: residual block kind (default ``"preact"``).
    num_classes: number of logits.
    normalize: ``(mean, std)`` per channel, applied first.
    solver: ODE solver (default ``"dopri5"``; see :func:`jaxdefense.dynamics.solve_ode`).
    t1: integration time ``T`` of every ODE block.
    n_steps: fixed steps, or ``T / dt0`` for adaptive solvers.
    adaptive: adaptive steps (default: for the adaptive solvers).
    rtol: relative tolerance (adaptive).
    atol: absolute tolerance (adaptive).
    max_steps: step budget of an adaptive solve.
    adjoint: ``"recursive"`` (discretise-then-optimise), ``"backsolve"`` (continuous
      adjoint), ``"direct"`` or, for fixed steps, ``"unrolled"`` (every stage stored):
      how gradients (training, and white-box attacks) go through the solver.
    checkpoints: solver states a ``"recursive"`` gradient stores (default 16; see
      :func:`jaxdefense.dynamics.solve_ode`).
    gamma: damping of the skew-symmetric fields (``>= 0``).
    act: activation of the fields (``"tanh"``, ``"relu"``, ``"softplus"``,
      ``"identity"``).
    kernel_size: odd kernel size of the fields.

  Call: ``model.apply(variables, x, train=False, perturbations=None,
  capture_states=False)`` with NHWC images in [0, 1]; ``perturbations`` has one entry
  (or ``None``) per block (ODE blocks first, then residual blocks), added to that
  block's output; ``capture_states=True`` returns ``(logits, states)``.  Pass
  ``mutable=["ode_stats"]`` to get the solvers' statistics
  (:func:`jaxdefense.dynamics.ode_stats`).

  Raises:
    ValueError: at construction, a bad size, an unknown solver or adjoint, a non-positive
      tolerance, ``gamma < 0``, an even kernel size; at the call, images of the wrong
      rank or outside [0, 1], a perturbation list of the wrong length.
  """
  ode_widths: Sequence[int] = (16,)
  stage_sizes: Sequence[int] = (2, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
  strides: Sequence[int] = (1, 2, 2)
  kind: str = "preact"
  num_classes: int = 10
  normalize: tuple[Sequence[float], Sequence[float]] | None = None
  solver: str = "dopri5"
  t1: float = 1.0
  n_steps: int = 1
  adaptive: bool | None = None
  rtol: float = 1e-3
  atol: float = 1e-3
  max_steps: int = 1000
  adjoint: str = "recursive"
  checkpoints: int | None = DEFAULT_CHECKPOINTS
  gamma: float = 0.1
  act: str = "tanh"
  kernel_size: int = 3

  def __post_init__(self):
    check_fields(self, positive=("num_classes",),
                 positive_seqs=("ode_widths", "widths", "strides"),
                 nonnegative_seqs=("stage_sizes",))
    if not len(self.ode_widths):
      raise ValueError("SONet.ode_widths must hold at least one ODE block's width; got ().")
    if len(self.widths) != len(self.stage_sizes) or len(self.strides) != len(self.stage_sizes):
      raise ValueError(f"SONet: widths {tuple(self.widths)} and strides "
                       f"{tuple(self.strides)} need one entry per residual stage "
                       f"({len(self.stage_sizes)}).")
    self._ode_block(self.ode_widths[0], parent=None)  # checks the solver and field fields
    super().__post_init__()

  @property
  def num_blocks(self) -> int:
    return len(self.ode_widths) + int(sum(self.stage_sizes))

  def _ode_block(self, width: int, **kw: Any) -> ODEBlock:
    del width  # the field takes its channels from its input
    field = SkewSymmetricConv(gamma=self.gamma, act=self.act, kernel_size=self.kernel_size,
                              parent=None)
    return ODEBlock(field, t1=self.t1, solver=self.solver, n_steps=self.n_steps,
                    adaptive=self.adaptive, rtol=self.rtol, atol=self.atol,
                    max_steps=self.max_steps, adjoint=self.adjoint,
                    checkpoints=self.checkpoints, time_dependent=False,
                    **kw)

  @nn.compact
  def __call__(self, x: Any, train: bool = False, perturbations: Sequence[Any] | None = None,
               capture_states: bool = False) -> Any:
    _checks.check_images(x, "x")
    with_stem, stem_delta, perturbations = _slots.split_perturbations(
        perturbations, self.num_blocks, "SONet")

    def perturb(h: Any, index: int) -> Any:
      return _slots.add(h, None if perturbations is None else perturbations[index])

    if self.normalize is not None:
      x = L.Normalize(*self.normalize)(x)
    x = L.Conv(self.ode_widths[0], 3, 1)(x)
    states, index = [], 0
    if with_stem:
      x = _slots.add(x, stem_delta)
      states.append(x)
    for i, width in enumerate(self.ode_widths):
      if i > 0:
        x = L.Conv(width, 3, 2, name=f"down{i}")(x)
        x = L.relu(L.BatchNorm(name=f"down{i}_bn")(x, train))
      x = perturb(self._ode_block(width, name=f"ode{i}")(x), index)
      states.append(x)
      index += 1
    for stage, (n, width, stride) in enumerate(zip(self.stage_sizes, self.widths,
                                                   self.strides)):
      for i in range(n):
        x = ResidualBlock(features=width, stride=stride if i == 0 else 1, kind=self.kind,
                          index=index, shortcut="conv", name=f"block{index}")(
                              x, train, None if perturbations is None else
                              perturbations[index])
        states.append(x)
        index += 1
    x = L.relu(L.BatchNorm()(x, train))
    x = L.global_avg_pool(x)
    logits = L.Dense(self.num_classes)(x)
    return (logits, states) if capture_states else logits


def with_solver(model: nn.Module, **fields: Any) -> nn.Module:
  """A copy of ``model`` whose ODE solves use other settings (same variables).

  Args:
    model: a :class:`SONet` (or an :class:`~jaxdefense.models.Ensemble` of them).
    **fields: any of :data:`ODE_FIELDS` (``solver``, ``n_steps``, ``rtol``, ``atol``,
      ``adjoint``, ...).

  Returns:
    The model with those fields replaced; its variables are the original's.

  Raises:
    ValueError: ``model`` has no ODE blocks, a field that is not a solver setting, or
      a bad value (checked as at construction).
  """
  unknown = sorted(set(fields) - set(ODE_FIELDS))
  if unknown:
    raise ValueError(f"with_solver takes the solver settings {list(ODE_FIELDS)}; got "
                     f"{unknown}.")
  if isinstance(model, Ensemble):
    return model.clone(member=with_solver(model.member, **fields))
  if not isinstance(model, SONet):
    raise ValueError(f"with_solver needs a model with ODE blocks (a SONet); got "
                     f"{type(model).__name__}.")
  return model.clone(**fields)


def fixed_step_twin(model: nn.Module, solver: str = "rk4", n_steps: int = 10,
                    adjoint: str = "unrolled") -> nn.Module:
  """The fixed-step twin of an ODE model: same weights, ``n_steps`` steps of ``solver``.

  The source model of the transfer attacks of the SONet gradient-masking study: its
  gradients are those of an ordinary deep network (``n_steps`` residual-like stages per
  ODE block), free of the adaptive controller's step selection.

  Args:
    model: a :class:`SONet` (or an ensemble of them).
    solver: a solver taken with fixed steps (``"rk4"`` default, ``"euler"``,
      ``"heun"``, ``"midpoint"``, ``"ralston"``, or an adaptive one in fixed steps).
    n_steps: number of equal steps on ``[0, t1]`` (``>= 1``).
    adjoint: the twin's gradient mode: ``"unrolled"`` (default: straight-line steps with
      every stage stored, the fastest gradient, as an attacker of the twin wants; see
      :func:`jaxdefense.dynamics.solve_ode`) or ``"recursive"`` (diffrax's checkpointed
      loop, less memory).  Both give the same gradients to float rounding.

  Returns:
    The twin model; apply it with the original's variables.

  Raises:
    ValueError: as :func:`with_solver`; ``n_steps < 1``.
  """
  n_steps = _checks.check_int(n_steps, "n_steps", minimum=1)
  return with_solver(model, solver=solver, n_steps=n_steps, adaptive=False, adjoint=adjoint)


@register("sonet_resnet20", "SONet: pre-activation ResNet-20 whose first residual block is a "
          "skew-symmetric conv ODE block solved by Dopri5")
def sonet_resnet20(**kw: Any) -> SONet:
  return SONet(**{"ode_widths": (16,), "stage_sizes": (2, 3, 3), "widths": (16, 32, 64),
                  "strides": (1, 2, 2), **kw})


@register("sonet_resnet8", "SONet: pre-activation ResNet-8 whose first residual block is a "
          "skew-symmetric conv ODE block (small, for CPU studies)")
def sonet_resnet8(**kw: Any) -> SONet:
  return SONet(**{"ode_widths": (16,), "stage_sizes": (0, 1, 1), "widths": (16, 32, 64),
                  "strides": (1, 2, 2), **kw})


@register("sonet_small", "SONet: all-ODE network (two skew-symmetric conv ODE blocks, 16 and "
          "32 channels) for Fashion-MNIST and digits")
def sonet_small(**kw: Any) -> SONet:
  return SONet(**{"ode_widths": (16, 32), "stage_sizes": (), "widths": (), "strides": (),
                  **kw})
