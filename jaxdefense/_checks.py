"""Argument checks shared by every layer of the package.

Each check raises a ``ValueError`` or ``TypeError`` that names the argument, shows the
offending value and says what was expected.  Value checks (ranges, NaNs) run only on
concrete inputs (NumPy arrays, Python numbers, or JAX arrays outside a trace); under
``jit`` they are skipped rather than forcing a host sync, so call them at the API
boundary, before tracing.

This module is a leaf: it imports nothing from the package, so every layer
(``data`` included) may use it.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _summary(value: Any) -> str:
  """A short printable description of an argument value."""
  if isinstance(value, (numbers.Number, str, type(None))):
    return repr(value)
  shape = getattr(value, "shape", None)
  dtype = getattr(value, "dtype", None)
  if shape is not None:
    return f"array of shape {tuple(shape)} and dtype {dtype}"
  text = repr(value)
  return text if len(text) < 80 else text[:77] + "..."


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds values we can inspect without a trace."""
  return not isinstance(x, jax.core.Tracer)


def as_concrete_numpy(x: Any) -> np.ndarray | None:
  """NumPy view of ``x`` when concrete, else ``None``."""
  if not is_concrete(x):
    return None
  try:
    return np.asarray(x)
  except Exception:  # pragma: no cover - exotic array types
    return None


def check_rank(x: Any, name: str, ranks: Sequence[int], what: str = "") -> None:
  """Raise ``ValueError`` unless ``x.ndim`` is one of ``ranks``."""
  ndim = len(getattr(x, "shape", ()))
  if ndim not in tuple(ranks):
    expected = " or ".join(str(r) for r in ranks)
    raise ValueError(
        f"{name} must have rank {expected}{' (' + what + ')' if what else ''}; "
        f"got {_summary(x)} (rank {ndim}).")


def check_floating(x: Any, name: str) -> None:
  """Raise ``TypeError`` unless ``x`` has a floating dtype (``bfloat16`` included)."""
  dtype = getattr(x, "dtype", None)
  # jnp.issubdtype knows the ml_dtypes floats (bfloat16, float8...), which
  # np.issubdtype does not count as np.floating.
  if dtype is None or not jnp.issubdtype(np.dtype(dtype), jnp.floating):
    raise TypeError(
        f"{name} must be a floating-point array (images in [0, 1]); got "
        f"{_summary(x)}. Convert integer images with x.astype(np.float32) / 255.")


def check_finite(x: Any, name: str) -> None:
  """Raise ``ValueError`` if a concrete ``x`` holds NaN or infinite entries."""
  arr = as_concrete_numpy(x)
  if arr is not None and arr.size and not np.all(np.isfinite(arr)):
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    raise ValueError(f"{name} contains {bad} NaN or infinite entries "
                     f"({_summary(x)}); expected finite values.")


def check_images(x: Any, name: str = "x", ranks: Sequence[int] = (4,)) -> None:
  """Check a batch of images: floating, given rank (NHWC), finite, inside [0, 1].

  Args:
    x: the images (NumPy or JAX array); under a trace only the rank and dtype are
      checked.
    name: the argument's name, used in the messages.
    ranks: accepted ranks; default ``(4,)`` (``[B, H, W, C]``).

  Raises:
    ValueError: another rank, NaN or infinite entries (their count is given), or values
      outside ``[0, 1]`` (the range is given, with a hint for a ``[0, 255]`` scale).
    TypeError: a non-floating dtype (integer images).
  """
  check_rank(x, name, ranks, "a batch of images [B, H, W, C]" if tuple(ranks) == (4,) else "")
  check_floating(x, name)
  arr = as_concrete_numpy(x)
  if arr is None or arr.size == 0:
    return
  # min and max propagate NaN, so two passes find every non-finite entry as well.
  lo, hi = float(arr.min()), float(arr.max())
  if not (np.isfinite(lo) and np.isfinite(hi)):
    check_finite(arr, name)
  if lo < 0.0 or hi > 1.0:
    hint = " (images on a [0, 255] scale? divide by 255)" if hi > 1.5 else ""
    raise ValueError(f"{name} must lie in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]{hint}.")


