"""Abstract domains: the interval ``Box`` and the DiffAI ``HybridZonotope``.

Both are JAX pytrees (``jax.tree_util.register_pytree_node_class``): their arrays are
leaves and their configuration is static, so they pass through ``jit``, ``vmap``,
``grad`` and ``tree_map`` like arrays, and every transformer is differentiable, so the
bounds can be a training loss.  Shapes always include the batch axis ``B`` of the
concrete arrays the value abstracts (NHWC images: ``[B, H, W, C]``).

Hybrid zonotope (Mirman et al. 2018; Mirman, Singh & Vechev 2019, section 2) over the
``p`` variables of each example::

    x = c + b * beta + sum_j E_j * e_j,      beta in [-1, 1]^p,  e in [-1, 1]^m

with centre ``c`` ``[B, ...]``, non-negative box radius ``b`` ``[B, ...]`` and ``m``
correlated generators ``E`` ``[m, B, ...]`` (a leading generator axis of static size).
A box is a hybrid zonotope with ``m = 0``: the two domains meet in one place,
``_promote``, which every binary operation (``add``, ``concatenate``) and
``linear_bounds`` go through, so a box and a zonotope combine into a zonotope.

Noise symbols are tracked in *segments*: ``segments`` is a static tuple of
``(tag, size)`` pairs that partitions the generator axis.  Every operation that creates
new noise symbols (a DeepZ ReLU, a correlation layer, DecorrelateMinK's re-packing)
opens a segment with a fresh tag.  ``add`` and ``concatenate`` align two values segment
by segment (zero padding what one side lacks), so generators that two residual branches
created independently stay distinct symbols.  Treating one symbol as two is sound (only
less precise); merging two independent ones would not be, and never happens.

Soundness holds in exact arithmetic.  By default (``sound=False``, the fast path that
training uses) the float32 implementation does not round outwards, so bounds may be off
by a few ulps.  With ``sound=True`` (a static flag of both domains, set by
``jaxdefense.certify.input_set(..., sound=True)`` and on by default in ``verify``) every
transformer widens its result by a bound on the float rounding of *both* the abstract
computation and the concrete float network, so that the concretisation (read in exact
arithmetic) contains every value the float32 network computes; interval bounds are then
rounded outwards (``nextafter`` towards -inf / +inf).  The error model:

* ``u = eps_machine / 2`` (``2**-24`` for float32, round to nearest) and ``gamma(k) =
  k u / (1 - k u)``.  A dot product or sum of ``k`` terms computed in any order, with or
  without fused multiply-add, satisfies ``|fl(sum) - sum| <= gamma(k) sum |terms|``
  (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 3.1).
* An affine layer ``y = W x + b`` has ``n`` terms per output: the ``fan_in`` the layer
  passes to ``affine`` (a dense layer's input size, a convolution's ``kh * kw * C_in /
  groups``, a pooling window's size), or, when it passes none, every input of an example
  (an upper bound for any map).  Maps that only select, move or zero-pad values
  (``fan_in=0``: reshapes, strided shortcuts, padding) are exact and add no slack.
  With ``a = |c| + radius`` (``a >= |x|`` on the set; a zonotope with ``m`` generators
  widens its computed ``a`` by ``3 gamma(m + 4)``, so that it bounds the exact sum of its
  ``m + 2`` terms and the count ``m`` stays out of every op's slack) the float network's
  output is within
  ``gamma(n + 1) (|W| a + |b|)`` of ``W x + b``, and the computed centre, box part and
  generators are each within ``gamma(n + 1)`` of their exact values relative to their
  share of ``|W| a + |b|`` (summed over the generators: each is a separate map of ``n``
  terms, and their errors add up to at most ``gamma(n + 1) |W| sum_j |E_j|``).  The box part is widened by ``4 gamma(n + 2) (|W| a + |b|)``,
  which covers these two first-order terms (``2 gamma``), the rounding of the widening
  itself and every second-order term (valid while ``(n + 4) u <= 0.05`` and
  ``(m + 4) u <= 0.05``).
* Elementwise ops (residual sums, ``x * s + t``, the DeepZ ReLU's ``lam x + mu``) use
  the same rule with ``n`` the number of float operations per output; ReLU is exact in
  float; the DeepZ slope's rounding is absorbed by computing the offset for the rounded
  slope, rounded up; sigmoid / tanh are assumed within 16 ulps of the exact function.
* Underflow: with gradual underflow or flush-to-zero / denormals-are-zero every
  operation may lose at most ``tiny`` (the smallest normal, ``2**-126``), times ``|w|``
  when a subnormal input is flushed; ``|W| (a + tiny / gamma)`` and ``4 (n + 2) tiny``
  cover it.
* Interval bounds ``c -+ r`` use the radius widened by ``3 gamma(m + 2)`` (the sum of
  ``m + 1`` non-negative terms) and are rounded outwards with ``nextafter``.

The model holds for float32 matrix products and convolutions that accumulate in float32
(XLA:CPU always; on GPU/TPU the certificate is for the network run with
``jax.default_matmul_precision("highest")``, since TF32 / bfloat16 passes and Winograd
convolutions have larger errors).  The sound path never claims more than the fast one:
every widening is non-negative.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.nn._abstract import AbstractValue, LinearFn

Array = jax.Array

RELU_MODES = ("box", "deepz")

# Tag 0 is the input's noise symbols; fresh tags are unique for the process.  Tags live
# in the static part of the pytree: they are fixed when a function is traced, so a
# jitted function is not retraced because of them.
INPUT_TAG = 0
_fresh_tags = itertools.count(1)


def fresh_tag() -> int:
  """A new, process-unique tag for a segment of new noise symbols."""
  return next(_fresh_tags)


def _per_example_size(shape: Sequence[int]) -> int:
  return int(np.prod(shape[1:], dtype=np.int64))


def _safe_div(num: Array, den: Array, where: Array) -> Array:
  """``num / den`` where ``where`` holds, 0 elsewhere, with finite gradients."""
  den = jnp.where(where, den, 1.0)
  return jnp.where(where, num / den, 0.0)


# ============================================================ float rounding (sound)
def _unit(dtype: Any) -> tuple[float, float]:
  """``(u, tiny)``: unit roundoff (half the machine epsilon) and smallest normal."""
  info = jnp.finfo(dtype)
  return float(info.eps) / 2, float(info.tiny)


def _gamma(k: int, dtype: Any) -> float:
  """``gamma(k) = k u / (1 - k u)``, Higham's bound for ``k`` rounded operations.

  Raises:
    ValueError: ``k u > 0.05``: the first-order error model no longer holds (a layer
      with millions of inputs per example in float32).
  """
  u, _ = _unit(dtype)
  if k * u > 0.05:
    raise ValueError(f"sound=True: a layer with {k} float operations per output is beyond "
                     f"the float rounding model of {jnp.dtype(dtype).name} (k u = {k * u:.3g} "
                     "> 0.05); use a wider dtype or sound=False.")
  return k * u / (1 - k * u)


def _rounding_slack(magnitude_fn: Callable[[Array], Array], a: Array, extra: Any, n: int,
                    dtype: Any) -> Array:
  """Widening of an op with ``n`` float operations per output: ``4 gamma(n + 2) (M(a +
  tiny / gamma) + |extra|) + 4 (n + 2) tiny``, ``M`` the op's magnitude map (``|W|``).

  ``a`` bounds ``|x|`` on the input set; ``extra`` is a concrete addend (bias, shift) or
  ``None``.  See the module docstring for why this bounds the rounding of both the
  abstract and the concrete float computation.
  """
  g = _gamma(n + 2, dtype)
  _, tiny = _unit(dtype)
  s = magnitude_fn(a + tiny / g)
  if extra is not None:
    s = s + jnp.abs(extra)
  return 4 * g * s + 4 * (n + 2) * tiny


def _inflate_radius(r: Array, terms: int) -> Array:
  """A radius computed as a sum of ``terms`` non-negative numbers, made an upper bound."""
  g = _gamma(terms + 2, r.dtype)
  _, tiny = _unit(r.dtype)
  return r + 3 * g * r + 2 * tiny


def _outward(center: Array, radius: Array) -> tuple[Array, Array]:
  """``(c - r, c + r)`` rounded outwards (one ``nextafter`` after round to nearest)."""
  return (jnp.nextafter(center - radius, jnp.asarray(-jnp.inf, center.dtype)),
          jnp.nextafter(center + radius, jnp.asarray(jnp.inf, center.dtype)))


def _abs_sum(generators: Array) -> Array:
  """``sum_j |E_j|`` over the leading (generator) axis, as a matrix-vector product.

  XLA:CPU (jaxlib 0.10) runs a plain ``jnp.sum`` over this axis in YNNPACK, several
  times slower than a product with a ones vector on the zonotope's generator tensors
  (``benchmarks/certify_pieces.py``; the per-pixel zonotope on ConvSmall runs 2.2x
  faster end to end); the value is the same sum, in another order.
  """
  m = generators.shape[0]
  flat = jnp.abs(generators).reshape(m, -1)
  ones = jnp.ones((m,), generators.dtype)
  out = jnp.dot(ones, flat, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(generators.shape[1:])


def _sound_center_radius(lower: Array, upper: Array) -> tuple[Array, Array]:
  """Centre and radius whose exact box contains ``[lower, upper]`` despite rounding."""
  c = (lower + upper) / 2
  r = (upper - lower) / 2
  u, tiny = _unit(c.dtype)
  return c, r + 6 * u * (jnp.abs(c) + r) + 2 * tiny


def _sound_monotone(fn: Callable[[Array], Array], lo: Array, hi: Array
                    ) -> tuple[Array, Array]:
  """``fn(lo), fn(hi)`` widened by twice an assumed 16-ulp error of ``fn``'s float code."""
  flo, fhi = fn(lo), fn(hi)
  u, tiny = _unit(flo.dtype)
  return flo - 64 * u * jnp.abs(flo) - tiny, fhi + 64 * u * jnp.abs(fhi) + tiny


