"""Layers that run on concrete arrays and on abstract values.

Each layer computes its concrete output with one linear function and hands the same
function to an :class:`~jaxdefense.nn.AbstractValue` when the input is abstract, so a
model written with these layers is certifiable without a second definition.

Layout: images are NHWC, convolution kernels HWIO, dense kernels ``[in, out]``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxdefense.nn._abstract import AbstractValue, is_abstract

Array = jax.Array
Initializer = Callable[..., Array]

# He-normal (fan-in) initialisation, as in the CIFAR ResNet papers and torchvision.
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
he_normal.__doc__ = """He-normal (fan-in) initialiser, the default kernel init of :class:`Conv`.

``he_normal(key, shape, dtype=None)`` draws from a (not truncated) normal with
variance ``2 / fan_in`` (``fan_in`` = product of every axis but the last, e.g.
``kh * kw * in`` for an HWIO kernel), as in the CIFAR ResNet papers and torchvision.
``dtype`` defaults to JAX's default float (float32).  Returns an array of ``shape``.
"""
# PyTorch's default for Linear/Conv weights (kaiming_uniform with a = sqrt(5)).
torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
torch_default.__doc__ = """PyTorch's weight initialiser, the default kernel of :class:`Dense`.

``torch_default(key, shape, dtype=None)`` draws uniformly in ``[-b, b]`` with
``b = 1 / sqrt(fan_in)`` (variance ``1 / (3 fan_in)``; ``kaiming_uniform`` with
``a = sqrt(5)``), ``fan_in`` the product of every axis but the last.  ``dtype`` defaults
to JAX's default float (float32).  Returns an array of ``shape``.
"""


# --------------------------------------------------------------------- functions
def relu(x: Any) -> Any:
  """ReLU on an array or an abstract value.

  An array ``x`` of any shape gives ``jax.nn.relu(x)`` (same shape and dtype); an
  :class:`AbstractValue` gives its sound image under the ReLU (``x.relu()``; the
  relaxation is the domain's choice).
  """
  return x.relu() if is_abstract(x) else jax.nn.relu(x)


def sigmoid(x: Any) -> Any:
  """Logistic sigmoid on an array or an abstract value.

  An array ``x`` of any shape gives ``jax.nn.sigmoid(x)`` (same shape); an abstract value
  gives its sound image through the domain's monotone transformer
  (``x.monotone(jax.nn.sigmoid)``).
  """
  return x.monotone(jax.nn.sigmoid) if is_abstract(x) else jax.nn.sigmoid(x)


def tanh(x: Any) -> Any:
  """tanh on an array or an abstract value.

  An array ``x`` of any shape gives ``jnp.tanh(x)`` (same shape); an abstract value gives
  its sound image through the domain's monotone transformer (``x.monotone(jnp.tanh)``).
  """
  return x.monotone(jnp.tanh) if is_abstract(x) else jnp.tanh(x)


def add(a: Any, b: Any) -> Any:
  """``a + b`` where either side may be abstract (generators aligned).

  The residual connection of the step rules.  Two arrays give ``a + b`` (NumPy
  broadcasting).  If ``a`` (else ``b``) is an :class:`AbstractValue` the result is
  ``a.add(b)``: the sum of two abstract values of one shape (shared generators add
  up, as the set of points ``{p + q}`` of correlated inputs), or an abstract value
  shifted by a concrete array.  The abstract domain raises on mismatched shapes.
  """
  if is_abstract(a):
    return a.add(b)
  if is_abstract(b):
    return b.add(a)
  return a + b


def scale_shift(x: Any, scale: Any, shift: Any = None) -> Any:
  """Elementwise ``x * scale + shift`` with concrete ``scale`` and ``shift``.

  Args:
    x: an array or an abstract value, e.g. ``[B, H, W, C]``.
    scale: a concrete array or float broadcastable against ``x`` (e.g. ``[C]``); may be
      negative.
    shift: a concrete array or float broadcastable against ``x``, or ``None`` (default:
      no shift).

  Returns:
    ``x * scale (+ shift)``, the shape of ``x``; an abstract value for abstract ``x``.
  """
  if is_abstract(x):
    return x.scale_shift(scale, shift)
  dtype = getattr(x, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    # mixed precision: float32 constants (batch statistics, normalisation) must not
    # promote a bfloat16 / float16 activation back to float32
    scale = jnp.asarray(scale).astype(dtype)
    shift = None if shift is None else jnp.asarray(shift).astype(dtype)
  out = x * scale
  return out if shift is None else out + shift


def linear_map(x: Any, fn: Callable[[Array], Array], *, fan_in: int | None = None) -> Any:
  """Apply a linear map with non-negative weights (reshape, pooling, padding).

  Args:
    x: an array or an abstract value.
    fn: a function of arrays that is linear with non-negative weights (selecting,
      padding with zeros, averaging).  The abstract path relies on this and does not
      check it: a map with negative weights (or an offset) gives unsound bounds.
    fan_in: the number of inputs that make up one output (a pooling window's size; ``0``
      for a map that only selects, moves or zero-pads values), which bounds the float
      rounding that ``sound=True`` domains account for.  ``None`` (default): every input
      of an example, always safe but looser under ``sound=True``.  Giving less than the
      true fan-in makes sound bounds unsound.

  Returns:
    ``fn(x)`` for an array; ``x.linear(fn)``, the image of the set, for an abstract value.

  Raises:
    ValueError: ``fan_in`` is not ``None`` or an int >= 0.
  """
  if fan_in is not None and (isinstance(fan_in, bool) or not isinstance(fan_in, int)
                             or fan_in < 0):
    raise ValueError(f"linear_map: fan_in must be None or an int >= 0 (inputs per output); "
                     f"got fan_in={fan_in!r}.")
  return x.linear(fn, fan_in=fan_in) if is_abstract(x) else fn(x)


def flatten(x: Any) -> Any:
  """Flatten every axis but the batch axis: ``[B, d1, d2, ...] -> [B, d1 * d2 * ...]``.

  Works on arrays and abstract values (row-major order, as ``reshape``); ``x`` must
  have rank >= 1 (a rank-1 ``[B]`` becomes ``[B, 1]``).
  """
  shape = tuple(x.shape)
  size = 1
  for d in shape[1:]:
    size *= d
  return x.reshape((shape[0], size))  # AbstractValue.reshape has the same meaning


def global_avg_pool(x: Any) -> Any:
  """Mean over the spatial axes of an NHWC batch: ``[B, H, W, C] -> [B, C]``.

  Works on arrays and abstract values (a linear map with non-negative weights).  An
  array of another rank than 4 is averaged over its axes 1 and 2 all the same.
  """
  fan_in = int(x.shape[1]) * int(x.shape[2]) if len(x.shape) >= 3 else None
  return linear_map(x, lambda a: jnp.mean(a, axis=(1, 2)), fan_in=fan_in)


def avg_pool(x: Any, window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: str = "VALID") -> Any:
  """Average pooling over the spatial axes of an NHWC batch.

  Args:
    x: an array or abstract value ``[B, H, W, C]``.
    window: pooling window, an int (square) or ``(wh, ww)``.
    strides: an int or ``(sh, sw)``; default ``None`` means ``window``
      (non-overlapping windows).
    padding: ``"VALID"`` (default; ``H_out = (H - wh) // sh + 1``) or ``"SAME"``
      (``H_out = ceil(H / sh)``, the zero padding counted in the mean: every output is a
      window sum divided by ``wh * ww``).

  Returns:
    ``[B, H_out, W_out, C]``; an abstract value for abstract ``x``.

  Raises:
    ValueError / TypeError: from ``lax.reduce_window`` for a bad rank, window or
      padding string.
  """
  window = (window, window) if isinstance(window, int) else tuple(window)
  strides = window if strides is None else (
      (strides, strides) if isinstance(strides, int) else tuple(strides))

  def fn(a):
    summed = lax.reduce_window(a, 0.0, lax.add, (1,) + window + (1,), (1,) + strides + (1,),
                               padding)
    return summed / float(window[0] * window[1])
  return linear_map(x, fn, fan_in=int(window[0]) * int(window[1]))


def concatenate(values: Sequence[Any], axis: int = -1) -> Any:
  """Concatenate arrays or abstract values along a non-batch axis.

  Args:
    values: a sequence of arrays, or a sequence of abstract values of one domain, equal
      in shape but along ``axis``.
    axis: the axis to join along; default -1 (channels of NHWC).  For abstract values it
      must not be the batch axis 0.

  Returns:
    ``jnp.concatenate(values, axis)`` for arrays; the joint abstract value (generators
    aligned) otherwise.

  Raises:
    TypeError: ``values`` mixes abstract and concrete values (lift the concrete ones to
      the domain first).
  """
  values = list(values)
  abstract = [v for v in values if is_abstract(v)]
  if not abstract:
    return jnp.concatenate(values, axis=axis)
  if len(abstract) != len(values):
    raise TypeError("concatenate: mix of abstract and concrete values is not supported; "
                    "lift the concrete parts to the abstract domain first.")
  return type(abstract[0]).concatenate(values, axis)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


# ------------------------------------------------------- convolution (concrete path)
_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv_plain(x: Array, kernel: Array, strides: tuple[int, int], padding: Any,
                groups: int) -> Array:
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_CONV_DIMS,
                                  feature_group_count=groups)


#: Smallest batch at which a one-input-channel convolution on an abstract value runs as
#: patches times a matrix on CPU (``benchmarks/certify.py``; below it XLA's convolution
#: is as fast and the slices cost more).
_PATCHES_MIN_BATCH = 16


def _conv_patches(x: Array, kernel: Array, strides: tuple[int, int], padding: Any
                  ) -> Array:
  """A convolution with one input channel as ``kh * kw`` strided slices times a matrix.

  XLA:CPU runs convolutions with one input channel (the first layer on grey-scale
  images) at a fraction of its usual rate; as an im2col product the same sums of
  ``kh * kw`` terms (in another order) run 1.4-2.3x faster from a batch of 32 on (the
  per-pixel zonotope maps ``p + B`` images through it).
  """
  kh, kw, _, features = kernel.shape
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
  x = jnp.pad(x[..., 0], ((0, 0), tuple(padding[0]), tuple(padding[1])))
  (sh, sw), (_, h, w) = strides, x.shape
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  patches = jnp.stack([x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                       for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(patches, kernel.reshape(kh * kw, features))


def _gather_copy(x: Array) -> Array:
  # An identity gather (iota indices over the batch axis): XLA's fusion pass counts a
  # gather as expensive, so it computes the value once into its own buffer instead of
  # recomputing the elementwise chain that produced it inside every consumer.
  n = x.shape[0]
  dnums = lax.GatherDimensionNumbers(offset_dims=tuple(range(1, x.ndim)),
                                     collapsed_slice_dims=(0,), start_index_map=(0,))
  return lax.gather(x, lax.broadcasted_iota(jnp.int32, (n, 1), 0), dnums,
                    (1,) + tuple(x.shape[1:]), indices_are_sorted=True,
                    unique_indices=True, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _materialize(x: Array) -> Array:
  """``x`` unchanged (bit for bit); on CPU it is computed into a buffer of its own.

  Used for the input of a convolution whose kernel gradient is taken: XLA:CPU computes
  that gradient as a convolution over transposed copies of the input, and without
  this it fuses the input's whole producer chain (batch norm, ReLU, every residual
  add back to the stage's start) into a transposing loop that reads its operands with a
  stride of one image, several times slower than a plain transpose of one buffer.
  Other platforms get the identity.
  """
  return lax.platform_dependent(x, cpu=_gather_copy, default=lambda a: a)


def _conv_input_tangent(tx: Array, kernel: Array, strides: tuple[int, int], padding: Any,
                        groups: int) -> Array:
  """The convolution's tangent in ``x``: the same values as ``_conv_plain(tx, kernel)``.

  The kernel is handed over transposed to HWOI (and the dimension numbers say so), so
  the arithmetic is unchanged, but the transpose of this linear map, the input gradient
  that reverse mode needs, comes out of XLA in a layout whose convolution takes XLA:CPU's
  fast path. With the HWIO kernel, the input gradient inside a ``lax`` loop (every
  iterative attack) ran 6-8x slower on a 2-core CPU (PGD-5 on ResNet-20, batch 128:
  8.25 s against 1.41 s, or 8.03 s against 0.98 s with the recommended XLA flags).
  Not measured on GPU.
  """
  kernel_oi = jnp.transpose(kernel, (0, 1, 3, 2))
  return lax.conv_general_dilated(tx, kernel_oi, strides, padding,
                                  dimension_numbers=("NHWC", "HWOI", "NHWC"),
                                  feature_group_count=groups)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, kernel: Array, strides: tuple[int, int], padding: Any,
          groups: int) -> Array:
  """``lax.conv_general_dilated`` (NHWC, HWIO) with a JVP that materialises ``x``.

  Same values and derivatives as the plain convolution (forward and reverse mode); the
  rule only changes what XLA:CPU fuses when the kernel's tangent is nonzero (training).
  """
  return _conv_plain(x, kernel, strides, padding, groups)


def _conv_jvp(strides, padding, groups, primals, tangents):
  x, kernel = primals
  tx, tk = tangents
  x_const, k_const = isinstance(tx, SymbolicZero), isinstance(tk, SymbolicZero)
  if not k_const:
    x = _materialize(x)
  y = _conv_plain(x, kernel, strides, padding, groups)
  ty = None
  if not x_const:
    ty = _conv_input_tangent(tx, kernel, strides, padding, groups)
  if not k_const:
    tk_y = _conv_plain(x, tk, strides, padding, groups)
    ty = tk_y if ty is None else ty + tk_y
  return y, (jnp.zeros_like(y) if ty is None else ty)


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


# ------------------------------------------------------------------------ modules
def _layer_path(module: nn.Module) -> str:
  path = "/".join(str(p) for p in module.path)
  return f"{type(module).__name__} layer {path!r}" if path else f"{type(module).__name__} layer"


def param(module: nn.Module, name: str, init: Initializer, shape: tuple[int, ...],
          *init_args: Any, mismatch: Callable[[tuple[int, ...]], str] | None = None
          ) -> Array:
  """``module.param(name, init, shape, *init_args)`` without Flax's per-trace shape probe.

  When the parameter exists, Flax checks its shape by tracing the initialiser
  (``jax.eval_shape``) on every application; for a ResNet that is about half the time
  of tracing the forward pass, paid by every compiled function that calls the model.
  Here the stored shape is compared with ``shape`` directly (nothing traced) and a
  mismatch is a ``ValueError`` that says which layer expected what; a missing parameter
  is created by Flax as usual.

  Args:
    mismatch: ``stored_shape -> message`` for the error (default: the layer, the
      parameter and both shapes).

  Raises:
    ValueError: the stored parameter's shape differs from ``shape``.
  """
  if not module.has_variable("params", name):
    return module.param(name, init, shape, *init_args)
  value = nn.meta.unbox(module.get_variable("params", name))
  stored = tuple(getattr(value, "shape", ()))
  if stored != tuple(shape):
    raise ValueError(mismatch(stored) if mismatch is not None else (
        f"{_layer_path(module)}: parameter {name!r} has shape {stored} in the given "
        f"variables, but the layer expects {tuple(shape)}: the variables belong to a "
        "different configuration of the model."))
  return value


class Dense(nn.Module):
  """Fully connected layer ``y = x W + b`` on ``[..., in] -> [..., features]``.

  Parameters: ``kernel`` ``[in, features]`` (``in`` taken from the last axis of the first
  input) and, when ``use_bias``, ``bias`` ``[features]``.  An abstract input is mapped
  soundly through the same affine function.

  Raises:
    ValueError: variables whose kernel does not fit the input (e.g. a model initialised
      on 8x8x1 images called on 8x8x3 ones): the message names the layer, the input
      size it expects and the one it got.

  Attributes:
    features: output size.
    use_bias: add a bias; default True.
    kernel_init: initialiser of the kernel; default :data:`torch_default` (PyTorch's
      ``nn.Linear``).
    bias_init: initialiser of the bias; default zeros.
  """
  features: int
  use_bias: bool = True
  kernel_init: Initializer = torch_default
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Any) -> Any:
    in_features = x.shape[-1]

    def mismatch(stored: tuple[int, ...]) -> str:
      if stored[:1] != (in_features,):
        return (f"{_layer_path(self)} expects inputs with {stored[0]} features (its kernel "
                f"is {stored}); got an input of shape {tuple(x.shape)} with {in_features} "
                "features: "
                "the input does not have the shape the model was initialised with (e.g. "
                "3-channel images for a 1-channel model, or another image size).")
      return (f"{_layer_path(self)} has a kernel of shape {stored} in the variables but is "
              f"built with {self.features} features: the variables belong to another model.")
    kernel = param(self, "kernel", self.kernel_init, (in_features, self.features),
                   mismatch=mismatch)
    bias = param(self, "bias", self.bias_init, (self.features,)) if self.use_bias else None
    if is_abstract(x):
      abs_kernel = _abs_kernel(self, kernel)
      return x.affine(lambda a: a @ kernel, lambda a: a @ abs_kernel, bias,
                      fan_in=int(in_features))
    y = x @ kernel
    return y if bias is None else y + bias


class Conv(nn.Module):
  """2-D convolution on NHWC batches with an HWIO kernel.

  Attributes:
    features: output channels.
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw).
    padding: ``"SAME"``, ``"VALID"``, an int (symmetric, as PyTorch's ``padding=``) or
      explicit ``((top, bottom), (left, right))``.  Default: ``kernel_size // 2`` on
      every side, which matches PyTorch's usual ``padding=k // 2``.
    feature_group_count: grouped convolution (ResNeXt); ``in_channels`` and
      ``features`` must both be divisible by it.

  Raises:
    ValueError: an input that is not of rank 4; channels or features not divisible by
      ``feature_group_count``; variables whose kernel does not fit the input (e.g. a
      model initialised on 1-channel images called on 3-channel ones): the message
      names the layer, the channel count it expects and the one it got.
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: Any = None
  feature_group_count: int = 1
  use_bias: bool = False
  kernel_init: Initializer = he_normal
  bias_init: Initializer = nn.initializers.zeros_init()

  def _padding(self, k: tuple[int, int]):
    p = self.padding
    if p is None:
      return ((k[0] // 2, k[0] // 2), (k[1] // 2, k[1] // 2))
    if isinstance(p, int):
      return ((p, p), (p, p))
    return p

  @nn.compact
  def __call__(self, x: Any) -> Any:
    if len(x.shape) != 4:
      raise ValueError(f"Conv expects an NHWC batch of rank 4; got shape {tuple(x.shape)}.")
    k = _pair(self.kernel_size)
    in_ch = x.shape[-1]
    g = self.feature_group_count
    if in_ch % g or self.features % g:
      raise ValueError(f"Conv: in_channels {in_ch} and features {self.features} must be "
                       f"divisible by feature_group_count {g}.")
    shape = k + (in_ch // g, self.features)

    def mismatch(stored: tuple[int, ...]) -> str:
      if stored[:2] + stored[3:] == shape[:2] + shape[3:]:
        return (f"{_layer_path(self)} expects inputs with {stored[2] * g} channels (its "
                f"kernel is {stored}); got an input of shape {tuple(x.shape)} with {in_ch} "
                "channels: the model and the data do not match (e.g. 3-channel RGB images "
                "for a model initialised on 1-channel grey-scale ones).")
      return (f"{_layer_path(self)} has a kernel of shape {stored} in the variables but is "
              f"built as {shape}: the variables belong to another model.")
    kernel = param(self, "kernel", self.kernel_init, shape, mismatch=mismatch)
    bias = param(self, "bias", self.bias_init, (self.features,)) if self.use_bias else None
    strides, padding = _pair(self.strides), self._padding(k)
    if not isinstance(padding, str):
      padding = tuple(tuple(int(v) for v in side) for side in padding)  # hashable

    def conv(a, w):
      if (in_ch == 1 and a.shape[0] >= _PATCHES_MIN_BATCH and
          jax.default_backend() == "cpu"):
        return _conv_patches(a, w, strides, padding)
      return _conv_plain(a, w, strides, padding, g)
    if is_abstract(x):
      abs_kernel = _abs_kernel(self, kernel)
      return x.affine(lambda a: conv(a, kernel), lambda a: conv(a, abs_kernel), bias,
                      fan_in=int(k[0] * k[1] * (in_ch // g)))
    y = _conv(x, kernel, strides, padding, g)
    return y if bias is None else y + bias


#: Collection of precomputed absolute kernels ``|W|`` (``jaxdefense.certify.prepare``),
#: which the abstract path of :class:`Dense` and :class:`Conv` uses instead of computing
#: ``jnp.abs(kernel)`` on every call.
ABS_KERNELS = "abs_kernels"


def _abs_kernel(layer: nn.Module, kernel: Array) -> Array:
  """``|kernel|``: the precomputed one of ``certify.prepare`` when the variables hold
  it (checked to have the kernel's shape), else computed here."""
  if layer.has_variable(ABS_KERNELS, "kernel"):
    stored = layer.get_variable(ABS_KERNELS, "kernel")
    if tuple(stored.shape) != tuple(kernel.shape):
      raise ValueError(f"{_layer_path(layer)}: the precomputed |kernel| in the "
                       f"'{ABS_KERNELS}' collection has shape {tuple(stored.shape)}, the "
                       f"kernel {tuple(kernel.shape)}: prepare the variables again "
                       "(jaxdefense.certify.prepare) after changing them.")
    return stored
  return jnp.abs(kernel)


class BatchNorm(nn.Module):
  """Batch normalisation over every axis but the last (channels).

  In training mode the batch statistics normalise the input and update the running
  averages in the ``batch_stats`` collection (``ra = momentum * ra + (1 - momentum) *
  batch``; PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here).  In evaluation mode
  the layer is the affine map ``x * scale + shift`` and so runs on abstract values.
  Under ``jit`` with a batch sharded over devices the statistics are global.

  Raises:
    ValueError: an abstract input in training mode (batch statistics of a set are
      undefined).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Initializer = nn.initializers.ones_init()

  @nn.compact
  def __call__(self, x: Any, train: bool = False) -> Any:
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    gamma = param(self, "scale", self.scale_init, (c,)) if self.use_scale else 1.0
    beta = param(self, "bias", nn.initializers.zeros_init(), (c,)) if self.use_bias else 0.0
    if train:
      if is_abstract(x):
        raise ValueError("BatchNorm in training mode cannot run on an abstract value; "
                         "call the model with train=False for certification.")
      axes = tuple(range(x.ndim - 1))
      xs = x.astype(jnp.float32)   # statistics in float32 also under mixed precision
      mean = jnp.mean(xs, axes)
      # One pass over the data: E[x^2] - E[x]^2 (fused with the mean by XLA).
      var = jnp.maximum(jnp.mean(jnp.square(xs), axes) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        m = self.momentum
        n = x.size // c
        ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
        # Unbiased running variance, as PyTorch keeps it.
        ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var) * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    scale = gamma * lax.rsqrt(var + self.epsilon)
    shift = beta - mean * scale
    return scale_shift(x, scale, shift)


def check_mean_std(mean: Any, std: Any, name: str = "Normalize") -> None:
  """Check normalisation constants: finite ``mean``, finite ``std > 0``, equal shapes.

  Used by :class:`Normalize` at construction and by the models' ``normalize`` field, so
  a zero standard deviation (which would give NaN or infinite logits everywhere) is
  rejected before anything runs.

  Args:
    mean: a float or a sequence of ``C`` floats (one per channel).
    std: a float or a sequence of ``C`` floats; every entry must be finite and ``> 0``.
    name: what the constants belong to, used in the messages.

  Raises:
    ValueError: non-numeric, non-finite or non-positive ``std`` entries, non-finite or
      non-numeric ``mean`` entries, or ``mean`` and ``std`` of different lengths; the
      message names the argument and shows its value.
  """
  arrays = {}
  for arg, value in (("mean", mean), ("std", std)):
    try:
      arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"{name}: {arg} must be a number or a sequence of numbers (one per "
                       f"channel); got {arg}={value!r}.") from None
    if arr.ndim > 1:
      raise ValueError(f"{name}: {arg} must be a number or a 1-D sequence (one per "
                       f"channel); got {arg}={value!r}.")
    if not np.all(np.isfinite(arr)):
      raise ValueError(f"{name}: {arg} must be finite; got {arg}={value!r}.")
    arrays[arg] = arr
  if np.any(arrays["std"] <= 0):
    raise ValueError(f"{name}: std must be > 0 in every channel (inputs are divided by it); "
                     f"got std={std!r}.")
  if arrays["mean"].shape != arrays["std"].shape:
    raise ValueError(f"{name}: mean and std must have the same length (one entry per "
                     f"channel); got mean={mean!r} and std={std!r}.")


class Normalize(nn.Module):
  """Per-channel input normalisation ``(x - mean) / std`` with fixed constants.

  Models keep this layer first, so attacks and certification work in [0, 1] pixel
  space while the network sees normalised inputs.

  Attributes:
    mean: ``C`` floats (or one for every channel), finite.
    std: ``C`` floats (or one), finite and ``> 0``.

  Call: ``Normalize(mean, std)(x)`` with ``x`` ``[..., C]`` (array or abstract value);
  returns the same shape.

  Raises:
    ValueError: at construction, constants rejected by :func:`check_mean_std` (a zero,
      negative or non-finite ``std``...); at the call, constants whose length is
      neither 1 nor the input's channel count.
  """
  mean: Sequence[float]
  std: Sequence[float]

  def __post_init__(self):
    check_mean_std(self.mean, self.std)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Any) -> Any:
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    if mean.shape != std.shape or (mean.ndim and mean.shape[-1] not in (1, x.shape[-1])):
      raise ValueError(f"Normalize: mean {tuple(self.mean)} and std {tuple(self.std)} must "
                       f"have one entry per channel ({x.shape[-1]}).")
    return scale_shift(x, 1.0 / std, -mean / std)


class ReLU(nn.Module):
  """ReLU as a module (for :class:`Sequential`): ``ReLU()(x) == relu(x)``.

  No parameters; works on arrays of any shape and on abstract values (see :func:`relu`).
  """

  def __call__(self, x: Any) -> Any:
    return relu(x)


class Sigmoid(nn.Module):
  """Logistic sigmoid as a module (for :class:`Sequential`): ``Sigmoid()(x) == sigmoid(x)``.

  No parameters; works on arrays of any shape and on abstract values (see :func:`sigmoid`).
  """

  def __call__(self, x: Any) -> Any:
    return sigmoid(x)


class Tanh(nn.Module):
  """tanh as a module (for :class:`Sequential`): ``Tanh()(x) == tanh(x)``.

  No parameters; works on arrays of any shape and on abstract values (see :func:`tanh`).
  """

  def __call__(self, x: Any) -> Any:
    return tanh(x)


class Flatten(nn.Module):
  """Flatten as a module: ``[B, d1, d2, ...] -> [B, d1 * d2 * ...]`` (see :func:`flatten`).

  No parameters; arrays and abstract values alike, e.g. between convolutions and a
  :class:`Dense` head.
  """

  def __call__(self, x: Any) -> Any:
    return flatten(x)


class AvgPool(nn.Module):
  """Average pooling as a module, over the spatial axes of ``[B, H, W, C]``.

  No parameters; ``AvgPool(window, strides, padding)(x) == avg_pool(x, window, strides,
  padding)`` on arrays and abstract values (see :func:`avg_pool` for the output shape
  and the errors).

  Attributes:
    window: an int (square) or ``(wh, ww)``; default 2.
    strides: an int or ``(sh, sw)``; default ``None`` means ``window``.
    padding: ``"VALID"`` (default) or ``"SAME"``.
  """
  window: int | Sequence[int] = 2
  strides: int | Sequence[int] | None = None
  padding: str = "VALID"

  def __call__(self, x: Any) -> Any:
    return avg_pool(x, self.window, self.strides, self.padding)


class GlobalAvgPool(nn.Module):
  """Global average pooling as a module: ``[B, H, W, C] -> [B, C]``.

  No parameters; the mean over the spatial axes (see :func:`global_avg_pool`), on arrays
  and abstract values, e.g. before the classifier of a ResNet.
  """

  def __call__(self, x: Any) -> Any:
    return global_avg_pool(x)


class PadShortcut(nn.Module):
  """Parameter-free "option A" shortcut of the CIFAR ResNets (He et al. 2016).

  Subsamples the spatial axes by ``stride`` and zero-pads the channels to ``features``
  (half the padding on each side), a linear map with non-negative weights.
  """
  features: int
  stride: int = 2

  def __call__(self, x: Any) -> Any:
    extra = self.features - x.shape[-1]
    if extra < 0:
      raise ValueError(f"PadShortcut cannot reduce channels {x.shape[-1]} -> {self.features}.")
    s = self.stride

    def fn(a):
      a = a[:, ::s, ::s, :]
      return jnp.pad(a, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return linear_map(x, fn, fan_in=0)


def _accepts_train(module: nn.Module) -> bool:
  try:
    return "train" in inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):  # pragma: no cover
    return False


class Sequential(nn.Module):
  """Apply ``layers`` in order; ``train`` is passed to the layers that take it.

  ``Sequential(layers)(x, train=False)`` calls ``layer(x, train=train)`` for a layer
  whose ``__call__`` has a ``train`` parameter (e.g. :class:`BatchNorm`) and ``layer(x)``
  for the others.  Each layer gets the previous one's output, so shapes must chain;
  abstract values pass through when every layer supports them.

  Attributes:
    layers: a sequence of Flax modules (an empty sequence is the identity).
  """
  layers: Sequence[nn.Module]

  def __call__(self, x: Any, train: bool = False) -> Any:
    for layer in self.layers:
      x = layer(x, train=train) if _accepts_train(layer) else layer(x)
    return x
