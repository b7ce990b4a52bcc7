"""Certified accuracy over a data set (batched, jit-compiled once, with a progress bar)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdefense import _checks
from jaxdefense.certify import _api as certify_api

__all__ = ["certified_accuracy"]


def _arrays(data: Any) -> tuple[np.ndarray, np.ndarray]:
  if hasattr(data, "images") and hasattr(data, "labels"):
    return np.asarray(data.images), np.asarray(data.labels)
  if isinstance(data, (tuple, list)) and len(data) == 2:
    return np.asarray(data[0]), np.asarray(data[1])
  raise TypeError("data must be a jaxdefense.data.Dataset or a pair (images, labels); got "
                  f"{type(data).__name__}.")


def certified_accuracy(model: Any, variables: Any, data: Any, eps: float,
                       domain: str = "zonotope", batch_size: int = 100, *,
                       limit: int | None = None, progress: bool = True,
                       return_mask: bool = False, **verify_kwargs: Any) -> Any:
  """Fraction of examples proved robust at ``eps`` (see :func:`jaxdefense.certify.verify`).

  Every batch has the same shape (the last one is padded and the padding ignored), so
  the certification runs compiled once.

  Args:
    model: a certifiable Flax model (built from :mod:`jaxdefense.nn` layers).
    variables: its variables.
    data: a :class:`jaxdefense.data.Dataset` or a pair ``(images [N, H, W, C] in [0, 1],
      labels [N])``.
    eps: l-inf radius in ``[0, 1]`` units.
    domain: ``"zonotope"`` (default), ``"box"`` or ``"deepz"``.
    batch_size: examples per call (memory of the zonotope grows with it).
    limit: use only the first ``limit`` examples.
    progress: show a tqdm progress bar.
    return_mask: also return the ``bool [N]`` per-example result.
    **verify_kwargs: ``relu``, ``relu_budget``, ``correlate_input``, ``train``.

  Returns:
    The certified accuracy in ``[0, 1]`` (a float), or ``(accuracy, mask)``.

  Raises:
    ValueError, TypeError: bad data, ``eps``, ``domain`` or ``batch_size`` (as
      :func:`jaxdefense.certify.verify`).
  """
  images, labels = _arrays(data)
  if limit is not None:
    _checks.check_int(limit, "limit", minimum=0)
    images, labels = images[:limit], labels[:limit]
  batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
  n = images.shape[0]
  if n == 0:
    return (0.0, np.zeros(0, bool)) if return_mask else 0.0
  _checks.check_images(images, "data images", ranks=(2, 3, 4, 5))
  _checks.check_labels(labels, None, "data labels", batch=n)
  _checks.check_eps(eps, "eps")
  batch_size = min(batch_size, n)
  mask = np.zeros(n, bool)
  steps = range(0, n, batch_size)
  bar = tqdm(steps, desc=f"certify ({domain}, eps={eps:g})", unit="batch",
             disable=not progress, leave=False)
  for start in bar:
    xb, yb = images[start:start + batch_size], labels[start:start + batch_size]
    real = xb.shape[0]
    if real < batch_size:  # pad to a fixed shape: no recompilation for the last batch
      pad = batch_size - real
      xb = np.concatenate([xb, np.repeat(xb[:1], pad, 0)], 0)
      yb = np.concatenate([yb, np.repeat(yb[:1], pad, 0)], 0)
    ok = certify_api.verify(model, variables, jnp.asarray(xb), jnp.asarray(yb), eps, domain,
                            **verify_kwargs)
    mask[start:start + real] = np.asarray(ok)[:real]
    bar.set_postfix(certified=f"{mask[:start + real].mean():.3f}")
  acc = float(mask.mean())
  return (acc, mask) if return_mask else acc
