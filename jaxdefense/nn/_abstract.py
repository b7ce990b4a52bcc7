"""The contract between the layers of :mod:`jaxdefense.nn` and abstract domains.

Every layer in :mod:`jaxdefense.nn` runs on plain arrays *and* on abstract values
(sets of inputs, such as the ``Box`` and ``HybridZonotope`` of
:mod:`jaxdefense.certify`).  A layer tells an abstract value what it does through the
small set of operations below; the domain decides how to propagate its set through
them.  The layers never import a concrete domain, so ``nn`` stays below ``certify`` in
the import order and one model definition serves concrete and abstract execution.

All functions handed to a domain act on a *batch*: an array whose leading axis is a
batch axis of any size.  A domain may call them on its centre ``[B, ...]`` and on its
generators reshaped to ``[m * B, ...]``.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Sequence

import jax

Array = jax.Array
LinearFn = Callable[[Array], Array]


class AbstractValue(abc.ABC):
  """Base class of abstract domains understood by :mod:`jaxdefense.nn` layers.

  Subclasses must be registered as JAX pytrees, so that they pass through ``jit``,
  ``vmap`` and ``grad``.  Shapes always include the batch axis, exactly as the concrete
  array they abstract.
  """

  # ----------------------------------------------------------------- structure
  @property
  @abc.abstractmethod
  def shape(self) -> tuple[int, ...]:
    """Shape of the concrete arrays this value abstracts, batch axis included."""

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @abc.abstractmethod
  def center(self) -> Array:
    """A concrete point inside the set (the centre), same shape as ``self.shape``."""

  @abc.abstractmethod
  def concretize(self) -> tuple[Array, Array]:
    """Interval bounds ``(lower, upper)``, each of shape ``self.shape``."""

  # ---------------------------------------------------------------- linear maps
  @abc.abstractmethod
  def affine(self, linear_fn: LinearFn, abs_linear_fn: LinearFn | None,
             bias: Array | None = None, *, fan_in: int | None = None) -> "AbstractValue":
    """Image under ``x -> linear_fn(x) + bias``.

    Args:
      linear_fn: a linear map of a batch (no bias), e.g. a convolution with kernel W.
      abs_linear_fn: the same map with every weight replaced by its absolute value
        (``|W|``), used for uncorrelated radii.  ``None`` means the map has
        non-negative weights (reshapes, pooling, padding), so ``linear_fn`` serves.
      bias: added after the map; broadcast against the output (without batch axis
        or with it).
      fan_in: how many inputs make up one output (a convolution's ``kh * kw * C_in /
        groups``, a dense layer's input size, a pooling window's size), which bounds the
        float rounding a sound domain accounts for; ``0`` for a map that only moves,
        selects or zero-pads values (exact in floating point).  ``None`` (default): every
        input of an example, always safe.  A value below the true fan-in makes the
        rounding bounds of ``sound=True`` domains unsound.
    """

  def linear(self, fn: LinearFn, *, fan_in: int | None = None) -> "AbstractValue":
    """Image under a linear map with non-negative weights (reshape, average pool);
    ``fan_in`` as in :meth:`affine`."""
    return self.affine(fn, None, None, fan_in=fan_in)

  @abc.abstractmethod
  def scale_shift(self, scale: Array | float, shift: Array | float | None = None
                  ) -> "AbstractValue":
    """Elementwise ``x * scale + shift`` with concrete, broadcastable ``scale``/``shift``.

    ``scale`` may be negative.  Eval-mode batch norm, input normalisation and the
    damped residual steps use this.
    """

  def reshape(self, shape: Sequence[int]) -> "AbstractValue":
    """Reshape every concrete point to ``shape`` (batch axis included)."""
    tail = tuple(shape)[1:]
    return self.linear(lambda a: a.reshape((a.shape[0],) + tail), fan_in=0)

  # --------------------------------------------------------------- nonlinearities
  @abc.abstractmethod
  def relu(self) -> "AbstractValue":
    """Sound image under the ReLU (the relaxation is the domain's choice)."""

  @abc.abstractmethod
  def monotone(self, fn: Callable[[Array], Array]) -> "AbstractValue":
    """Sound image under an elementwise non-decreasing function (sigmoid, tanh)."""

  # ------------------------------------------------------------------ arithmetic
  @abc.abstractmethod
  def add(self, other: "AbstractValue | Array") -> "AbstractValue":
    """Sum with another abstract value (generators aligned) or a concrete array."""

  def __add__(self, other: Any) -> "AbstractValue":
    return self.add(other)

  def __radd__(self, other: Any) -> "AbstractValue":
    return self.add(other)

  def __mul__(self, scale: Any) -> "AbstractValue":
    return self.scale_shift(scale, None)

  def __rmul__(self, scale: Any) -> "AbstractValue":
    return self.scale_shift(scale, None)

  def __sub__(self, other: Any) -> "AbstractValue":
    if isinstance(other, AbstractValue):
      return self.add(other.scale_shift(-1.0, None))
    return self.add(-other)

  def __neg__(self) -> "AbstractValue":
    return self.scale_shift(-1.0, None)

  @classmethod
  @abc.abstractmethod
  def concatenate(cls, values: Sequence["AbstractValue"], axis: int) -> "AbstractValue":
    """Concatenate along a non-batch ``axis`` (generators aligned)."""

  # -------------------------------------------------------------- abstract layers
  # Hooks for the abstract layers of :mod:`jaxdefense.nn` (CorrelateMaxK, ...).  A domain
  # without correlated generators (a box) keeps the defaults: correlation changes
  # nothing it can represent, and it has nothing to decorrelate.  None of these hooks
  # may change the set of concrete points the value represents (``concretize`` of the
  # result is the same interval up to rounding).

  @property
  def num_generators(self) -> int:
    """Number of correlated generators (static); 0 for domains without any."""
    return 0

  def uncorrelated_radius(self) -> Array:
    """The non-negative radius not shared with other variables, shape ``self.shape``.

    For a box this is its half-width; for a hybrid zonotope its box part ``b``.
    """
    lo, hi = self.concretize()
    return (hi - lo) / 2

  def correlate(self, indices: Array, valid: Array | None = None) -> "AbstractValue":
    """Turn the uncorrelated radius of the selected variables into new generators.

    Args:
      indices: int ``[B, k]``, per example ``k`` (static) indices into the variables
        of one example flattened in C order.
      valid: optional bool ``[B, k]``; a ``False`` entry adds an all-zero generator
        (used to skip duplicate selections while keeping ``k`` static).

    Returns:
      A value with ``k`` more generators (domains without generators return ``self``).
    """
    del indices, valid
    return self

  def correlate_all(self) -> "AbstractValue":
    """Give every variable's uncorrelated radius its own generator."""
    return self

  def decorrelate(self, keep: int = 0) -> "AbstractValue":
    """Fold all but ``keep`` generators into the uncorrelated radius.

    The ``keep`` generators with the largest total absolute value (per example) stay,
    in their original order; ``keep=0`` folds all of them (DecorrelateAll).
    """
    del keep
    return self


def is_abstract(x: Any) -> bool:
  """Whether ``x`` is an abstract value (``Box``, ``HybridZonotope``) rather than an array.

  Layers use it to dispatch between concrete and abstract execution.

  Args:
    x: any object (a NumPy or JAX array, a tracer, an abstract value).

  Returns:
    ``isinstance(x, AbstractValue)``; never raises.
  """
  return isinstance(x, AbstractValue)


def concrete_shape(x: Any) -> tuple[int, ...]:
  """Shape of ``x``, concrete or abstract."""
  return tuple(x.shape)
