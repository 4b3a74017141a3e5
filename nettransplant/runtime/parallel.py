"""Data parallelism over a device mesh, and multi-host runs on JAX's distributed runtime.

pmap's semantics, written the way JAX now implements pmap (``jax.jit`` over a
``jax.make_mesh`` mesh): the parameters and optimizer state are *replicated*
on every device of the mesh, the batch axis of each step (labelled images,
teacher images, pseudo-gradient draws) is *sharded* over the ``data`` axis, and
XLA inserts the all-reduce of the gradients that ``pmap`` code writes as
``lax.pmean``. There is one code path for one device and for many: with one
device every sharding below is trivial and a step computes exactly what an
unsharded ``jax.jit`` computes.

The mesh comes from the config (``config.mesh``: axis name → size, ``-1`` =
every remaining device; default ``{"data": -1}``, every visible device on one
``data`` axis): :func:`mesh_from_config`.

Multi-host: every process runs the same program (:func:`initialize_distributed`
joins them; the launchers' ``--coordinator_address``, ``--num_processes`` and
``--process_id`` flags, or a detected Slurm / TPU / Open MPI cluster). Each
process

* computes the same deterministic index streams and loads only its rows of
  each batch (:func:`process_rows`, :func:`shard_batch`,
  ``jax.make_array_from_process_local_data``);
* holds its own copy of everything outside the train steps (data, evaluation,
  the closed form's solve): :func:`replicate` makes global arrays for a step,
  :func:`local` brings a replicated result back;
* shows progress and writes result files only as process 0 (:func:`is_primary`),
  while orbax checkpoints are saved and restored by every process together.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

DATA_AXIS = "data"
DEFAULT_MESH = {DATA_AXIS: -1}  # every visible device on one data axis

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- mesh


def mesh_from_config(spec: Mapping[str, int] | Any | None = None,
                     devices: list | None = None) -> Mesh:
    """A device mesh from ``config.mesh``.

    Args:
      spec: ``{axis name: size}`` (a dict or ``ConfigDict``); one size may be
        ``-1`` (every remaining device). None gives :data:`DEFAULT_MESH`. The
        mesh must have a ``data`` axis; other axes (a ``model`` axis, say) hold
        replicas of the same batch shard.
      devices: the devices to use (default: every device of every process).
    Returns:
      A :class:`jax.sharding.Mesh` with automatic (GSPMD) axes.
    Raises:
      ValueError: sizes that do not multiply to the device count, or no ``data`` axis.
    """
    spec = dict(DEFAULT_MESH if spec is None else spec.items())
    devices = list(jax.devices() if devices is None else devices)
    if DATA_AXIS not in spec:
        raise ValueError(f"config.mesh {spec} has no {DATA_AXIS!r} axis to shard batches over")
    sizes = {name: int(size) for name, size in spec.items()}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh {spec}: at most one axis may have size -1")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if known < 1 or len(devices) % known:
            raise ValueError(f"config.mesh {spec}: {len(devices)} devices do not divide into "
                             f"axes of sizes {known}")
        sizes[free[0]] = len(devices) // known
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(f"config.mesh {spec} needs {int(np.prod(list(sizes.values())))} "
                         f"devices, {len(devices)} are visible")
    auto = (jax.sharding.AxisType.Auto,) * len(sizes)  # XLA places the collectives
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=auto,
                         devices=devices)


def data_mesh(devices: list | None = None) -> Mesh:
    """Every device (or ``devices``) on one ``data`` axis: the default mesh."""
    return mesh_from_config(None, devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Parameters, optimizer state, metrics: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """A batch (or draws) axis split over ``data``; the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def data_size(mesh: Mesh) -> int:
    """The number of batch shards: the size of the mesh's ``data`` axis."""
    return int(mesh.shape[DATA_AXIS])


def check_divisible(what: str, size: int, mesh: Mesh) -> None:
    """Refuse a batch that does not split evenly over the ``data`` axis (as pmap does).

    Raises:
      ValueError: naming ``what``, its ``size`` and the number of devices.
    """
    n = data_size(mesh)
    if size % n:
        raise ValueError(f"{what} {size} does not divide over the {n} devices of the mesh's "
                         f"{DATA_AXIS!r} axis; use a multiple of {n}")


# --------------------------------------------------------------------------- arrays


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """One leaf onto ``sharding``, the same value on every process."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x  # already there (e.g. a state saved mid-training)
    if _is_key(x):  # key arrays travel as their raw data
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=impl)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Multi-process: a host value becomes a global array; each process gives the
    # same data (a replicated sharding takes the whole array from each).
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` replicated on ``mesh`` (None leaves stay None).

    Multi-process: every process must pass the same values (they hold the same
    deterministic data); the result is one global array per leaf.
    """
    return jax.tree.map(lambda x: _put(x, replicated(mesh)), tree)