def check_labels(y: Any, num_classes: int | None, name: str = "y",
                 batch: int | None = None) -> None:
  """Check integer class labels ``[B]`` in ``[0, num_classes)``: the one label check.

  Every place where labels enter the library (data sets, attacks, evaluation,
  certification) calls it, so a label out of range is rejected everywhere alike.

  Args:
    y: labels, a NumPy or JAX array (a list or tuple is read as a NumPy array).  Under
      a trace only the rank, dtype and length are checked.
    num_classes: the number of classes ``K``; ``None`` skips the range check.
    name: the argument's name, used in the messages.
    batch: the expected number of labels (one per image), or ``None``.

  Raises:
    ValueError: ``y`` not of rank 1, a length other than ``batch``, or labels outside
      ``[0, num_classes)`` (the message gives how many, the offending values and the
      range).
    TypeError: non-integer labels.
  """
  if isinstance(y, (list, tuple)):
    y = np.asarray(y)
  check_rank(y, name, (1,), "integer labels [B]")
  dtype = getattr(y, "dtype", None)
  if dtype is None or not np.issubdtype(np.dtype(dtype), np.integer):
    raise TypeError(f"{name} must hold integer class labels; got {_summary(y)}.")
  if batch is not None and y.shape[0] != batch:
    raise ValueError(f"{name} must have one label per image ({batch}); got {_summary(y)}.")
  arr = as_concrete_numpy(y)
  if arr is None or arr.size == 0 or num_classes is None:
    return
  arr = arr.astype(np.int64, copy=False)
  bad = (arr < 0) | (arr >= num_classes)
  if np.any(bad):
    values = np.unique(arr[bad])
    shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if values.size > 5 else "")
    raise ValueError(f"{name} must lie in [0, {num_classes}) for {num_classes} classes; "
                     f"got {int(np.count_nonzero(bad))} of {arr.size} labels outside "
                     f"(values {shown}; range [{int(arr.min())}, {int(arr.max())}]).")


def check_eps(eps: Any, name: str = "eps", upper: float = 1.0) -> None:
  """Check a perturbation radius: finite, ``0 <= eps <= upper`` (pixel scale [0, 1])."""
  arr = as_concrete_numpy(eps)
  if arr is None:
    return
  if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be a finite number; got {_summary(eps)}.")
  if np.any(arr < 0):
    raise ValueError(f"{name} must be >= 0; got {eps!r}.")
  if np.any(arr > upper):
    hint = " (on a [0, 255] scale? use e.g. 8/255)" if np.max(arr) >= 1.5 else ""
    raise ValueError(f"{name} must be <= {upper} in [0, 1] pixel units; got {eps!r}{hint}.")


def check_int(value: Any, name: str, minimum: int | None = None,
              maximum: int | None = None) -> int:
  """Check an integer argument (bools rejected) and return it as ``int``."""
  if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
    raise TypeError(f"{name} must be an integer; got {_summary(value)}.")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}; got {value}.")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name} must be <= {maximum}; got {value}.")
  return value


def check_float(value: Any, name: str, minimum: float | None = None,
                maximum: float | None = None, strict_min: bool = False) -> float:
  """Check a real-number argument and return it as ``float``."""
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
    raise TypeError(f"{name} must be a real number; got {_summary(value)}.")
  value = float(value)
  if not np.isfinite(value):
    raise ValueError(f"{name} must be finite; got {value}.")
  if minimum is not None and (value <= minimum if strict_min else value < minimum):
    raise ValueError(f"{name} must be {'>' if strict_min else '>='} {minimum}; got {value}.")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name} must be <= {maximum}; got {value}.")
  return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
  """Check that ``value`` is one of ``choices``."""
  if value not in tuple(choices):
    raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}.")
  return value


def plain_value(value: Any) -> Any:
  """A config value as plain, hashable Python: ConfigDicts (anything with ``to_dict``)
  and mappings become dicts, lists and tuples become tuples, recursively; other values
  are returned as they are.  Used where config groups become module fields or step
  rules (flax fields must be hashable)."""
  if hasattr(value, "to_dict") and callable(value.to_dict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: plain_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(plain_value(v) for v in value)
  return value