def _check_sound(sound: Any) -> bool:
  if not isinstance(sound, (bool, np.bool_)):
    raise TypeError(f"sound must be a bool (True: round bounds outwards for the float32 "
                    f"network); got {sound!r}.")
  return bool(sound)


def _fan_in(shape: Sequence[int], fan_in: int | None = None) -> int:
  """Terms per output of a linear map of a ``shape`` value: the layer's ``fan_in`` when it
  gives one, else every input of an example (an upper bound for any map)."""
  if fan_in is not None:
    return int(fan_in)
  return max(_per_example_size(shape), 1)


# ====================================================================== shared base
class _Domain(AbstractValue):
  """What :class:`Box` and :class:`HybridZonotope` share: their binary operations.

  Both meet through :func:`_promote` only (a box is a hybrid zonotope without
  generators); each domain then adds or concatenates values of its own kind
  (``_add``, ``_concatenate``) and shifts by a concrete array (``_shift``).
  """

  def add(self, other: Any) -> AbstractValue:
    """``self + other`` for an abstract or concrete (broadcastable) ``other``.

    Two boxes give a box; a box and a hybrid zonotope give a hybrid zonotope
    (generators aligned segment by segment, configuration of the zonotope).
    """
    if not isinstance(other, AbstractValue):
      return self._shift(other)
    a, b = _promote([self, other])
    return a._add(b)

  @classmethod
  def concatenate(cls, values: Sequence[AbstractValue], axis: int) -> AbstractValue:
    """Concatenate abstract values along a non-batch ``axis`` (boxes stay boxes).

    Raises:
      TypeError: a concrete array among ``values``.
      ValueError: ``axis`` is the batch axis (hybrid zonotopes).
    """
    values = _promote(list(values))
    return values[0]._concatenate(values, axis)

  def _shift(self, other: Any) -> AbstractValue:
    raise NotImplementedError

  def _add(self, other: Any) -> AbstractValue:
    raise NotImplementedError

  def _concatenate(self, values: Sequence[Any], axis: int) -> AbstractValue:
    raise NotImplementedError


