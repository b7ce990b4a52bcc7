"""The shared set-up of every attack: argument checks at the API boundary, conversion
to JAX arrays and checked hyper-parameters.  The compiled part of each attack
(:func:`~jaxdefense.attacks._compiled.run_attack`) then builds its loss and projection.

Every attack starts with one call of :func:`setup`, outside the compiled part; it
raises a ``TypeError`` / ``ValueError`` naming the argument, its value and what was
expected before anything is compiled.  Shape and dtype checks always run; value checks
(ranges, NaNs, label bounds) run only on concrete inputs, so they cost nothing under
``jit``.

Precision: images are float32 or float64 (:data:`IMAGE_DTYPES`); float16 and bfloat16
images are rejected because the attacks' small constants (1e-12 guards, C&W's tanh
margin) round away in them.  The model may still compute in lower precision.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import _checks
from jaxdefense.attacks._compiled import model_output
from jaxdefense.attacks._eot import EOT
from jaxdefense.attacks._losses import LOSSES
from jaxdefense.attacks._projection import NORMS

Array = jax.Array

# Image dtypes the attacks accept: the attacks' small constants (1e-12 guards, C&W's
# tanh margin) round away in float16 / bfloat16.
IMAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_key(attack: str, key: Any, required: bool) -> None:
  if key is None:
    if required:
      raise ValueError(f"{attack}: key is required (e.g. key=jax.random.key(0)); got None.")
    return
  if not hasattr(key, "shape") or not hasattr(key, "dtype"):
    raise TypeError(f"{attack}: key must be a PRNG key (jax.random.key(seed)); "
                    f"got {_checks._summary(key)}.")


def as_param(value: Any) -> Any:
  """A hyper-parameter as the attacks use it: a list or tuple becomes a NumPy array.

  Scalars, NumPy and JAX arrays (tracers included) pass through unchanged.
  """
  if isinstance(value, (list, tuple)):
    return np.asarray(value)
  return value


def check_nonneg(value: Any, name: str, batch: int, attack: str,
                 upper: Optional[float] = None) -> Any:
  """A hyper-parameter that may be traced: scalar or ``[batch]``, finite, ``>= 0``.

  ``value`` may be a Python number, a list / tuple of ``batch`` numbers, or a NumPy or
  JAX array (a tracer under ``jit``: then only its shape is checked).  ``upper`` (default
  ``None``) is an optional inclusive upper bound.  Returns the value as the attacks use
  it (:func:`as_param`: a list becomes an array).

  Raises:
    TypeError: ``value`` is a bool or ``None``.
    ValueError: a shape other than ``()`` or ``(batch,)``; a concrete value that is not
      a finite number, is negative or exceeds ``upper``.
  """
  if isinstance(value, bool) or value is None:
    raise TypeError(f"{attack}: {name} must be a non-negative number; got {value!r}.")
  try:
    shape = tuple(np.shape(value))
  except ValueError:  # a ragged sequence
    shape = None
  if shape not in ((), (batch,)):
    raise ValueError(f"{attack}: {name} must be a scalar or have one value per example "
                     f"(shape ({batch},)); got {_checks._summary(value)}.")
  arr = _checks.as_concrete_numpy(value)
  if arr is None:
    return as_param(value)
  if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
    raise ValueError(f"{attack}: {name} must be a finite number; got {_checks._summary(value)}.")
  if np.any(arr < 0):
    raise ValueError(f"{attack}: {name} must be >= 0; got {value!r}.")
  if upper is not None and np.any(arr > upper):
    raise ValueError(f"{attack}: {name} must be <= {upper}; got {value!r}.")
  return as_param(value)


def validate(attack: str, logits_fn: Any, x: Any, y: Any, *, key: Any = None,
             key_required: bool = False, eps: Any = None, norm: str = "linf",
             target: Any = None, loss: Any = "ce") -> int:
  """Check an attack's model, images, labels, key, eps, norm and loss; return ``K``.

  The model is traced with ``jax.eval_shape`` to find the number of classes ``K`` and to
  check that it maps ``x [B, H, W, C]`` to ``[B, K]``; the result is cached on the
  model's structure and the shapes (:func:`~jaxdefense.attacks._compiled.model_output`),
  so a repeated call does not trace the model again.  ``eps`` ``None`` skips
  the radius checks; an :class:`EOT` model always needs a key.

  Raises:
    TypeError / ValueError naming the argument, its value and what was expected.
  """
  if not callable(logits_fn):
    raise TypeError(f"{attack}: logits_fn must be callable f(x) -> logits (or eot(f, n)); "
                    f"got {logits_fn!r}.")
  _checks.check_images(x, "x")
  if np.dtype(x.dtype) not in IMAGE_DTYPES:
    raise ValueError(
        f"{attack}: x must hold float32 or float64 images; got {_checks._summary(x)}. "
        "The attacks' small constants round away in float16 / bfloat16; pass "
        "x.astype(jnp.float32) (the model may still compute in low precision "
        "internally).")
  batch = x.shape[0]
  _checks.check_labels(y, None, "y", batch=batch)
  if target is not None:
    _checks.check_labels(target, None, "target", batch=batch)
  _checks.check_choice(norm, "norm", NORMS)
  if not callable(loss):
    _checks.check_choice(loss, "loss", LOSSES)
  stochastic = isinstance(logits_fn, EOT)
  _check_key(attack, key, key_required or stochastic)
  if eps is not None:
    upper = 1.0 if norm == "linf" else math.sqrt(math.prod(x.shape[1:]))
    check_nonneg(eps, "eps", batch, attack)
    _checks.check_eps(eps, "eps", upper=upper)
  try:
    out = model_output(logits_fn, x, key)  # cached: a repeated call traces nothing
  except TypeError as err:
    raise TypeError(
        f"{attack}: calling logits_fn on x ({_checks._summary(x)}) failed: {err}. "
        "logits_fn must map images [B, H, W, C] to logits [B, K]; wrap a stochastic "
        "model f(x, key) with jaxdefense.attacks.eot(f, n).") from err
  shape = tuple(getattr(out, "shape", ()))
  if len(shape) != 2 or shape[0] != batch:
    raise ValueError(f"{attack}: logits_fn must return logits [B, K] = [{batch}, K]; got "
                     f"output of shape {shape}.")
  num_classes = shape[1]
  if num_classes < 2:
    raise ValueError(f"{attack}: need at least 2 classes; logits_fn returned shape {shape}.")
  _checks.check_labels(y, num_classes, "y", batch=batch)
  if target is not None:
    _checks.check_labels(target, num_classes, "target", batch=batch)
  if loss == "dlr":
    need = 4 if target is not None else 3
    if num_classes < need:
      raise ValueError(f"{attack}: the {'targeted ' if target is not None else ''}DLR loss "
                       f"needs at least {need} classes; logits_fn returns {num_classes}.")
  return num_classes


class AttackSetup(NamedTuple):
  """The checked arguments of one attack call, as returned by :func:`setup`.

  Attributes:
    x: clean images ``[B, H, W, C]`` (a JAX array, float32 or float64).
    y: labels ``[B]`` (a JAX array).
    target: target labels ``[B]`` or ``None``.
    eps: the radius as the attacks use it (:func:`as_param`), or ``None``.
    batch: ``B``.
    num_classes: ``K``, the model's number of classes.
    counts: the checked static counts (``steps``, ``restarts``, ...) by name, as ints.
    params: the checked hyper-parameters (scalar or ``[B]``, may be traced) by name.
  """

  x: Array
  y: Array
  target: Optional[Array]
  eps: Any
  batch: int
  num_classes: int
  counts: dict
  params: dict


def setup(attack: str, logits_fn: Any, x: Any, y: Any, *, key: Any, eps: Any,
          norm: str = "linf", target: Any = None, loss: Union[str, Callable, None] = None,
          key_required: bool = False, counts: Optional[Mapping[str, Any]] = None,
          params: Optional[Mapping[str, Any]] = None) -> AttackSetup:
  """Check and convert the arguments every attack shares (before anything is compiled).

  In order: :func:`validate` (model, images ``x [B, H, W, C]``, labels ``y [B]``,
  ``target``, ``key``, ``eps``, ``norm``, ``loss``), then each of ``counts`` as an
  integer ``>= 1``, then each of ``params`` with :func:`check_nonneg` (a scalar or one
  value per example ``[B]``, finite, ``>= 0``; may be traced), both in the order given.
  The images and labels become JAX arrays, ``eps`` goes through :func:`as_param`.

  Args:
    attack: the attack's name, used in error messages.
    logits_fn: ``f(x) -> logits [B, K]`` or an :class:`EOT`.
    x: clean images ``[B, H, W, C]``, float32 or float64.
    y: integer labels ``[B]``.
    key: PRNG key or ``None``.
    eps: radius (scalar or ``[B]``) or ``None`` (no ball: no radius checks).
    norm: ``"linf"`` (default) or ``"l2"``.
    target: optional target labels ``[B]``.
    loss: ``"ce"``, ``"margin"``, ``"dlr"``, a callable ``loss(logits, y, target)``, or
      ``None`` (default) for an attack that builds its own objective.
    key_required: the attack needs a key even for a deterministic model.  Default
      ``False`` (an :class:`EOT` model always needs one).
    counts: static counts by name (e.g. ``{"steps": 20}``), each checked ``>= 1``;
      default none.
    params: hyper-parameters by name (e.g. ``{"lr": 0.01}``), each checked as above;
      default none.

  Returns:
    An :class:`AttackSetup`.

  Raises:
    TypeError / ValueError naming the argument, its value and what was expected.
  """
  num_classes = validate(attack, logits_fn, x, y, key=key, key_required=key_required,
                         eps=eps, norm=norm, target=target,
                         loss="ce" if loss is None else loss)
  batch = x.shape[0]
  counts = {name: _checks.check_int(value, name, minimum=1)
            for name, value in (counts or {}).items()}
  params = {name: check_nonneg(value, name, batch, attack)
            for name, value in (params or {}).items()}
  eps = as_param(eps)
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  target = None if target is None else jnp.asarray(target)
  return AttackSetup(x, y, target, eps, batch, num_classes, counts, params)
