"""The one batch runner: a per-example function over a whole data set.

Every long evaluation of the library (training evaluation, attack suites, corruption
tables, certified accuracy, masking diagnostics, the experiments) goes through
:func:`run_batches`: the data are cut into batches of one fixed shape (the last batch is
padded by repeating its last row, so nothing recompiles), each batch is sharded over
every device of the mesh (every process of a multi-host job feeds its own rows), the
function is compiled once (and reused when the same function comes again), and the per-example outputs of the real rows come
back as NumPy arrays.  Arguments are validated once per call, not per batch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxdefense import _checks
from jaxdefense.data import _sharding

__all__ = ["run_batches", "padded_batch_size"]


def padded_batch_size(batch_size: int, n: int, mesh: Mesh, fixed: bool = False) -> int:
  """The batch shape :func:`run_batches` compiles for.

  ``min(batch_size, n)`` (``batch_size`` when ``fixed``) rounded up to a multiple of the
  number of devices on the mesh's ``"data"`` axis (and of the process count), so that
  the batch always splits evenly over the devices.
  """
  devices = _sharding.data_size(mesh)
  step = math.lcm(devices, jax.process_count())
  b = max(1, batch_size if fixed else min(batch_size, n))
  return -(-b // step) * step


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
  if a.shape[0] == size:
    return a
  reps = np.repeat(a[-1:], size - a.shape[0], axis=0)
  return np.concatenate([a, reps], axis=0)


def run_batches(fn: Callable[[tuple, Any], Any], arrays: Sequence[Any], *, batch_size: int,
                key: jax.Array | None = None, mesh: Mesh | None = None,
                progress: bool = False, desc: str | None = None,
                jit: bool = True, fixed_batch: bool = False) -> Any:
  """Apply a per-example function to every row of ``arrays``, batch by batch.

  ``fn(batch, key_b)`` receives ``batch``, a tuple with one ``[B, ...]`` slice of each
  array (on device, batch-sharded), and ``key_b = jax.random.fold_in(key, i)`` for
  batch ``i`` (``None`` when ``key`` is ``None``).  It must return a pytree of arrays
  whose leading axis is the batch (per-example results: correct flags, losses, logits,
  bounds...).  Rows are independent of each other for a well-behaved ``fn``, so the
  result does not depend on ``batch_size`` or on the device count (a model whose output
  depends on the whole batch, such as ``EulerMaruyama(std="batch")`` noise, is the
  exception).

  Args:
    fn: ``fn(batch: tuple[Array, ...], key: Array | None) -> pytree of [B, ...]``.  It
      is wrapped in ``jax.jit`` with batch-sharded inputs (``jit=False`` calls it as
      is, e.g. when it is already compiled); passing the same function object again
      reuses its compiled program.
    arrays: equal-length arrays ``[N, ...]`` (NumPy or JAX); ``N >= 1``: an empty data
      set raises (there is no result to return, and callers would average over nothing)
      rather than returning empty arrays.
    batch_size: examples per call, an integer ``>= 1``; rounded up to a multiple of the
      device count (the padding rows are dropped from the result).
    key: root PRNG key, or ``None``.
    mesh: device mesh (default: a 1-D mesh over every device of every process).
    progress: show a tqdm progress bar.
    desc: the progress bar's label.
    jit: compile ``fn`` with ``jax.jit`` (with batch-sharded inputs).
    fixed_batch: pad a data set smaller than ``batch_size`` up to ``batch_size`` too
      (default: the batch is ``min(batch_size, N)``), so that data sets of any size
      share one compiled program (training evaluation of several splits).

  Returns:
    The pytree returned by ``fn`` with every leaf concatenated over batches and cut to
    the ``N`` real rows, as NumPy arrays ``[N, ...]``.

  Raises:
    ValueError: no arrays, arrays of unequal length, an empty data set (0 rows), a
      ``batch_size`` below 1 (the message names it and its value), or outputs without
      the batch as leading axis.
    TypeError: a non-callable ``fn``, a non-integer ``batch_size``.
  """
  if not callable(fn):
    raise TypeError(f"fn must be callable fn(batch, key); got {fn!r}.")
  arrays = tuple(arrays)
  if not arrays:
    raise ValueError("run_batches needs at least one array; got none.")
  batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
  arrays = tuple(a if isinstance(a, (np.ndarray, jax.Array)) else np.asarray(a)
                 for a in arrays)
  n = int(arrays[0].shape[0]) if np.ndim(arrays[0]) else 0
  for i, a in enumerate(arrays):
    if np.ndim(a) == 0 or a.shape[0] != n:
      raise ValueError(f"arrays must all have the same leading length; arrays[0] has "
                       f"{n} rows, arrays[{i}] has shape {np.shape(a)}.")
  if n == 0:
    raise ValueError(f"arrays have 0 rows (shapes {[tuple(np.shape(a)) for a in arrays]}); "
                     "run_batches needs at least one example (an empty data set has no "
                     "per-example results, and a mean over it would be NaN).")
  mesh = _sharding.make_mesh() if mesh is None else mesh
  size = padded_batch_size(batch_size, n, mesh, fixed=bool(fixed_batch))
  sharding = _sharding.batch_sharding(mesh)
  replicated = _sharding.replicated(mesh)
  # jax.jit caches traces per function object: the same ``fn`` passed again (with the
  # same shapes) does not recompile, whatever the batch count.
  compiled = jax.jit(fn, in_shardings=(sharding, replicated)) if jit else fn
  outs = []
  starts = range(0, n, size)
  bar = tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False)
  for i, start in enumerate(bar):
    stop = min(start + size, n)
    host = tuple(_pad_rows(np.asarray(a[start:stop]), size) for a in arrays)
    batch = _sharding.shard_batch(host, sharding)
    kb = None if key is None else jax.random.fold_in(key, i)
    outs.append((compiled(batch, kb), stop - start))
  results = []
  for out, real in outs:  # one transfer per batch, after every batch was dispatched
    if jax.process_count() > 1:  # every process gets the whole batch's results
      out = multihost_utils.process_allgather(out, tiled=True)
    host = jax.device_get(out)
    leaves = jax.tree_util.tree_leaves(host)
    for leaf in leaves:
      if np.ndim(leaf) == 0 or np.shape(leaf)[0] != size:
        raise ValueError(f"fn must return per-example arrays with the batch ({size}) as "
                         f"leading axis; got a leaf of shape {np.shape(leaf)}.")
    results.append(jax.tree_util.tree_map(lambda a, r=real: np.asarray(a)[:r], host))
  return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts, axis=0), *results)