# =============================================================================== Box
@jax.tree_util.register_pytree_node_class
class Box(_Domain):
  """Interval domain (interval bound propagation, IBP): centre and radius.

  Represents ``{c + r * beta : beta in [-1, 1]^shape}``.

  Args:
    center: ``[B, ...]`` float array.
    radius: ``[B, ...]`` non-negative float array (same shape as ``center``).
    sound: static; ``True`` widens every transformer's result by a bound on float
      rounding so that the box contains the float32 network's values (see the module
      docstring); ``False`` (default) is the fast, unrounded path.

  Use :meth:`from_bounds` to build one from ``lower <= upper``.

  Raises:
    TypeError: ``sound`` is not a bool.
  """

  def __init__(self, center: Array, radius: Array, *, sound: bool = False):
    self._center = center
    self.radius = radius
    self.sound = _check_sound(sound)

  # ------------------------------------------------------------------- pytree
  def tree_flatten(self):
    return (self._center, self.radius), self.sound

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj._center, obj.radius = children
    obj.sound = bool(aux) if aux is not None else False
    return obj

  def _make(self, center: Array, radius: Array) -> "Box":
    obj = object.__new__(Box)
    obj._center, obj.radius, obj.sound = center, radius, self.sound
    return obj

  # ---------------------------------------------------------------- structure
  def batch_axes(self) -> "Box":
    """``in_axes`` / ``out_axes`` for ``jax.vmap`` over the batch axis (0 everywhere)."""
    return Box(0, 0, sound=self.sound)

  @classmethod
  def from_bounds(cls, lower: Array, upper: Array, *, sound: bool = False) -> "Box":
    """The box ``[lower, upper]`` (elementwise, ``lower <= upper``).

    With ``sound=True`` the radius is widened so that the exact box contains
    ``[lower, upper]`` despite the rounding of ``(lower + upper) / 2``.
    """
    lower = jnp.asarray(lower)
    upper = jnp.asarray(upper)
    if _check_sound(sound):
      return cls(*_sound_center_radius(lower, upper), sound=True)
    return cls((lower + upper) / 2, (upper - lower) / 2)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self._center.shape)

  @property
  def dtype(self):
    return self._center.dtype

  def center(self) -> Array:
    return self._center

  def concretize(self) -> tuple[Array, Array]:
    if self.sound:
      return _outward(self._center, self.radius)
    return self._center - self.radius, self._center + self.radius

  def uncorrelated_radius(self) -> Array:
    return self.radius

  def __repr__(self) -> str:
    return f"Box(shape={self.shape}{', sound=True' if self.sound else ''})"

  def _magnitude(self) -> Array:
    return jnp.abs(self._center) + self.radius

  # ------------------------------------------------------------------ linear maps
  def affine(self, linear_fn: LinearFn, abs_linear_fn: LinearFn | None,
             bias: Array | None = None, *, fan_in: int | None = None) -> "Box":
    c = linear_fn(self._center)
    if bias is not None:
      c = c + bias
    mag = abs_linear_fn or linear_fn
    r = mag(self.radius)
    if self.sound and (fan_in != 0 or bias is not None):
      r = r + _rounding_slack(mag, self._magnitude(), bias, _fan_in(self.shape, fan_in),
                              self.dtype)
    return self._make(c, r)

  def scale_shift(self, scale: Any, shift: Any = None) -> "Box":
    c = self._center * scale
    if shift is not None:
      c = c + shift
    r = self.radius * jnp.abs(scale)
    if self.sound:
      r = r + _rounding_slack(lambda v: v * jnp.abs(scale), self._magnitude(), shift, 1,
                              self.dtype)
    return self._make(c, r)

  def reshape(self, shape: Sequence[int]) -> "Box":
    shape = (self.shape[0],) + tuple(shape)[1:]
    return self._make(self._center.reshape(shape), self.radius.reshape(shape))

  # --------------------------------------------------------------- nonlinearities
  def relu(self) -> "Box":
    lo, hi = self.concretize()
    return Box.from_bounds(jax.nn.relu(lo), jax.nn.relu(hi), sound=self.sound)

  def monotone(self, fn: Callable[[Array], Array]) -> "Box":
    lo, hi = self.concretize()
    if self.sound:
      return Box.from_bounds(*_sound_monotone(fn, lo, hi), sound=True)
    return Box.from_bounds(fn(lo), fn(hi))

  # ------------------------------------------------------------------- arithmetic
  def _shift(self, other: Any) -> "Box":
    r = self.radius
    if self.sound:
      r = r + _rounding_slack(lambda v: v, self._magnitude(), other, 1, self.dtype)
    return self._make(self._center + other, r)

  def _add(self, other: "Box") -> "Box":
    r = self.radius + other.radius
    out = self._make(self._center + other._center, r)
    if self.sound or other.sound:
      out.sound = True
      out.radius = r + _rounding_slack(lambda v: v, self._magnitude() + other._magnitude(),
                                       None, 1, self.dtype)
    return out

  def _concatenate(self, values: Sequence["Box"], axis: int) -> "Box":
    out = Box(jnp.concatenate([b._center for b in values], axis),
              jnp.concatenate([b.radius for b in values], axis),
              sound=any(b.sound for b in values))
    return out

  def to_zonotope(self, relu_mode: str = "box", relu_budget: int | None = None
                  ) -> "HybridZonotope":
    """The same set as a hybrid zonotope with no correlated generators (``m = 0``)."""
    return HybridZonotope(self._center, self.radius, None, relu_mode=relu_mode,
                          relu_budget=relu_budget, sound=self.sound)


