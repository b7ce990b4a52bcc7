"""The attacks' compile cache and their result check at the API boundary.

An attack call is split into a Python front (argument checks, on concrete values only)
and a *core*, a pure function of arrays and static hyper-parameters, run by
:func:`run_attack` through one ``jax.jit``.  What the cache is keyed on:

* the model's *structure*: ``logits_fn`` is flattened as a pytree; its array leaves
  (the variables of a :class:`~jaxdefense.models.ModelFn`, the arguments of a
  ``functools.partial``, the model inside an :class:`~jaxdefense.attacks.EOT`) are
  traced arguments, everything else (the Flax module, a plain function, Python
  numbers) is static, compared by value when it is a plain Python value and by
  identity otherwise;
* the shapes and dtypes of the images, labels, key and hyper-parameters;
* the static hyper-parameters (steps, norm, restarts, loss, ...).

Floating hyper-parameters (eps, step sizes, learning rates, ...) are traced, so a
sweep over eps compiles once.  The same model object (or a :class:`ModelFn` with
other variables of the same shapes) reuses the compiled attack; a new ``lambda`` per
call is a new function and compiles again.

Every core returns ``(x_adv, nonfinite)``, where ``nonfinite [B]`` marks the examples
for which the model produced a non-finite loss, logits or gradient; on a concrete
(untraced) result :func:`run_attack` raises a ``ValueError`` for them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import numpy as np

from jaxdefense.attacks._eot import EOT

Array = jax.Array

# Python values compared by value in the cache key (everything else: by identity).
_BY_VALUE = (str, bytes, int, float, complex, bool, type(None))


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


class _Static:
  """A non-array leaf of a model, hashed by value (plain Python values) or identity.

  It keeps a reference to the value, so an identity key is never reused while a
  cache entry holds it.
  """

  __slots__ = ("value", "_key")

  def __init__(self, value: Any):
    self.value = value
    by_value = isinstance(value, _BY_VALUE)
    self._key = ("value", type(value), value) if by_value else ("id", id(value))

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, _Static):
      return NotImplemented
    if self._key[0] == "id":
      return other._key[0] == "id" and self.value is other.value
    return self._key == other._key

  def __repr__(self) -> str:
    return f"_Static({self.value!r})"


class ModelSpec(NamedTuple):
  """The static part of a model: its tree structure and its non-array leaves.

  Attributes:
    treedef: the ``PyTreeDef`` of the model (``functools.partial`` leaves are read as
      ``jax.tree_util.Partial``).
    statics: one entry per leaf: ``None`` for an array leaf (traced), else a
      ``_Static`` wrapper.
  """

  treedef: Any
  statics: tuple


def _partial_as_pytree(leaf: Any) -> Any:
  # functools.partial is a pytree leaf for JAX; its bound arguments (often the model
  # variables) should be traced, so read it as jax.tree_util.Partial.
  if type(leaf) is functools.partial:  # pylint: disable=unidiomatic-typecheck
    return jax.tree_util.Partial(leaf.func, *leaf.args, **leaf.keywords)
  return leaf


def split_model(logits_fn: Any) -> tuple[list, ModelSpec]:
  """Split a model into its array leaves (traced) and a hashable :class:`ModelSpec`."""
  tree = jax.tree_util.tree_map(_partial_as_pytree, logits_fn)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  arrays = [leaf for leaf in leaves if _is_array(leaf)]
  statics = tuple(None if _is_array(leaf) else _Static(leaf) for leaf in leaves)
  return arrays, ModelSpec(treedef, statics)


def merge_model(arrays: list, spec: ModelSpec) -> Any:
  """Inverse of :func:`split_model`."""
  it = iter(arrays)
  leaves = [next(it) if s is None else s.value for s in spec.statics]
  return jax.tree_util.tree_unflatten(spec.treedef, leaves)


def _aval_key(value: Any) -> tuple:
  aval = jax.typeof(value) if hasattr(jax, "typeof") else jax.core.get_aval(value)
  return (tuple(aval.shape), aval.dtype, bool(getattr(aval, "weak_type", False)))


@functools.lru_cache(maxsize=128)
def _cached_output(spec: ModelSpec, array_avals: tuple, x_aval: tuple,
                   key_aval: Optional[tuple]) -> jax.ShapeDtypeStruct:
  def struct(a):
    return jax.ShapeDtypeStruct(a[0], a[1], weak_type=a[2])

  def call(arrays, x, key):
    model = merge_model(arrays, spec)
    if isinstance(model, EOT):
      return model.logits_fn(x, key)
    return model(x)

  key = None if key_aval is None else struct(key_aval)
  return jax.eval_shape(call, [struct(a) for a in array_avals], struct(x_aval), key)


def model_output(logits_fn: Any, x: Any, key: Any = None) -> Any:
  """``jax.eval_shape`` of the model on ``x`` (its noise function with ``key`` for an
  :class:`EOT`), cached on the model's structure and the shapes, so repeated attack
  calls do not trace the model again.  Returns the output's ``ShapeDtypeStruct``.

  Inside a caller's trace (``x`` is a tracer) nothing is cached: the model may close
  over that trace's values, and the caller's program is compiled once anyway.
  """
  arrays, spec = split_model(logits_fn)
  key_aval = _aval_key(key) if isinstance(logits_fn, EOT) else None
  avals = (spec, tuple(_aval_key(a) for a in arrays), _aval_key(x), key_aval)
  if isinstance(x, jax.core.Tracer):
    return _cached_output.__wrapped__(*avals)
  return _cached_output(*avals)


def _as_traced(value: Any) -> Any:
  # Python numbers become float arguments, so 0 and 0.1 share one compiled program.
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  return value


@functools.lru_cache(maxsize=None)
def _jitted(attack: str, core: Callable) -> Callable:
  """One ``jax.jit`` per attack (named after it in JAX's compile logs)."""

  def run(model_arrays: list, arrays: dict, *, spec: ModelSpec,
          static: tuple) -> tuple[Array, Array]:
    return core(merge_model(model_arrays, spec), **arrays, **dict(static))

  run.__name__ = run.__qualname__ = attack
  return jax.jit(run, static_argnames=("spec", "static"))


def nonfinite_error(attack: str, nonfinite: Any) -> Optional[ValueError]:
  """The error for a concrete ``nonfinite [B]`` mask with any ``True``, else ``None``."""
  bad = np.flatnonzero(np.asarray(nonfinite))
  if bad.size == 0:
    return None
  shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if bad.size > 10 else "")
  return ValueError(
      f"{attack}: the model produced non-finite (NaN or inf) logits, loss or gradient "
      f"for {bad.size} of {np.size(nonfinite)} examples (indices {shown}), so the attack "
      "result for them is not an adversarial example. Check logits_fn: NaN or inf in "
      "its parameters (a diverged training run), log / sqrt / division at 0, a "
      "normalisation by a zero standard deviation, overflow in low precision, and a "
      "custom loss. Under jax.jit no error can be raised: such examples are returned at "
      "the iterate where the non-finite value appeared (inside the ball and [0, 1]).")


