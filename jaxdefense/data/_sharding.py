"""Data parallelism with ``jax.sharding``: a 1-D mesh, batch sharded, state replicated."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DATA_AXIS", "make_mesh", "replicated", "batch_sharding", "check_divisible",
           "shard_batch", "process_slice"]

#: Name of the mesh axis the batch is split over.
DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process).

  Over several hosts (after ``jax.distributed.initialize``) ``jax.devices()`` holds
  the devices of all processes, so the same mesh spans the whole job.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that keeps a full copy on every device of ``mesh``.

  For parameters and optimizer state: ``jax.device_put(tree, replicated(mesh))``.

  Args:
    mesh: a ``jax.sharding.Mesh``, e.g. from :func:`make_mesh`.

  Returns:
    ``NamedSharding(mesh, PartitionSpec())`` (no axis partitioned), for arrays of any
    shape.
  """
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding that splits the leading (batch) axis over ``mesh``.

  An array ``[B, ...]`` placed with it holds ``B / mesh.size`` rows on each device
  (see :func:`shard_batch`); the other axes are not split.

  Args:
    mesh: a mesh with the axis ``DATA_AXIS`` (``"data"``), e.g. from :func:`make_mesh`.

  Returns:
    ``NamedSharding(mesh, PartitionSpec("data"))``.  ``B`` must be divisible by the
    number of devices when arrays are placed with it (see ``check_divisible``); the
    sharding itself does not check.
  """
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  """Raise ``ValueError`` unless ``batch_size`` splits evenly over the mesh.

  Also requires a whole number of examples per process on multi-host runs.
  """
  n = mesh.size
  if batch_size % n:
    lower = max(n, batch_size // n * n)
    raise ValueError(
        f"{name}={batch_size} is not divisible by the number of devices ({n}: "
        f"{mesh.devices.flat[0].platform} x {n}); the batch is split evenly over them. "
        f"Use a multiple of {n}, e.g. {name}={lower} or {lower + n}.")
  if batch_size % jax.process_count():
    raise ValueError(f"{name}={batch_size} is not divisible by the number of processes "
                     f"({jax.process_count()}).")


def process_slice(batch_size: int) -> slice:
  """The rows of a global batch that this process feeds (all of them on one host)."""
  per = batch_size // jax.process_count()
  i = jax.process_index()
  return slice(i * per, (i + 1) * per)


def shard_batch(arrays: Any, sharding: NamedSharding) -> Any:
  """Place a global host batch (a pytree of NumPy arrays) on the mesh, batch-sharded.

  Every process computes the same global batch (the data order depends only on the
  seed and epoch) and contributes its own rows; on one host the whole batch is
  transferred with ``jax.device_put``.
  """
  if jax.process_count() == 1:
    return jax.device_put(arrays, sharding)

  def one(a):
    a = np.asarray(a)
    return jax.make_array_from_process_local_data(sharding, a[process_slice(a.shape[0])],
                                                  a.shape)
  return jax.tree_util.tree_map(one, arrays)
