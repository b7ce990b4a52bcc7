"""Certified accuracy over a data set (the batch runner: padded batches, compiled once)."""

from __future__ import annotations

from typing import Any

import numpy as np

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

  Runs :func:`jaxdefense.certify._api.verify_dataset`, i.e. ``jaxdefense.data.run_batches``:
  every batch has the same shape (the last one is padded and the padding dropped) and
  is sharded over all devices, so the certification runs compiled once.

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
    **verify_kwargs: ``relu``, ``relu_budget``, ``correlate_input``, ``train``, ``sound``
      (default ``True``: certificates that hold for the float32 network, see
      :func:`jaxdefense.certify.verify`).

  Returns:
    The certified accuracy in ``[0, 1]`` (a float), or ``(accuracy, mask)``; ``0.0``
    (and an empty mask) for an empty data set.

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
  mask = certify_api.verify_dataset(model, variables, images, labels, eps, domain,
                                    batch_size=batch_size, progress=progress,
                                    desc=f"certify ({domain}, eps={eps:g})", **verify_kwargs)
  acc = float(mask.mean())
  return (acc, mask) if return_mask else acc
