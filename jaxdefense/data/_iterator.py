"""Deterministic, resumable mini-batch iteration over in-memory arrays.

The order of an epoch is a pure function of ``(seed, epoch, n)``, so a training run
restarted at batch ``start`` of an epoch sees exactly the batches an uninterrupted run
would have seen.  Batches are NumPy arrays; moving them to devices (and sharding
them) is the training loop's job.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from jaxdefense import _checks

__all__ = ["batches", "num_batches", "epoch_order"]


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches in one epoch of ``n`` examples.

  Args:
    n: number of examples, ``>= 0``.
    batch_size: examples per batch, ``>= 1``.
    drop_remainder: if True (default) a last, smaller batch is dropped.

  Returns:
    ``n // batch_size`` if ``drop_remainder`` else ``ceil(n / batch_size)``.

  Raises:
    TypeError / ValueError: non-integer or out-of-range ``n`` / ``batch_size``.
  """
  n = _checks.check_int(n, "n", minimum=0)
  batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
  return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_order(n: int, *, seed: int = 0, epoch: int = 0,
                shuffle: bool = True) -> np.ndarray:
  """The example order of one epoch: a permutation of ``range(n)``.

  A pure function of ``(n, seed, epoch)`` (NumPy's PCG64 seeded by
  ``SeedSequence([seed, epoch])``); identity order when ``shuffle`` is False.

  Args:
    n: number of examples, ``>= 0``.
    seed: non-negative integer seed.
    epoch: non-negative epoch index.
    shuffle: whether to permute.

  Returns:
    ``np.int64 [n]``.

  Raises:
    TypeError / ValueError: bad ``n``, ``seed`` or ``epoch``.
  """
  n = _checks.check_int(n, "n", minimum=0)
  seed = _checks.check_int(seed, "seed", minimum=0)
  epoch = _checks.check_int(epoch, "epoch", minimum=0)
  if not shuffle:
    return np.arange(n, dtype=np.int64)
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
  return rng.permutation(n).astype(np.int64)


def _arrays(data: Any) -> tuple[np.ndarray, np.ndarray]:
  if hasattr(data, "images") and hasattr(data, "labels"):
    images, labels = data.images, data.labels
  elif isinstance(data, (tuple, list)) and len(data) == 2:
    images, labels = data
  else:
    raise TypeError("data must be a Dataset or an (images, labels) pair of arrays; got "
                    f"{type(data).__name__}.")
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim < 1 or labels.ndim < 1:
    raise ValueError(f"images and labels need a leading example axis; got shapes "
                     f"{images.shape} and {labels.shape}.")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"images and labels must have the same length; got "
                     f"{images.shape[0]} and {labels.shape[0]}.")
  return images, labels


def batches(data: Any, batch_size: int, *, seed: int = 0, epoch: int = 0,
            shuffle: bool = True, drop_remainder: bool = True,
            start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Iterate over one epoch of ``(images, labels)`` mini-batches.

  The order depends only on ``(seed, epoch)`` and the data set size (see
  `epoch_order`), so ``list(batches(d, b, seed=s, epoch=e, start=k))`` equals
  ``list(batches(d, b, seed=s, epoch=e))[k:]``: a resumed run sees exactly the
  remaining batches.  With ``drop_remainder=False`` every example is seen exactly
  once per epoch; with True, the ``n % batch_size`` examples that come last in that
  epoch's order are skipped (different ones each epoch when shuffling).

  Arguments are checked when `batches` is called, not at the first ``next``.

  Args:
    data: a `Dataset` (anything with ``.images`` / ``.labels``) or a pair
      ``(images [N, ...], labels [N, ...])`` of arrays.
    batch_size: examples per batch, ``>= 1``.
    seed: non-negative shuffling seed (default 0).
    epoch: non-negative epoch index (default 0); each epoch has its own order.
    shuffle: shuffle the examples (default True); False keeps the stored order.
    drop_remainder: drop a last, smaller batch (default True).
    start: index of the first batch to yield, in ``[0, num_batches]`` (default 0).

  Returns:
    An iterator of ``(images [B, ...], labels [B])`` NumPy copies with the input
    dtypes; ``B == batch_size`` except possibly for the last batch when
    ``drop_remainder`` is False.

  Raises:
    TypeError: ``data`` of the wrong kind, or non-integer sizes / seeds.
    ValueError: mismatched lengths, ``batch_size < 1``, negative ``seed`` / ``epoch``,
      ``start`` outside ``[0, num_batches]``, or ``batch_size`` larger than the data
      with ``drop_remainder`` (the epoch would have no batch at all).
  """
  images, labels = _arrays(data)
  batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
  n = int(labels.shape[0])
  if drop_remainder and batch_size > n:
    raise ValueError(f"batch_size={batch_size} is larger than the data ({n} examples), and "
                     "with drop_remainder=True the epoch would have no batch at all; use "
                     f"batch_size <= {n} or drop_remainder=False.")
  total = num_batches(n, batch_size, drop_remainder)
  start = _checks.check_int(start, "start", minimum=0, maximum=total)
  order = epoch_order(n, seed=seed, epoch=epoch, shuffle=bool(shuffle))

  def generate():
    for b in range(start, total):
      idx = order[b * batch_size:(b + 1) * batch_size]
      yield images[idx], labels[idx]

  return generate()