def run_attack(attack: str, core: Callable, logits_fn: Any, arrays: Mapping[str, Any],
               static: Mapping[str, Any]) -> Array:
  """Run ``core(logits_fn, **arrays, **static) -> (x_adv, nonfinite)`` compiled and cached.

  Args:
    attack: the attack's name, for the error message.
    core: a module-level function (its identity is part of the cache key) returning
      ``(x_adv [B, ...], nonfinite [B] bool)``.
    logits_fn: the model (any callable; see the module docstring for what is traced).
    arrays: traced arguments by name (arrays, ``None``, Python numbers).
    static: static hyper-parameters by name; hashable values (strings, ints, bools,
      callables by identity).

  Returns:
    ``x_adv``.

  Raises:
    ValueError: the result is concrete (the call is not traced by ``jit`` / ``vmap``)
      and ``nonfinite`` marks examples.
  """
  model_arrays, spec = split_model(logits_fn)
  traced = {name: _as_traced(value) for name, value in arrays.items()}
  x_adv, nonfinite = _jitted(attack, core)(model_arrays, traced, spec=spec,
                                           static=tuple(sorted(static.items())))
  if not isinstance(nonfinite, jax.core.Tracer):
    err = nonfinite_error(attack, nonfinite)
    if err is not None:
      raise err
  return x_adv
