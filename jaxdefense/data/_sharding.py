"""Data parallelism with ``jax.sharding``: the batch sharded over a ``"data"`` mesh axis,
the state replicated, and optionally an ensemble's members split over a ``"member"`` axis."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdefense import _checks

__all__ = ["DATA_AXIS", "MEMBER_AXIS", "make_mesh", "replicated", "batch_sharding",
           "check_divisible", "shard_batch", "process_slice", "data_size", "member_size",
           "state_sharding"]

#: Name of the mesh axis the batch is split over.
DATA_AXIS = "data"
#: Name of the mesh axis an ensemble's members are split over (see :func:`make_mesh`).
MEMBER_AXIS = "member"


def make_mesh(devices: Sequence[jax.Device] | None = None, members: int = 1) -> Mesh:
  """A device mesh over ``devices`` (default: every device of every process).

  ``members=1`` (default): a 1-D mesh with the axis ``"data"``; the batch is split over
  every device.  ``members=k > 1``: a 2-D mesh ``("member", "data")`` of shape
  ``(k, n / k)``: the members of a (non-shared) ``models.Ensemble`` are split over the
  ``"member"`` axis (each device holds ``size / k`` of them, see
  ``Ensemble.member_mesh``) and the batch over the ``"data"`` axis.  The member axis
  runs over the devices of one process (``k`` must divide the local device count), so
  that every process still feeds whole rows of the batch.

  Over several hosts (after ``jax.distributed.initialize``) ``jax.devices()`` holds
  the devices of all processes, so the same mesh spans the whole job.

  Raises:
    ValueError: ``members`` below 1 or not dividing the number of devices of a process.
  """
  devices = list(jax.devices() if devices is None else devices)
  members = _checks.check_int(members, "members", minimum=1)
  if members == 1:
    return Mesh(np.asarray(devices), (DATA_AXIS,))
  local = len(devices) // max(jax.process_count(), 1)
  if len(devices) % members or local % members:
    raise ValueError(
        f"members={members} must divide the number of devices per process ({local} of "
        f"{len(devices)} devices on {jax.process_count()} process(es)): the member axis "
        "runs over the devices of one process.  Use a divisor, e.g. members=1.")
  # [n / k, k] then transposed: consecutive devices (one process's) form the member axis.
  grid = np.asarray(devices, dtype=object).reshape(len(devices) // members, members).T
  return Mesh(grid, (MEMBER_AXIS, DATA_AXIS))


def data_size(mesh: Mesh) -> int:
  """Number of devices the batch is split over (the ``"data"`` axis of ``mesh``)."""
  return int(dict(mesh.shape).get(DATA_AXIS, mesh.size))


def member_size(mesh: Mesh | None) -> int:
  """Number of devices an ensemble's members are split over (1 without a member axis)."""
  return 1 if mesh is None else int(dict(mesh.shape).get(MEMBER_AXIS, 1))


def state_sharding(tree: Any, mesh: Mesh, stacked_members: bool = False) -> Any:
  """One ``NamedSharding`` per leaf of ``tree`` (a state, variables or shapes).

  Every leaf is replicated, except, when ``stacked_members`` (the model is a
  non-shared ``Ensemble``) and ``mesh`` has a ``"member"`` axis, the leaves under a
  ``"member"`` key (an ensemble's stacked variables, and the optimizer's moments of
  them, which mirror the parameter tree): their leading axis (the members) is split
  over the ``"member"`` axis.
  """
  rep = replicated(mesh)
  if not stacked_members or member_size(mesh) == 1:
    return jax.tree_util.tree_map(lambda _: rep, tree)
  split = NamedSharding(mesh, PartitionSpec(MEMBER_AXIS))

  def one(path: Any, leaf: Any) -> NamedSharding:
    keys = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    return split if MEMBER_AXIS in keys and len(getattr(leaf, "shape", ())) >= 1 else rep
  return jax.tree_util.tree_map_with_path(one, tree)


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

  An array ``[B, ...]`` placed with it holds ``B / data_size(mesh)`` rows on each
  device (see :func:`shard_batch`); the other axes are not split (on a mesh with a
  ``"member"`` axis the rows are repeated over it).

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

  Also requires a whole number of examples per process on multi-host runs.  On a mesh
  with a ``"member"`` axis the batch is split over the ``"data"`` axis only.
  """
  n = data_size(mesh)
  if batch_size % n:
    lower = max(n, batch_size // n * n)
    raise ValueError(
        f"{name}={batch_size} is not divisible by the number of devices the batch is "
        f"split over ({n}: {mesh.devices.flat[0].platform} x {n}); the batch is split "
        "evenly over them. "
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
