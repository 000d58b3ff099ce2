"""Data parallelism over every device of every process, with `jax.sharding`.

One program, sharded arrays (GSPMD): a 1-D mesh with axis ``data`` over all devices of
all processes; batches are split along their first axis (``P("data")``), parameters and
optimizer state are replicated (``P()``), and ``jax.jit`` partitions the single-device
program, inserting the collectives. Nothing in the model or the losses is written per
device, so every plain mean of the single-device code stays a global reduction:

- task losses and per-task gradients: gradients of replicated parameters are summed
  over devices (one combined all-reduce per step) *before* the surgery, so the
  surgery's Gram matrix and rescale see exactly what one device would;
- NT-Xent: the [2B, 2B] similarity matrix needs every view embedding; XLA all-gathers
  the [2B, D] embeddings (what google-research/simclr does across replicas by hand), so
  the whole global batch serves as negatives; the similarity loss all-reduces its sum
  of normalised embeddings;
- BatchNorm (``model.bn_sync=True``, the default): the per-(view) batch statistics are
  all-reduced ([1, V, C] partial sums per layer), as one device over the global view
  batch. With ``bn_sync=False`` the model gets ``device_groups = mesh.size``: rows are
  patch-major, so group g is exactly device g's shard and its statistics need no
  communication (per-device BN, as DDP without SyncBatchNorm).

Checked on the compiled HLO of the 4-device SLAM-AGS step (CPU, forced host devices):
batch inputs arrive as per-device shards (u8[B/4, 2, h, w, 3]) and activations stay
[B/4 x V, ...] per device (the batch is never replicated). With ``bn_sync``: 152
all-reduces, nearly all [1, V, C] BN statistics (forward and backward, per layer), plus
the gradients in one combined all-reduce; 7 all-gathers, the [2B, D] NT-Xent embeddings
and small index vectors. With ``bn_sync=False``: 4 all-reduces (gradients, the
similarity loss's embedding sum, a head gradient) and the same all-gathers.
tests/test_parallel.py checks the numbers: 4 devices equal 1 device on the same global
batch (and 2 processes x 2 devices behave as one program).

Multi-host: ``initialize()`` starts ``jax.distributed`` when the launch has several
processes (Cloud TPU slices, SLURM, Open MPI, or explicit variables). Each process
feeds its own rows of every global batch (``global_batch``; the input pipeline cuts
per-process rows, and the mesh orders devices by process so that process p's rows are
the p-th block of the global batch); arrays that every process holds whole (probe
images, MIL bags, parameters) are placed with ``host_to_global`` / ``replicate``.
Every process runs every computation (sharded steps, checkpoint saves are collective);
only process 0 writes files (``is_writer``), and ``sync`` is the barrier after such
writes. The workdir must therefore be one shared POSIX folder for all processes (NFS /
Filestore, or a Cloud Storage FUSE mount): see launch/README.md.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
_OFF = ("0", "off", "false", "no")
_ON = ("1", "on", "true", "yes")


def _on_cloud_tpu_vm() -> bool:
  """TPU chips attached (``/dev/accel*`` on v2-v4, ``/dev/vfio/<n>`` on v5e and later) and libtpu installed."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms:
    return False  # e.g. JAX_PLATFORMS=cpu for a host-only step on a TPU VM
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _launched_with_several_processes() -> bool:
  """SLURM / Open MPI / GKE TPU launches of more than one process (JAX reads the rest)."""
  def count(name: str) -> int:
    try:
      return int(os.environ.get(name, "1"))
    except ValueError:
      return 1
  return (count("SLURM_NTASKS") > 1 or count("OMPI_COMM_WORLD_SIZE") > 1
          or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)


def initialize() -> None:
  """Starts the multi-host runtime when this is one process of several (no-op otherwise).

  Must run before anything touches a JAX backend. In order:

  - ``SLAMAGS_DISTRIBUTED=0``: never (e.g. a host-only step on one worker of a slice);
  - ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` all set: a
    manual launch (optionally ``JAX_LOCAL_DEVICE_IDS``), with exactly those values;
  - ``SLAMAGS_DISTRIBUTED=1``, a Cloud TPU VM, or a SLURM / Open MPI / GKE launch of
    several processes: plain ``jax.distributed.initialize()``, which finds the
    coordinator, process count and id itself (TPU metadata, SLURM variables, ...).
    On a single-host TPU VM that is a one-process runtime, which is harmless.

  SLURM note: JAX then gives each process one GPU (its local task id), so launch one
  task per GPU (``srun --ntasks-per-node=<GPUs per node>``).
  """
  mode = os.environ.get("SLAMAGS_DISTRIBUTED", "auto").strip().lower()
  if mode in _OFF or jax.distributed.is_initialized():
    return
  if all(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
    n = int(os.environ["JAX_NUM_PROCESSES"])
    if n > 1:
      jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], n, int(os.environ["JAX_PROCESS_ID"]))
    return
  if mode in _ON or _on_cloud_tpu_vm() or _launched_with_several_processes():
    jax.distributed.initialize()


def data_mesh(devices=None) -> Mesh:
  """1-D ``data`` mesh; devices ordered by process so each process's rows are one block."""
  devices = list(jax.devices() if devices is None else devices)
  devices.sort(key=lambda d: d.process_index)  # stable: keeps the runtime's order within a process
  return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Any, mesh: Mesh) -> Any:
  """This process's rows of every array -> global arrays sharded along axis 0.

  With P processes each passes its ``B / P`` rows; the global batch is their
  concatenation in process order (``data_mesh`` orders the devices so).
  """
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def host_to_global(tree: Any, sharding: NamedSharding) -> Any:
  """Host arrays that *every* process holds whole -> global arrays with ``sharding``.

  Each process copies only the slices its own devices hold (no cross-host traffic and,
  unlike ``jax.device_put`` of host data onto several processes' devices, no check that
  the processes agree, which would be a collective per call).
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree_util.tree_map(put, tree)


def shard_rows(tree: Any, mesh: Mesh) -> Any:
  """Whole host arrays (the same on every process) -> sharded along axis 0 over ``mesh``."""
  return host_to_global(tree, batch_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Parameters (host or device arrays, the same on every process) -> replicated over ``mesh``.

  Leaves already replicated over ``mesh`` are kept as they are.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return host_to_global(np.asarray(jax.device_get(x)), sharding)
  return jax.tree_util.tree_map(put, tree)


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly sharded) global array, whole, as numpy on every process."""
  if not isinstance(x, jax.Array) or jax.process_count() == 1 or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_writer() -> bool:
  """Only process 0 writes files (outputs, reports, summaries, logs)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier over all processes (no-op with one), e.g. after process 0 wrote what others read.

  Every process must call it with the same ``name`` at the same point of the program.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
