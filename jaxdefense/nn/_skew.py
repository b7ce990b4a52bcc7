"""Skew-symmetric vector fields: the stable ODE blocks of SONet.

A neural ODE ``dx/dt = act(A x + b)`` is input-output stable when the linear part ``A``
has eigenvalues with non-positive real parts.  A skew-symmetric ``A = W - W^T`` has purely
imaginary eigenvalues (its flow is a rotation: it keeps ``||x||``); subtracting
``gamma I`` moves every real part to ``-gamma`` (a contraction at rate ``gamma``).  This
is the AntisymmetricRNN / Haber–Ruthotto parametrisation we use for SONet (the paper is
known to us by its abstract only; see ``shared/papers/NOTES.md`` section 3):

* dense: ``dx/dt = act((W - W^T - gamma I) x + b)``  (:class:`SkewSymmetricDense`);
* convolutional: ``dx/dt = act(K x - K^T x - gamma x + b)`` (:class:`SkewSymmetricConv`),
  with ``K`` a same-channel convolution and ``K^T`` its adjoint: the transposed
  convolution with the same kernel (not a second kernel).

For an odd kernel, stride 1 and symmetric zero padding, ``K^T`` is the convolution with
the kernel flipped in space and with its input and output channels swapped, so
``K - K^T`` is one convolution with the kernel ``K - flip(K)^T``: a skew-symmetric
field costs one convolution per evaluation, like an ordinary one.

Both modules are vector fields for :class:`jaxdefense.dynamics.ODEBlock`: they take
``field(x)`` or ``field(t, x)`` (the time is ignored: autonomous fields) and return an
array of the shape of ``x``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdefense import _checks
from jaxdefense.nn import _layers as L

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
}


def _check_common(module: nn.Module) -> None:
  _checks.check_float(module.gamma, "gamma", minimum=0.0)
  _checks.check_choice(module.act, "act", tuple(ACTIVATIONS))


def _state(args: tuple[Any, ...], name: str) -> Array:
  """``field(x)`` or ``field(t, x)`` -> ``x``."""
  if len(args) not in (1, 2):
    raise TypeError(f"{name} is called as field(x) or field(t, x); got {len(args)} "
                    "positional arguments.")
  return args[-1]


def skew_kernel(kernel: Array) -> Array:
  """The kernel of ``K - K^T`` for a same-channel HWIO kernel ``K`` of odd size.

  ``K^T`` (the adjoint of the convolution with zero padding ``k // 2``) is the
  convolution whose kernel is ``K`` flipped in both spatial axes with its input and
  output channels swapped.

  Args:
    kernel: ``[kh, kw, C, C]`` with odd ``kh``, ``kw``.

  Returns:
    ``[kh, kw, C, C]``, the kernel of the skew-adjoint operator ``K - K^T``.

  Raises:
    ValueError: a kernel that is not ``[kh, kw, C, C]`` with odd sizes.
  """
  kh, kw, ci, co = kernel.shape
  if ci != co or kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"skew_kernel needs a same-channel kernel of odd size [kh, kw, C, C]; "
                     f"got shape {tuple(kernel.shape)}.")
  return kernel - jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))


def _im2col_matmul(x: Array, kernel: Array) -> Array:
  """The same-padded stride-1 convolution as one matmul of the ``kh * kw`` shifted
  copies of ``x`` (im2col) with the flattened kernel; its transpose in the kernel, the
  kernel gradient, is one matmul as well."""
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                         axis=-1)
  return cols @ kernel.reshape(-1, kernel.shape[-1])


def _padding(kernel: Array) -> tuple[tuple[int, int], tuple[int, int]]:
  kh, kw = kernel.shape[:2]
  return ((kh // 2, kh // 2), (kw // 2, kw // 2))


@jax.custom_jvp
def same_conv(x: Array, kernel: Array) -> Array:
  """Stride-1 convolution with zero padding ``k // 2`` (odd kernels), NHWC x HWIO.

  The values are those of ``lax.conv_general_dilated``; the derivative rule is chosen
  for the ODE solvers' loops, where XLA:CPU misses its fast convolution path: the input
  tangent goes through the HWOI layout of :mod:`jaxdefense.nn` (whose transpose, the
  input gradient, takes the fast path) and, on CPU, the kernel tangent is one im2col
  matmul (whose transpose, the kernel gradient, is a matmul too).  A Dopri5 solve of a
  16-channel field on 128 x 28 x 28 states: gradient in the input and the kernel 10.6 s
  with the plain convolution, 1.9 s with shifted matmuls for the kernel tangent (2-core
  CPU, loaded); im2col takes another 12 % off (RK4, 64 x 32 x 32: 2.26 s -> 1.99 s).
  """
  return L._conv_plain(x, kernel, (1, 1), _padding(kernel), 1)


@same_conv.defjvp
def _same_conv_jvp(primals, tangents):
  x, kernel = primals
  tx, tk = tangents
  out = same_conv(x, kernel)
  pad = _padding(kernel)
  t_in = L._conv_input_tangent(tx, kernel, (1, 1), pad, 1)
  t_kernel = jax.lax.platform_dependent(
      L._materialize(x), tk, cpu=_im2col_matmul,
      default=lambda a, k: L._conv_plain(a, k, (1, 1), pad, 1))
  return out, t_in + t_kernel


class SkewSymmetricDense(nn.Module):
  """``dx/dt = act((W - W^T - gamma I) x + b)`` on ``[..., D]`` states.

  ``W`` is a ``D x D`` parameter (``D`` the input's last axis); only its skew part
  ``W - W^T`` acts, so the linear part has eigenvalues ``-gamma + i omega``.  With the
  identity activation, zero bias and ``gamma = 0`` the flow keeps ``||x||``; with
  ``gamma > 0`` it contracts at rate ``gamma``.

  Attributes:
    gamma: damping ``>= 0`` (default 0.1).
    act: ``"tanh"`` (default), ``"relu"``, ``"softplus"`` or ``"identity"``.
    use_bias: add the bias ``b`` (zero-initialised).
    kernel_init: initialiser of ``W`` (default LeCun normal: variance ``1 / D``).

  Call: ``field(x)`` or ``field(t, x)`` (``t`` ignored) -> array of ``x``'s shape.

  Raises:
    ValueError: at construction, ``gamma < 0`` or an unknown ``act``.
  """
  gamma: float = 0.1
  act: str = "tanh"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()

  def __post_init__(self):
    _check_common(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, *args: Any) -> Array:
    x = _state(args, "SkewSymmetricDense")
    d = x.shape[-1]
    w = L.param(self, "kernel", self.kernel_init, (d, d), x.dtype)
    # row vectors: x (W - W^T - gamma I)^T = x (W^T - W) - gamma x
    y = x @ (w.T - w) - self.gamma * x
    if self.use_bias:
      y = y + L.param(self, "bias", nn.initializers.zeros_init(), (d,), x.dtype)
    return ACTIVATIONS[self.act](y)


class SkewSymmetricConv(nn.Module):
  """``dx/dt = act(K x - K^T x - gamma x + b)`` on NHWC states with ``C`` channels.

  ``K`` is a ``kernel_size x kernel_size`` convolution from ``C`` to ``C`` channels
  (stride 1, zero padding ``kernel_size // 2``) and ``K^T`` its adjoint, the transposed
  convolution with the same kernel; ``K - K^T`` is skew-adjoint
  (``<u, (K - K^T) v> = -<(K - K^T) u, v>``) and is applied as one convolution with the
  kernel :func:`skew_kernel` ``(K)``.

  Attributes:
    gamma: damping ``>= 0`` (default 0.1).
    act: ``"tanh"`` (default), ``"relu"``, ``"softplus"`` or ``"identity"``.
    kernel_size: odd spatial size of ``K`` (default 3).
    use_bias: add a per-channel bias ``b`` (zero-initialised).
    kernel_init: initialiser of ``K`` (default LeCun normal: variance
      ``1 / (kernel_size^2 C)``).
    loop_conv: the convolution's derivative rule.  ``True`` (default):
      :func:`same_conv`'s, tuned for solver loops (diffrax's while loops), where XLA:CPU
      misses its fast convolution path.  ``False``: the library's ``Conv`` rule, about
      twice as fast outside a loop (a gradient of 4 unrolled RK4 steps on 64 x 32 x 32 x
      16: 0.47 s against 0.84 s); :class:`~jaxdefense.dynamics.ODEBlock` with
      ``adjoint="unrolled"`` switches to it by itself.  Values are identical.

  Call: ``field(x)`` or ``field(t, x)`` (``t`` ignored) with ``x`` ``[B, H, W, C]``.

  Raises:
    ValueError: at construction, ``gamma < 0``, an unknown ``act``, an even or
      non-positive ``kernel_size``; at the call, an input that is not of rank 4.
  """
  gamma: float = 0.1
  act: str = "tanh"
  kernel_size: int = 3
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  loop_conv: bool = True

  def __post_init__(self):
    _check_common(self)
    k = _checks.check_int(self.kernel_size, "kernel_size", minimum=1)
    if k % 2 == 0:
      raise ValueError(f"kernel_size must be odd (the adjoint of a zero-padded convolution "
                       f"is a convolution only for symmetric padding); got {k}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, *args: Any) -> Array:
    x = _state(args, "SkewSymmetricConv")
    if x.ndim != 4:
      raise ValueError(f"SkewSymmetricConv expects an NHWC state of rank 4; got shape "
                       f"{tuple(x.shape)}.")
    c, k = x.shape[-1], self.kernel_size
    kernel = L.param(self, "kernel", self.kernel_init, (k, k, c, c), x.dtype)
    sk = skew_kernel(kernel)
    if self.loop_conv:
      y = same_conv(x, sk) - self.gamma * x
    else:
      y = L._conv(x, sk, (1, 1), _padding(sk), 1) - self.gamma * x
    if self.use_bias:
      y = y + L.param(self, "bias", nn.initializers.zeros_init(), (c,), x.dtype)
    return ACTIVATIONS[self.act](y)
