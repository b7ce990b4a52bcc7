"""The one model contract: a model ready to call (module + variables + mode).

Every caller above the model zoo (evaluation, attacks driven by evaluation, training
objectives, certification, the experiments) receives a :class:`ModelFn` and calls it
in one way, so nobody guesses how a model is called:

* ``m(x, key=None) -> logits [B, K]`` for evaluation and attacks; the key is needed
  exactly when ``m.stochastic`` (noise drawn at evaluation time, e.g. EnResNet);
* ``m.apply(x, key=None) -> (logits, state)`` for training, where ``state`` holds the
  updated mutable collections (batch statistics in training mode).

A :class:`ModelFn` is a pytree whose leaves are the variables (and default keys), so it
can be passed into ``jax.jit`` as an argument, ``jax.lax.stop_gradient``-ed as a whole,
and replicated over a device mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdefense import dynamics
from jaxdefense.nn._abstract import is_abstract

__all__ = ["ModelFn", "bind", "is_stochastic"]

Array = jax.Array


def is_stochastic(module: Any, train: bool = False) -> bool:
  """Whether ``module`` draws randomness when applied in the given mode.

  Looks at the module's step rule (``dynamics.is_stochastic``), at nested modules held
  in its fields (an :class:`~jaxdefense.models.Ensemble`'s ``member``), and, in
  training mode, at dropout rates (a ``dropout`` field above 0).

  Args:
    module: a ``flax.linen.Module`` (unbound).
    train: the mode.

  Returns:
    ``True`` when an apply in this mode needs ``rngs``.
  """
  if not isinstance(module, nn.Module):
    return False
  for field in dataclasses.fields(module):
    if field.name in ("parent", "name"):
      continue
    value = getattr(module, field.name, None)
    if field.name == "step" and dynamics.is_stochastic(value, train):
      return True
    if train and field.name == "dropout" and isinstance(value, (int, float)) and value > 0:
      return True
    if isinstance(value, nn.Module) and is_stochastic(value, train):
      return True
  return False


def _rngs_from_key(key: Array) -> dict[str, Array]:
  noise, dropout = jax.random.split(key)
  return {"noise": noise, "dropout": dropout}


class ModelFn(struct.PyTreeNode):
  """A model ready to call: a Flax module with its variables and a mode.

  Build it with :func:`bind` (a module and its variables) or :meth:`wrap` (a plain
  function).  Calls:

  * ``m(x, key=None, **kwargs) -> logits`` with ``x`` ``[B, H, W, C]`` images in
    ``[0, 1]`` (or an abstract value for certifiable models) and logits ``[B, K]``.  A
    stochastic model needs ``key`` (or default ``rngs`` given at :func:`bind`); a
    deterministic one ignores it.  ``kwargs`` go to the module (``perturbations=...``).
  * ``m.apply(x, key=None, **kwargs) -> (logits, state)``: in training mode ``state``
    holds the updated mutable collections (``mutable``, batch statistics by default);
    in evaluation mode it is the unchanged non-parameter collections.

  A key ``k`` becomes the module's ``rngs={"noise": k1, "dropout": k2}`` with
  ``k1, k2 = jax.random.split(k)``.

  Attributes:
    variables: the module's variables (``{"params": ..., "batch_stats": ...}``), or
      ``None`` for a wrapped function.
    rngs: default ``rngs`` dict used when no key is passed (``None``: none).
    module: the unbound Flax module (``None`` for a wrapped function).
    train: training mode (batch statistics from the batch, dropout, mutable state).
    stochastic: whether evaluation draws noise, so that ``key`` is required.
    fn: the wrapped function (``None`` for a bound module).
    mutable: collections made mutable in training mode.
    compute_dtype: ``None`` (default: the variables' and inputs' own precision, float32)
      or a floating dtype such as ``jnp.bfloat16``: mixed precision.  The parameters,
      the images and array keyword arguments are cast to it for the forward pass, so
      convolutions and matrix products run in it; the logits (and captured states)
      come back in float32, batch statistics are computed and kept in float32, and
      gradients with respect to the float32 parameters or images are float32.  Abstract
      inputs (certification) always run in the variables' precision.
  """
  variables: Any = None
  rngs: Any = None
  module: Any = struct.field(pytree_node=False, default=None)
  train: bool = struct.field(pytree_node=False, default=False)
  stochastic: bool = struct.field(pytree_node=False, default=False)
  fn: Any = struct.field(pytree_node=False, default=None)
  mutable: tuple[str, ...] = struct.field(pytree_node=False, default=("batch_stats",))
  compute_dtype: Any = struct.field(pytree_node=False, default=None)

  @classmethod
  def wrap(cls, fn: Callable[..., Array], stochastic: bool = False) -> "ModelFn":
    """A :class:`ModelFn` around a plain logits function.

    Args:
      fn: ``fn(x) -> logits [B, K]``, or ``fn(x, key) -> logits`` when ``stochastic``.
        A :class:`ModelFn` is returned unchanged.
      stochastic: whether ``fn`` takes a key and draws noise with it.

    Returns:
      A ``ModelFn`` in evaluation mode (``apply`` returns ``(logits, {})``).

    Raises:
      TypeError: ``fn`` is not callable.
    """
    if isinstance(fn, ModelFn):
      if bool(stochastic) and not fn.stochastic:
        raise ValueError("stochastic=True was given for a ModelFn that is deterministic.")
      return fn
    if not callable(fn):
      raise TypeError(f"logits_fn must be callable f(x) (or f(x, key) when stochastic); "
                      f"got {fn!r}.")
    return cls(fn=fn, stochastic=bool(stochastic))

  # ------------------------------------------------------------------ calling
  def _rngs(self, key: Array | None) -> Any:
    return self.rngs if key is None else _rngs_from_key(key)

  def _check_key(self, key: Array | None) -> None:
    if self.stochastic and key is None and self.rngs is None:
      what = type(self.module).__name__ if self.module is not None else "the function"
      raise ValueError(f"{what} draws noise at evaluation time (stochastic): call it as "
                       "m(x, key) with a PRNG key (attacks: wrap it in "
                       "jaxdefense.attacks.eot(m, n)).")

  def __call__(self, x: Any, key: Array | None = None, **kwargs: Any) -> Any:
    return self.apply(x, key, **kwargs)[0]

  def apply(self, x: Any, key: Array | None = None, **kwargs: Any) -> tuple[Any, dict]:
    """``(logits, state)`` of the model on ``x`` (see the class docstring).

    Raises:
      ValueError: a stochastic model called without a key; ``x`` of another shape than
        the variables were made for (e.g. 3-channel images for a model initialised on
        1-channel ones: the message names the layer, the channels it expects and the
        ones it got).
    """
    self._check_key(key)
    if self.fn is not None:
      out = self.fn(x, key, **kwargs) if self.stochastic else self.fn(x, **kwargs)
      return out, {}
    rngs = self._rngs(key)
    extra = {} if rngs is None else {"rngs": rngs}
    variables = self.variables
    if self.compute_dtype is not None and not is_abstract(x):
      variables, x, kwargs = _cast_inputs(self.compute_dtype, variables, x, kwargs)
    try:
      if self.train:
        out, state = self.module.apply(variables, x, train=True,
                                       mutable=list(self.mutable), **extra, **kwargs)
        return _to_float32(out, self.compute_dtype), dict(state)
      out = _to_float32(self.module.apply(variables, x, train=False, **extra, **kwargs),
                        self.compute_dtype)
    except flax.errors.ScopeParamShapeError as e:
      # The layers of jaxdefense.nn say this themselves; this covers other flax layers.
      raise ValueError(
          f"{type(self.module).__name__} cannot run on x of shape {tuple(x.shape)}: its "
          f"variables were made for inputs of another shape (e.g. another channel count). "
          f"flax says: {e}") from None
    return out, {k: v for k, v in self.variables.items() if k != "params"}

  # ------------------------------------------------------------------ variants
  def with_mode(self, train: bool) -> "ModelFn":
    """The same model and variables in training (``True``) or evaluation mode."""
    if self.fn is not None and train:
      raise ValueError("a wrapped logits function has no training mode.")
    stochastic = self.stochastic if self.fn is not None else is_stochastic(self.module, train)
    return self.replace(train=bool(train), stochastic=stochastic)

  def with_variables(self, variables: Any) -> "ModelFn":
    """The same module and mode with other variables (e.g. updated parameters)."""
    return self.replace(variables=variables)

  def frozen(self, *example_args: Any) -> "ModelFn":
    """This model with its arrays cut from differentiation (``stop_gradient``).

    Inner maximisations (attacks inside a training objective) call the frozen model,
    so an outer ``jax.grad`` with respect to the parameters never traces through the
    attack.  A bound module's variables are stop-gradient-ed; a wrapped function's
    closed-over arrays are found with ``jax.closure_convert`` (``example_args`` fix
    its argument types: ``(x,)`` or ``(x, key)``).
    """
    if self.fn is None:
      return self.replace(variables=jax.lax.stop_gradient(self.variables))
    if not example_args:
      raise ValueError("frozen() of a wrapped function needs example arguments (x[, key]).")
    converted, consts = jax.closure_convert(self.fn, *example_args)
    consts = [jax.lax.stop_gradient(c) for c in consts]
    return self.replace(fn=_Frozen(converted, tuple(consts)))


def _cast_inputs(dtype: Any, variables: Mapping[str, Any], x: Any,
                 kwargs: Mapping[str, Any]) -> tuple[dict, Any, dict]:
  """Parameters, images and array keyword arguments of floating type cast to ``dtype``
  (the other collections, e.g. float32 batch statistics, are left as they are)."""
  def cast(a: Any) -> Any:
    if isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(a.dtype, jnp.floating):
      return a.astype(dtype)
    return a
  variables = {k: jax.tree_util.tree_map(cast, v) if k == "params" else v
               for k, v in variables.items()}
  return variables, cast(x), jax.tree_util.tree_map(cast, dict(kwargs))


def _to_float32(out: Any, dtype: Any) -> Any:
  """The model's outputs back in float32 after a mixed-precision pass."""
  if dtype is None:
    return out
  return jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float32) if hasattr(a, "dtype") and
      jnp.issubdtype(a.dtype, jnp.floating) else a, out)