def state_enters_replicated(step: Callable, mesh: Mesh) -> Callable:
    """``step(state, *args)`` whose state is put replicated on ``mesh`` first.

    A jitted step returns its state replicated (``out_shardings``); a fresh
    state (uncommitted, or on one device) would otherwise enter with another
    sharding and cost a second trace. A state already replicated passes
    through untouched. ``.lower`` is the jitted step's (for cost analysis).
    """
    @functools.wraps(step)
    def with_replicated_state(state, *args):
        return step(replicate(state, mesh), *args)

    with_replicated_state.lower = step.lower
    return with_replicated_state


def local(tree: Any) -> Any:
    """Host-local arrays from replicated (global) ones: what code outside a step uses.

    A replicated array's first addressable shard is a full copy on one of this
    process's devices, so nothing crosses hosts.
    """
    def one(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            if not x.is_fully_replicated:
                raise ValueError(f"local() takes replicated arrays, got {x.sharding}")
            return x.addressable_shards[0].data
        return x

    return jax.tree.map(one, tree)


def local_sharding() -> SingleDeviceSharding:
    """This process's first device: where restored checkpoints are placed."""
    return SingleDeviceSharding(jax.local_devices()[0])


def process_rows(size: int, mesh: Mesh) -> slice:
    """The rows of a global batch of ``size`` rows that this process's devices hold.

    One process: all of them. Several: the contiguous block that
    ``make_array_from_process_local_data`` expects from this process.
    """
    check_divisible("batch size", size, mesh)
    if jax.process_count() == 1:
        return slice(0, size)
    index = batch_sharded(mesh).addressable_devices_indices_map((size,))
    starts = [s[0].start or 0 for s in index.values()]
    stops = [size if s[0].stop is None else s[0].stop for s in index.values()]
    return slice(min(starts), max(stops))


def shard_batch(tree: Any, mesh: Mesh, global_size: int) -> Any:
    """Global arrays split over ``data`` along axis 0, from this process's rows only.

    Args:
      tree: arrays holding this process's rows (``process_rows(global_size, mesh)``
        of the global batch), e.g. ``images[index[process_rows(...)]]``.
      global_size: the batch size over all processes.
    Returns:
      Arrays of leading dimension ``global_size`` sharded over ``data``.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x), (global_size, *np.shape(x)[1:])), tree)


def constrain_batch(tree: Any, mesh: Mesh) -> Any:
    """Inside a jitted step: split axis 0 of every leaf over ``data`` (a gathered batch)."""
    return jax.lax.with_sharding_constraint(tree, batch_sharded(mesh))


# --------------------------------------------------------------------------- processes


def is_primary() -> bool:
    """Process 0: the one that shows progress and writes result files."""
    return jax.process_index() == 0


def cluster_detected(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process cluster this process runs in (Slurm, TPU pod, Open MPI), or None.

    Only clusters of more than one process count: a one-task Slurm job or a
    single TPU host runs as one process without the distributed runtime.
    """
    env = os.environ if environ is None else environ
    if int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1 \
            and "SLURM_JOB_ID" in env:
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return "tpu"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           initialization_timeout: int = 300) -> bool:
    """Join this process to a multi-process run (before any other JAX call).

    With ``coordinator_address`` (``host:port`` of process 0) the three
    arguments go to ``jax.distributed.initialize``. Without it, a detected
    cluster (:func:`cluster_detected`) lets JAX find them itself; otherwise
    this is a single-process run and nothing happens.

    Returns:
      Whether the distributed runtime was started.
    """
    if coordinator_address is None and (num_processes or process_id is not None):
        raise ValueError("--num_processes / --process_id need --coordinator_address")
    if coordinator_address is None:
        cluster = cluster_detected()
        if cluster is None:
            return False
        _log.info("multi-process %s cluster detected; initializing jax.distributed", cluster)
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
        return True
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id {process_id} is not in [0, {num_processes})")
    # CPU processes exchange data through gloo (GPUs and TPUs use their own links).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout)
    return True


_FLAG_HELP = {
    "coordinator_address": "host:port of process 0 in a multi-process run (all processes "
                           "pass the same); absent: a Slurm/TPU/MPI cluster is detected, "
                           "else one process",
    "num_processes": "number of processes of a multi-process run",
    "process_id": "this process's index in [0, num_processes)",
}


def define_distributed_flags(values) -> None:
    """``--coordinator_address``, ``--num_processes``, ``--process_id`` on ``values`` (an absl
    ``FlagValues``)."""
    from absl import flags
    flags.DEFINE_string("coordinator_address", None, _FLAG_HELP["coordinator_address"],
                        flag_values=values)
    flags.DEFINE_integer("num_processes", None, _FLAG_HELP["num_processes"],
                         flag_values=values)
    flags.DEFINE_integer("process_id", None, _FLAG_HELP["process_id"], flag_values=values)


def initialize_from_flags(values) -> bool:
    """:func:`initialize_distributed` from :func:`define_distributed_flags`' parsed flags."""
    return initialize_distributed(values.coordinator_address, values.num_processes,
                                  values.process_id)