# ===================================================================== HybridZonotope
@jax.tree_util.register_pytree_node_class
class HybridZonotope(_Domain):
  """DiffAI hybrid zonotope: centre, box radius and correlated generators.

  Args:
    center: ``[B, ...]``.
    box: ``[B, ...]`` non-negative uncorrelated radius (``b``).
    generators: ``[m, B, ...]`` correlated generators ``E`` (``None``: ``m = 0``).
    relu_mode: static; ``"box"`` (DiffAI's default: a crossing neuron, ``l < 0 < u``,
      becomes the box ``[0, u]`` and loses its correlations) or ``"deepz"`` (the
      minimal-area zonotope relaxation of Singh et al. 2018, ``y = lam x + mu + mu e``
      with ``lam = u / (u - l)``, ``mu = -lam l / 2`` and one new noise symbol
      ``e`` per crossing neuron).
    relu_budget: static; DeepZ only.  ``None`` appends one generator slot for *every*
      neuron of the layer (zero for the non-crossing ones): exact DeepZ, but memory
      grows by ``p x p`` per example and layer (``p`` neurons).  An int ``k`` appends
      ``k`` slots for the ``k`` crossing neurons with the largest ``mu`` (per example)
      and folds the other ``mu`` into the box part: memory ``k x p``, less precise,
      still sound.
    segments: static ``((tag, size), ...)`` partition of the generator axis (see the
      module docstring); default: one input segment of size ``m``.
    sound: static; ``True`` widens every transformer's result by a bound on float
      rounding so that the set contains the float32 network's values (see the module
      docstring); ``False`` (default) is the fast, unrounded path.

  A zonotope whose only generators are one per variable (``from_bounds(correlate=True)``
  and ``correlate_all`` on a value without generators: ``E_j = d_j e_j``) keeps them as
  the ``[B, p]`` diagonal ``d`` until an operation needs the ``[p, B, ...]`` tensor.
  Elementwise scaling and reshapes stay diagonal, and an affine layer maps the ``p``
  basis images once for the whole batch (``E'_j = d_j (W e_j)``) instead of ``p * B``
  generator images: ``B`` times fewer operations in the first layer, the same values
  (``W (d_j e_j)`` has one non-zero term per output, so it is the same single rounding).
  ``generators`` always returns the full tensor.

  Raises:
    ValueError: shapes that do not match, a bad ``relu_mode`` or ``relu_budget``.
    TypeError: ``sound`` is not a bool.
  """

  def __init__(self, center: Array, box: Array, generators: Array | None = None, *,
               relu_mode: str = "box", relu_budget: int | None = None,
               segments: tuple[tuple[int, int], ...] | None = None, sound: bool = False):
    if relu_mode not in RELU_MODES:
      raise ValueError(f"relu_mode must be one of {RELU_MODES}; got {relu_mode!r}.")
    if relu_budget is not None and (isinstance(relu_budget, bool) or
                                    not isinstance(relu_budget, (int, np.integer)) or
                                    relu_budget < 1):
      raise ValueError(f"relu_budget must be None or an int >= 1; got {relu_budget!r}.")
    center = jnp.asarray(center)
    if generators is None:
      generators = jnp.zeros((0,) + center.shape, center.dtype)
    if tuple(box.shape) != tuple(center.shape) or tuple(generators.shape[1:]) != tuple(
        center.shape):
      raise ValueError(f"HybridZonotope: center {tuple(center.shape)}, box "
                       f"{tuple(box.shape)} and generators {tuple(generators.shape)} must "
                       "agree as [B, ...], [B, ...] and [m, B, ...].")
    m = int(generators.shape[0])
    if segments is None:
      segments = ((INPUT_TAG, m),) if m else ()
    if sum(s for _, s in segments) != m:
      raise ValueError(f"segments {segments} do not add up to {m} generators.")
    self._center = center
    self.box = box
    self._gens = generators
    self._diagonal = False
    self.relu_mode = relu_mode
    self.relu_budget = None if relu_budget is None else int(relu_budget)
    self.segments = tuple((int(t), int(s)) for t, s in segments)
    self.sound = _check_sound(sound)

  # ------------------------------------------------------------------- pytree
  def tree_flatten(self):
    return ((self._center, self.box, self._gens),
            (self.relu_mode, self.relu_budget, self.segments, self.sound, self._diagonal))

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj._center, obj.box, obj._gens = children
    obj.relu_mode, obj.relu_budget, obj.segments, obj.sound, obj._diagonal = aux
    return obj

  @property
  def generators(self) -> Array:
    """The correlated generators ``E``, ``[m, B, ...]`` (built from the diagonal when
    the value holds one, see the class docstring)."""
    if not self._diagonal:
      return self._gens
    d = self._gens                                             # [B, p] (or [p] in vmap)
    p = d.shape[-1]
    full = jnp.eye(p, dtype=d.dtype) * d[..., None, :]          # [..., p, p]: E_j = d_j e_j
    return jnp.moveaxis(full, -2, 0).reshape((p,) + self.shape)

  def _with_diagonal(self, center: Array, box: Array, diagonal: Array
                     ) -> "HybridZonotope":
    obj = self._new(center, box, diagonal)
    obj._diagonal = True
    return obj

  def batch_axes(self) -> "HybridZonotope":
    """``in_axes`` / ``out_axes`` for ``jax.vmap`` over the batch axis of this value.

    The generators carry the batch on axis 1 (``[m, B, ...]``), the other leaves on 0:
    ``jax.vmap(f, in_axes=(z.batch_axes(),))(z)`` hands ``f`` one example at a time
    (shapes without the batch axis).
    """
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self),
                                        [0, 0, 0 if self._diagonal else 1])

  def _new(self, center: Array, box: Array, generators: Array,
           segments: tuple[tuple[int, int], ...] | None = None) -> "HybridZonotope":
    obj = object.__new__(HybridZonotope)
    obj._center, obj.box, obj._gens, obj._diagonal = center, box, generators, False
    obj.relu_mode, obj.relu_budget = self.relu_mode, self.relu_budget
    obj.segments = self.segments if segments is None else segments
    obj.sound = self.sound
    return obj

  def replace(self, **kw: Any) -> "HybridZonotope":
    """A copy with static fields (``relu_mode``, ``relu_budget``, ``sound``) replaced."""
    fields = {"relu_mode": self.relu_mode, "relu_budget": self.relu_budget,
              "sound": self.sound}
    for k, v in kw.items():
      if k not in fields:
        raise TypeError(f"replace: unknown field {k!r}; expected relu_mode, relu_budget "
                        "or sound.")
      fields[k] = v
    out = HybridZonotope(self._center, self.box, None, **fields)
    out._gens, out._diagonal, out.segments = self._gens, self._diagonal, self.segments
    return out

  # ---------------------------------------------------------------- structure
  @classmethod
  def from_bounds(cls, lower: Array, upper: Array, *, correlate: bool = True,
                  relu_mode: str = "box", relu_budget: int | None = None,
                  sound: bool = False) -> "HybridZonotope":
    """The box ``[lower, upper]`` as a hybrid zonotope.

    Args:
      lower, upper: ``[B, ...]``, ``lower <= upper``.
      correlate: ``True``: one generator per variable (``m = p``; a zonotope, exact
        under affine maps; memory ``p`` times the input per example).  ``False``: the
        box part only (``m = 0``; DiffAI's "HBox" start, correlated later by abstract
        layers).
      relu_mode, relu_budget, sound: see the class docstring (``sound=True`` also
        widens the radius for the rounding of ``(lower + upper) / 2``).
    """
    lower = jnp.asarray(lower)
    upper = jnp.asarray(upper)
    if _check_sound(sound):
      c, r = _sound_center_radius(lower, upper)
    else:
      c = (lower + upper) / 2
      r = (upper - lower) / 2
    z = cls(c, r, None, relu_mode=relu_mode, relu_budget=relu_budget, sound=sound)
    return z._correlate_all(INPUT_TAG) if correlate else z

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self._center.shape)

  @property
  def dtype(self):
    return self._center.dtype

  @property
  def num_generators(self) -> int:
    return int(self._gens.shape[-1] if self._diagonal else self._gens.shape[0])

  def center(self) -> Array:
    return self._center

  def radius(self) -> Array:
    """Total error ``b + sum_j |E_j|`` (the half-width of the interval concretization)."""
    if self.num_generators == 0:
      return self.box
    if self._diagonal:
      return self.box + jnp.abs(self._gens).reshape(self.shape)
    return self.box + _abs_sum(self.generators)

  def concretize(self) -> tuple[Array, Array]:
    r = self.radius()
    if self.sound:
      return _outward(self._center, _inflate_radius(r, self.num_generators + 1))
    return self._center - r, self._center + r

  def _magnitude(self) -> Array:
    """``|c| + b + sum_j |E_j|``, an upper bound of ``|x|`` on the set (with ``sound``,
    widened for the rounding of its own ``m + 2`` terms, so that the slack of an op with
    ``n`` float operations per output needs ``gamma(n)``, not ``gamma(n + m)``)."""
    a = jnp.abs(self._center) + self.radius()
    if self.sound:
      a = _inflate_radius(a, self.num_generators + 2)
    return a

  def uncorrelated_radius(self) -> Array:
    return self.box

  def __repr__(self) -> str:
    return (f"HybridZonotope(shape={self.shape}, generators={self.num_generators}, "
            f"relu_mode={self.relu_mode!r}, relu_budget={self.relu_budget}"
            f"{', sound=True' if self.sound else ''})")

  def _flat_generators(self) -> Array:
    m, b = self.generators.shape[:2]
    return self.generators.reshape((m * b,) + self.generators.shape[2:])

  def _unflat(self, flat: Array, m: int) -> Array:
    return flat.reshape((m, flat.shape[0] // max(m, 1)) + flat.shape[1:])

  # ------------------------------------------------------------------ linear maps
  def affine(self, linear_fn: LinearFn, abs_linear_fn: LinearFn | None,
             bias: Array | None = None, *, fan_in: int | None = None) -> "HybridZonotope":
    m, batch = self.num_generators, self.shape[0]
    gens = None
    if abs_linear_fn is None:
      # Non-negative weights: one call on [c; b; E].
      parts = [self._center, self.box] + ([self._flat_generators()] if m else [])
      out = linear_fn(jnp.concatenate(parts, 0))
      c, b, e = out[:batch], out[batch:2 * batch], out[2 * batch:]
    else:
      if self._diagonal:
        c, gens = self._map_diagonal(linear_fn)
      elif m:
        out = linear_fn(jnp.concatenate([self._center, self._flat_generators()], 0))
        c, e = out[:batch], out[batch:]
      else:
        c = linear_fn(self._center)
        e = None
      b = abs_linear_fn(self.box)
    if bias is not None:
      c = c + bias
    if self.sound and (fan_in != 0 or bias is not None):
      b = b + _rounding_slack(abs_linear_fn or linear_fn, self._magnitude(), bias,
                              _fan_in(self.shape, fan_in), self.dtype)
    if gens is None:
      gens = self._unflat(e, m) if m else jnp.zeros((0,) + c.shape, c.dtype)
    return self._new(c, b, gens)

  def _map_diagonal(self, linear_fn: LinearFn) -> tuple[Array, Array]:
    """``linear_fn`` of the centre and of diagonal generators: the ``p`` basis images
    are mapped once for the batch and scaled per example (``E'_j = d_j W e_j``)."""
    batch, p = self.shape[0], self.num_generators
    basis = jnp.eye(p, dtype=self.dtype).reshape((p,) + self.shape[1:])
    out = linear_fn(jnp.concatenate([self._center, basis], 0))
    c, images = out[:batch], out[batch:]                         # images: [p, ...]
    d = self._gens.T.reshape((p, batch) + (1,) * (images.ndim - 1))
    return c, d * images[:, None]                                # [p, B, ...]

  def scale_shift(self, scale: Any, shift: Any = None) -> "HybridZonotope":
    c = self._center * scale
    if shift is not None:
      c = c + shift
    scale = jnp.asarray(scale)
    b = self.box * jnp.abs(scale)
    if self.sound:
      b = b + _rounding_slack(lambda v: v * jnp.abs(scale), self._magnitude(), shift, 1,
                              self.dtype)
    if self._diagonal:
      per_variable = jnp.broadcast_to(scale, self.shape).reshape(self._gens.shape)
      return self._with_diagonal(c, b, self._gens * per_variable)
    return self._new(c, b, self.generators * scale)

  def reshape(self, shape: Sequence[int]) -> "HybridZonotope":
    shape = (self.shape[0],) + tuple(shape)[1:]
    m = self.num_generators
    if self._diagonal:
      return self._with_diagonal(self._center.reshape(shape), self.box.reshape(shape),
                                 self._gens)
    return self._new(self._center.reshape(shape), self.box.reshape(shape),
                     self.generators.reshape((m,) + shape))

  # --------------------------------------------------------------- nonlinearities
  def relu(self) -> "HybridZonotope":
    lo, hi = self.concretize()
    pos = lo >= 0
    cross = (lo < 0) & (hi > 0)
    if self.relu_mode == "box":
      half = jnp.where(cross, hi / 2, 0.0)
      c = jnp.where(pos, self._center, half)
      # hi / 2 is exact but in the subnormal range: one tiny more covers that.
      b = jnp.where(pos, self.box, half + _unit(self.dtype)[1] if self.sound else half)
      return self._new(c, b, self.generators * pos.astype(self.dtype))
    # DeepZ minimal-area relaxation.
    lam = jnp.where(pos, 1.0, _safe_div(hi, hi - lo, cross)).astype(self.dtype)
    if self.sound:
      # relu(x) - lam x lies in [0, max(-lam lo, (1 - lam) hi)] on [lo, hi] for any lam
      # in [0, 1], so the rounded slope is valid with the offset computed for it,
      # rounded up.
      up = lambda v: jnp.nextafter(v, jnp.asarray(jnp.inf, self.dtype))
      top = jnp.maximum(up(-lam * lo), up(up(1 - lam) * hi))
      mu = jnp.where(cross, up(top / 2), 0.0)
    else:
      mu = jnp.where(cross, -lam * lo / 2, 0.0)
    c = lam * self._center + mu
    b = lam * self.box
    gens = self.generators * lam
    slack = None
    if self.sound:
      # lam c + mu, lam b and lam E are rounded where a neuron crosses (elsewhere lam is
      # 1 or 0 and mu is 0: exact).
      slack = jnp.where(cross, _rounding_slack(lambda v: v * lam, self._magnitude(), mu, 2,
                                               self.dtype), 0.0)
    return self._append_deepz(c, b, gens, mu, slack)

  def _append_deepz(self, c: Array, b: Array, gens: Array, mu: Array,
                    slack: Array | None = None) -> "HybridZonotope":
    batch, p = self.shape[0], _per_example_size(self.shape)
    mu_flat = mu.reshape(batch, p)
    k = p if self.relu_budget is None else min(self.relu_budget, p)
    if k == p:
      # new[j, n, i] = mu[n, i] * (i == j): one slot per neuron.
      new = jnp.eye(p, dtype=mu.dtype)[:, None, :] * mu_flat[None, :, :]
    else:
      _, idx = jax.lax.top_k(mu_flat, k)                       # [B, k]
      onehot = jax.nn.one_hot(idx, p, dtype=mu.dtype)          # [B, k, p]
      new = jnp.swapaxes(onehot * mu_flat[:, None, :], 0, 1)   # [k, B, p]
      chosen = jnp.sum(onehot, axis=1)                         # [B, p] in {0, 1}
      b = b + (mu_flat * (1 - chosen)).reshape(b.shape)
      if slack is not None:
        slack = slack + 2 * _gamma(2, self.dtype) * (b + mu)
    if slack is not None:
      b = b + slack
    new = new.reshape((k,) + self.shape)
    return self._new(c, b, jnp.concatenate([gens, new], 0),
                     self.segments + ((fresh_tag(), k),))

  def monotone(self, fn: Callable[[Array], Array]) -> "HybridZonotope":
    lo, hi = self.concretize()
    if self.sound:
      c, r = _sound_center_radius(*_sound_monotone(fn, lo, hi))
      return self._new(c, r, jnp.zeros((0,) + self.shape, self.dtype), ())
    flo, fhi = fn(lo), fn(hi)
    return self._new((flo + fhi) / 2, (fhi - flo) / 2,
                     jnp.zeros((0,) + self.shape, self.dtype), ())

  # ------------------------------------------------------------------- arithmetic
  def _shift(self, other: Any) -> "HybridZonotope":
    b = self.box
    if self.sound:
      b = b + _rounding_slack(lambda v: v, self._magnitude(), other, 1, self.dtype)
    if self._diagonal:
      return self._with_diagonal(self._center + other, b, self._gens)
    return self._new(self._center + other, b, self.generators)

  def _add(self, other: "HybridZonotope") -> "HybridZonotope":
    (g1, g2), segments = _align([self, other])
    out = self._new(self._center + other._center, self.box + other.box, g1 + g2, segments)
    if self.sound or other.sound:
      out.sound = True
      out.box = out.box + _rounding_slack(lambda v: v, self._magnitude() + other._magnitude(),
                                          None, 1, self.dtype)
    return out

  def _concatenate(self, values: Sequence["HybridZonotope"], axis: int
                   ) -> "HybridZonotope":
    axis = axis % len(self.shape)
    if axis == 0:
      raise ValueError("HybridZonotope.concatenate: axis 0 is the batch axis.")
    gens, segments = _align(values)
    out = self._new(jnp.concatenate([z._center for z in values], axis),
                    jnp.concatenate([z.box for z in values], axis),
                    jnp.concatenate(gens, axis + 1), segments)
    out.sound = any(z.sound for z in values)
    return out

  # -------------------------------------------------------------- abstract layers
  def correlate(self, indices: Array, valid: Array | None = None) -> "HybridZonotope":
    batch, p = self.shape[0], _per_example_size(self.shape)
    k = int(indices.shape[-1])
    if k == 0:
      return self
    b_flat = self.box.reshape(batch, p)
    onehot = jax.nn.one_hot(indices, p, dtype=self.dtype)       # [B, k, p]
    if valid is not None:
      onehot = onehot * valid[..., None].astype(self.dtype)
    chosen = jnp.minimum(jnp.sum(onehot, axis=1), 1.0)          # [B, p]
    new = jnp.swapaxes(onehot * b_flat[:, None, :], 0, 1)       # [k, B, p]
    box = (b_flat * (1 - chosen)).reshape(self.shape)
    gens = jnp.concatenate([self.generators, new.reshape((k,) + self.shape)], 0)
    return self._new(self._center, box, gens, self.segments + ((fresh_tag(), k),))

  def correlate_all(self) -> "HybridZonotope":
    return self._correlate_all(fresh_tag())

  def _correlate_all(self, tag: int) -> "HybridZonotope":
    batch, p = self.shape[0], _per_example_size(self.shape)
    b_flat = self.box.reshape(batch, p)
    if self.num_generators == 0:
      out = self._with_diagonal(self._center, jnp.zeros_like(self.box), b_flat)
      out.segments = ((tag, p),)
      return out
    new = (jnp.eye(p, dtype=self.dtype)[:, None, :] * b_flat[None]).reshape((p,) + self.shape)
    return self._new(self._center, jnp.zeros_like(self.box),
                     jnp.concatenate([self.generators, new], 0),
                     self.segments + ((tag, p),))

  def decorrelate(self, keep: int = 0) -> "HybridZonotope":
    m = self.num_generators
    keep = int(keep)
    if keep >= m:
      return self
    if keep <= 0:
      r = self.radius()
      if self.sound:
        r = _inflate_radius(r, m + 1)
      return self._new(self._center, r, jnp.zeros((0,) + self.shape, self.dtype), ())
    batch = self.shape[0]
    flat = jnp.abs(self.generators.reshape(m, batch, -1))
    total = jnp.sum(flat, axis=-1)                                # [m, B]
    _, idx = jax.lax.top_k(total.T, keep)                         # [B, keep]
    idx = jnp.sort(idx, axis=-1)                                  # keep the order
    keep_mask = jnp.sum(jax.nn.one_hot(idx, m, dtype=self.dtype), axis=1)  # [B, m]
    gather = idx.T.reshape((keep, batch) + (1,) * (len(self.shape) - 1))
    kept = jnp.take_along_axis(self.generators, gather, axis=0)
    dropped_mask = (1 - keep_mask).T.reshape((m, batch) + (1,) * (len(self.shape) - 1))
    box = self.box + _abs_sum(self.generators * dropped_mask)
    if self.sound:
      box = _inflate_radius(box, m + 1)
    # The kept symbols differ per example: a fresh segment, never aligned with the old.
    return self._new(self._center, box, kept, ((fresh_tag(), keep),))


def _promote(values: Sequence[Any], *, zonotope: bool = False) -> list[Any]:
  """Abstract values brought to one domain: the one place where the domains meet.

  A box is a hybrid zonotope with no generators (``m = 0``).  When every value is a
  :class:`Box` (and ``zonotope`` is False) they stay boxes; otherwise every box becomes
  that hybrid zonotope, with the ``relu_mode`` and ``relu_budget`` of the first
  zonotope among ``values`` (the defaults when there is none).  A value of any other
  :class:`~jaxdefense.nn.AbstractValue` domain enters as the box of its interval
  bounds (sound; its own correlations are dropped).

  Raises:
    TypeError: a concrete array among ``values``.
  """
  out = []
  for v in values:
    if not isinstance(v, AbstractValue):
      raise TypeError(f"expected abstract values only, got {type(v).__name__}; lift the "
                      "concrete parts to the abstract domain first (Box.from_bounds(x, x)).")
    out.append(v if isinstance(v, (Box, HybridZonotope))
               else Box.from_bounds(*v.concretize(), sound=_is_sound(v)))
  ref = next((v for v in out if isinstance(v, HybridZonotope)), None)
  if ref is None and not zonotope:
    return out
  mode = {} if ref is None else {"relu_mode": ref.relu_mode, "relu_budget": ref.relu_budget}
  return [v if isinstance(v, HybridZonotope) else v.to_zonotope(**mode) for v in out]


def _is_sound(value: Any) -> bool:
  return bool(getattr(value, "sound", False))


def _align(zs: Sequence[HybridZonotope]) -> tuple[list[Array], tuple[tuple[int, int], ...]]:
  """Generators of ``zs`` laid out on the union of their segments (zero padded)."""
  first = zs[0].segments
  if all(z.segments == first for z in zs):
    return [z.generators for z in zs], first
  union: list[tuple[int, int]] = []
  sizes: dict[int, int] = {}
  for z in zs:
    for tag, size in z.segments:
      if tag in sizes:
        if sizes[tag] != size:
          raise ValueError(f"generator segment {tag} has sizes {sizes[tag]} and {size}.")
        continue
      sizes[tag] = size
      union.append((tag, size))
  out = []
  for z in zs:
    offsets, start = {}, 0
    for tag, size in z.segments:
      offsets[tag] = start
      start += size
    pieces = []
    for tag, size in union:
      if tag in offsets:
        pieces.append(z.generators[offsets[tag]:offsets[tag] + size])
      else:
        pieces.append(jnp.zeros((size,) + z.shape, z.dtype))
    out.append(jnp.concatenate(pieces, 0) if pieces else z.generators)
  return out, tuple(union)


# ========================================================================== helpers
def linear_bounds(value: AbstractValue, matrix: Array) -> tuple[Array, Array]:
  """Interval bounds of ``C z`` for per-example matrices ``C`` and abstract ``z``.

  Computed inside the domain (``C`` applied to centre and generators, ``|C|`` to the
  box part), which is tighter than interval arithmetic on the bounds of ``z``.

  Args:
    value: abstract ``z`` of shape ``[B, K]``.
    matrix: ``[B, n, K]`` (or ``[n, K]``, shared by the batch).

  Returns:
    ``(lower, upper)``, each ``[B, n]``.
  """
  if len(value.shape) != 2:
    raise ValueError(f"linear_bounds expects a [B, K] value; got shape {value.shape}.")
  matrix = jnp.asarray(matrix)
  if matrix.ndim == 2:
    matrix = jnp.broadcast_to(matrix, (value.shape[0],) + matrix.shape)
  (z,) = _promote([value], zonotope=True)
  c = jnp.einsum("bnk,bk->bn", matrix, z.center())
  r = jnp.einsum("bnk,bk->bn", jnp.abs(matrix), z.box)
  if z.num_generators:
    e = jnp.einsum("bnk,mbk->mbn", matrix, z.generators)
    r = r + _abs_sum(e)
  if z.sound:
    # rows of C have K terms; the radius adds m + 1 more non-negative terms
    r = r + _rounding_slack(lambda v: jnp.einsum("bnk,bk->bn", jnp.abs(matrix), v),
                            z._magnitude(), None, value.shape[-1] + z.num_generators + 1,
                            z.dtype)
    return _outward(c, r)
  return c - r, c + r


def margin_lower_bounds(value: AbstractValue, labels: Array) -> Array:
  """Lower bounds of ``z_t - z_j`` for every class ``j`` (``+inf`` at ``j = t``).

  Args:
    value: abstract logits ``[B, K]``.
    labels: int ``[B]``, the targets ``t``.

  Returns:
    ``[B, K]``; the label ``t`` is proved when every entry of its row is positive.
  """
  k = value.shape[-1]
  onehot = jax.nn.one_hot(labels, k, dtype=value.center().dtype)   # [B, K]
  matrix = onehot[:, None, :] - jnp.eye(k, dtype=onehot.dtype)[None]  # row j: e_t - e_j
  lower, _ = linear_bounds(value, matrix)
  return jnp.where(onehot > 0, jnp.inf, lower)


def worst_case_logits(value: AbstractValue, labels: Array) -> Array:
  """Logits whose cross-entropy upper-bounds the worst case over the set (IBP loss).

  Entry ``j`` is ``-(lower bound of z_t - z_j)`` (0 at ``j = t``): the softmax
  cross-entropy of these logits at label ``t`` is an upper bound of the cross-entropy of
  every concrete point in the set (Wong & Kolter 2018; Gowal et al. 2018).

  Args:
    value: abstract logits ``[B, K]``.
    labels: int ``[B]``.

  Returns:
    ``[B, K]`` logits.
  """
  low = margin_lower_bounds(value, labels)
  return jnp.where(jnp.isinf(low), 0.0, -low)