@dataclasses.dataclass(frozen=True, eq=False)
class _Frozen:
  converted: Callable[..., Any]
  consts: Sequence[Any]

  def __call__(self, *args: Any) -> Any:
    return self.converted(*args, *self.consts)


def bind(module: nn.Module, variables: Mapping[str, Any], *, train: bool = False,
         rngs: Mapping[str, Array] | None = None,
         mutable: Sequence[str] = ("batch_stats",), compute_dtype: Any = None) -> ModelFn:
  """The one way to make a model ready to call.

  Args:
    module: an unbound Flax module (``jaxdefense.models.create(...)``).
    variables: its variables (``model.init(...)``, ``state.variables``).
    train: training mode (batch statistics from the batch, dropout on, ``apply``
      returns the updated ``mutable`` collections).
    rngs: default ``rngs`` when a call gives no key (e.g. the training step's noise and
      dropout keys); ``None`` by default.
    mutable: collections updated in training mode.
    compute_dtype: ``None`` (full precision) or e.g. ``"bfloat16"``: mixed precision
      (see :class:`ModelFn`).

  Returns:
    A :class:`ModelFn`; ``stochastic`` is read from the module (its step rule, nested
    members and, in training mode, dropout).

  Raises:
    TypeError: ``module`` is not a Flax module or ``variables`` is not a mapping.
    ValueError: a ``compute_dtype`` that is not a floating dtype.
  """
  compute_dtype = check_compute_dtype(compute_dtype)
  if not isinstance(module, nn.Module):
    raise TypeError(f"module must be a flax.linen Module (jaxdefense.models.create(...)); "
                    f"got {type(module).__name__}.")
  if not isinstance(variables, Mapping):
    raise TypeError(f"variables must be the mapping returned by module.init "
                    f"({{'params': ...}}); got {type(variables).__name__}.")
  return ModelFn(variables=dict(variables), rngs=None if rngs is None else dict(rngs),
                 module=module, train=bool(train),
                 stochastic=is_stochastic(module, bool(train)),
                 mutable=tuple(mutable), compute_dtype=compute_dtype)


#: The ``compute_dtype`` values :func:`bind` and the ``compute_dtype`` config field take.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_compute_dtype(dtype: Any) -> Any:
  """``None`` for full precision (``None`` or float32), else the ``jnp`` dtype.

  Raises:
    ValueError: anything but ``None`` or one of :data:`COMPUTE_DTYPES` (as a name or a
      dtype); the message names ``compute_dtype`` and its value.
  """
  if dtype is None:
    return None
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be None or one of {COMPUTE_DTYPES}; "
                     f"got compute_dtype={dtype!r}.")
  return None if name == "float32" else jnp.dtype(name)
