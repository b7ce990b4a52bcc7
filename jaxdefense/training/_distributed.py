"""Joining a multi-process run through JAX's own runtime (``jax.distributed``).

One call per process, before anything else touches JAX's backend::

    jaxdefense.training.initialize_distributed("10.0.0.1:1234", num_processes=2,
                                               process_id=0)   # on host 0
    ...                                                     # process_id=1 on host 1

After it, ``jax.devices()`` lists the devices of every process, and the library's batch
runner, training loop and evaluations split each batch over all of them (each process
feeds only its own slice; see :func:`jaxdefense.data.shard_batch`).  On CPU the
processes exchange data through JAX's CPU collectives (gloo); on Cloud TPU pod slices
and SLURM clusters ``initialize_distributed()`` without arguments lets JAX read the
cluster's environment.  The command line does the same with ``--coordinator_address``,
``--num_processes`` and ``--process_id``.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any

__all__ = ["DistributedError", "initialize_distributed"]


class DistributedError(RuntimeError):
  """The processes of a multi-process run could not join (the message names the flags
  to check: ``--coordinator_address``, ``--num_processes``, ``--process_id``)."""

_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^\s:/]+):(?P<port>[0-9]{1,5})$")


def _check_int(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}; got {name}={value!r}.")
  return int(value)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> None:
  """Join a run of several processes (hosts) through ``jax.distributed.initialize``.

  Call it in every process before JAX creates its backend (before the first
  ``jax.devices()`` or computation).  Either give all three of ``coordinator_address``,
  ``num_processes`` and ``process_id``, or none of them on a cluster that JAX detects by
  itself (Cloud TPU, SLURM, Open MPI).

  Args:
    coordinator_address: ``"host:port"`` of process 0, which runs the coordination
      service there (every process gives the same address).
    num_processes: how many processes take part (the same number everywhere).
    process_id: this process's index in ``[0, num_processes)``, unique per process.
    timeout_s: seconds to wait for every process to join (JAX's
      ``initialization_timeout``) before failing.
    heartbeat_timeout_s: seconds without a heartbeat after which a process counts as
      dead; the others then stop with an error instead of waiting for it forever.

  Raises:
    ValueError: only some of the three given, an address that is not ``host:port``, a
      count < 1, a ``process_id`` outside ``[0, num_processes)``, timeouts < 1.
    DistributedError: (a ``RuntimeError``) the processes could not join within
      ``timeout_s`` (coordinator not reachable, its port taken, mismatched
      ``num_processes``), or JAX is already initialised; the message names the flags to
      check.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  missing = [k for k, v in given.items() if v is None]
  if missing and len(missing) < 3:
    raise ValueError(f"a multi-process run needs coordinator_address, num_processes and "
                     f"process_id together (or none, on a cluster JAX detects); missing "
                     f"{', '.join(missing)} (given: "
                     + ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)
                     + ").")
  timeout_s = _check_int(timeout_s, "timeout_s", 1)
  heartbeat_timeout_s = _check_int(heartbeat_timeout_s, "heartbeat_timeout_s", 1)
  if not missing:
    if not isinstance(coordinator_address, str) or not _ADDRESS.match(coordinator_address):
      raise ValueError(f"coordinator_address must be 'host:port' (process 0's address, "
                       f"e.g. 'localhost:1234'); got {coordinator_address!r}.")
    port = int(_ADDRESS.match(coordinator_address).group("port"))
    if not 1 <= port <= 65535:
      raise ValueError(f"coordinator_address: port {port} is outside 1..65535.")
    num_processes = _check_int(num_processes, "num_processes", 1)
    process_id = _check_int(process_id, "process_id", 0)
    if process_id >= num_processes:
      raise ValueError(f"process_id must be in [0, num_processes) = [0, {num_processes}); "
                       f"got process_id={process_id}.")
  import jax  # pylint: disable=import-outside-toplevel

  if not missing:
    # JAX aborts the whole process (a fatal C++ error, no Python exception) when the
    # coordinator cannot be reached or its port cannot be bound: check both first.
    host = _ADDRESS.match(coordinator_address).group("host").strip("[]")
    if process_id == 0:
      _check_bindable(host, port, coordinator_address)
    else:
      _wait_for_coordinator(host, port, coordinator_address, process_id, num_processes,
                            timeout_s)
  where = (f"the coordinator at {coordinator_address} as process {process_id} of "
           f"{num_processes}" if not missing else "the cluster JAX detected")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  except Exception as e:  # XlaRuntimeError (DEADLINE_EXCEEDED, ...), RuntimeError, ...
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if ("already" in text and "initialize" in text) or "must be called before" in text:
      raise DistributedError(f"jax.distributed is already initialised in this process; call "
                         f"initialize_distributed once, before any JAX computation ({text})."
                         ) from e
    raise DistributedError(
        f"could not join the multi-process run through {where} within {timeout_s} s: "
        f"{text}.  Check that process 0 runs and is reachable at coordinator_address "
        "(--coordinator_address), that every process got the same num_processes "
        "(--num_processes) and its own process_id (--process_id).") from e
  if not missing and jax.process_count() != num_processes:
    raise DistributedError(
        f"this process was started with num_processes={num_processes} (--num_processes) "
        f"but the run that process 0 coordinates at {coordinator_address} has "
        f"{jax.process_count()} processes: give every process the same --num_processes.")


def _check_bindable(host: str, port: int, address: str) -> None:
  """Process 0 will serve on ``port``: fail clearly when it cannot be bound."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      sock.bind(("", port))
    except OSError as e:
      raise DistributedError(
          f"process 0 cannot serve the coordinator on port {port} of coordinator_address "
          f"{address!r} (--coordinator_address): {e.strerror or e}.  Pick a free port "
          "(the same for every process).") from e


def _wait_for_coordinator(host: str, port: int, address: str, process_id: int,
                          num_processes: int, timeout_s: int) -> None:
  """Wait until process 0's coordinator accepts connections, at most ``timeout_s``."""
  deadline = time.monotonic() + timeout_s
  last: Exception | None = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=2.0):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      raise DistributedError(
          f"process {process_id} of {num_processes} could not reach the coordinator at "
          f"{address} (--coordinator_address) within {timeout_s} s "
          f"({getattr(last, 'strerror', None) or last}).  Start process 0 (--process_id 0) "
          "with the same --coordinator_address, check the host name and that the port is "
          "open, or wait longer (timeout_s, --init_timeout).")
    time.sleep(0.25)
