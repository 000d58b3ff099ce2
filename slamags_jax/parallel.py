"""Data parallelism over every device of every process, with `jax.sharding`.

One program, sharded arrays: a 1-D mesh with axis ``data`` over all devices; batches
are split along their first axis (``P("data")``), parameters and optimizer state are
replicated (``P()``). Under ``jax.jit`` the compiler inserts the collectives, so
reductions that the single-device code writes as plain means (task losses, BatchNorm
statistics with ``model.bn_sync``, the surgery's Gram matrix, NT-Xent's similarity
matrix over the whole global batch) are global: the surgery sees exactly what one
device would. Multi-host: ``initialize()`` calls ``jax.distributed.initialize()`` when
the launcher says there are several processes; each process feeds its own rows of the
global batch (``global_batch``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def initialize() -> None:
  """Starts the multi-host runtime when launched on several hosts (no-op otherwise).

  Cloud TPU VMs and SLURM/Open MPI launches are detected by JAX itself; a manual launch
  sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  if jax.distributed.is_initialized():
    return
  manual = all(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
  tpu_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if manual:
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
  elif tpu_pod or slurm:
    jax.distributed.initialize()


def data_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Any, mesh: Mesh) -> Any:
  """This process's rows of every array -> global arrays sharded along axis 0."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly sharded) global array, whole, as numpy on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_writer() -> bool:
  """Only process 0 writes reports, summaries and logs."""
  return jax.process_index() == 0
