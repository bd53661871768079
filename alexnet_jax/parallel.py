"""Everything device-parallel, in one place: pmap, batch sharding, replication, prefetch.

The training step is data-parallel over `jax.pmap`: every local device holds a replica of the
train state and a slice of the global batch, and the gradients are averaged with `lax.pmean`
over the axis `AXIS_NAME`. The model and the training loop only call the functions below, so a
`jit` + `Mesh` implementation of this module could replace `pmap` without touching them.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.jax_utils
import jax
from jax import lax
from jax.experimental import multihost_utils
import numpy as np

AXIS_NAME = 'batch'


def select_devices(num_devices: int = 0) -> list[jax.Device]:
  """Returns the local devices to run on: all of them (0) or the first `num_devices`."""
  devices = jax.local_devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f'config.num_devices={num_devices}, but this host has {len(devices)} '
                     f'local devices ({devices[0].platform}); use 0 for all of them.')
  return devices[:num_devices] if num_devices else devices


def per_device_batch_size(global_batch_size: int, num_local_devices: int, name: str) -> int:
  """Splits a global batch over every device of every process, or explains why it cannot."""
  num_global = num_local_devices * jax.process_count()
  if global_batch_size <= 0 or global_batch_size % num_global:
    raise ValueError(
        f'config.{name}={global_batch_size} must be a positive multiple of the number of '
        f'devices ({num_global} = {jax.process_count()} processes x {num_local_devices} local); '
        f'try --config.{name}={max(1, global_batch_size // num_global) * num_global}.')
  return global_batch_size // num_global


def pmap(fn: Callable[..., Any], devices: Sequence[jax.Device],
         donate_state: bool = False) -> Callable[..., Any]:
  """`jax.pmap` over `devices` with the batch axis name; donates the state (arg 0) if asked.

  Args:
    fn: the per-device function.
    devices: this process's devices, from `select_devices`; in a multi-process run, every
      process maps over its own devices and they all form one axis.
    donate_state: let XLA reuse the buffers of argument 0.
  """
  return jax.pmap(fn, axis_name=AXIS_NAME, devices=_all_processes(devices),
                  donate_argnums=(0,) if donate_state else ())


def _all_processes(local_devices: Sequence[jax.Device]) -> list[jax.Device]:
  """The first `len(local_devices)` local devices of every process, in process order.

  `jax.pmap` wants this same global list on every process: given local devices only, each
  process would map over its own alone (no gradient averaging, device index 0 everywhere).
  """
  if jax.process_count() == 1:
    return list(local_devices)
  by_process = {}
  for device in jax.devices():
    by_process.setdefault(device.process_index, []).append(device)
  return [d for p in sorted(by_process) for d in by_process[p][:len(local_devices)]]


def mean_over_devices(tree: Any) -> Any:
  """Mean over the device axis; called inside a pmapped function."""
  return lax.pmean(tree, axis_name=AXIS_NAME)


def sum_over_devices(tree: Any) -> Any:
  """Sum over the device axis; called inside a pmapped function."""
  return lax.psum(tree, axis_name=AXIS_NAME)


def device_index() -> jax.Array:
  """This replica's index along the device axis (global across processes)."""
  return lax.axis_index(AXIS_NAME)


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
  """Copies a host pytree onto every device: leaves get a leading [num_devices] axis.

  The arrays carry the sharding that `pmap` gives its outputs (the device axis split over a
  mesh of all processes' devices). `flax.jax_utils.replicate` gives another one, so the step's
  second call, on its own outputs, missed the compilation cache and compiled it all again.
  """
  everywhere = _all_processes(devices)
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(everywhere), (AXIS_NAME,)),
                                        jax.sharding.PartitionSpec(AXIS_NAME))

  def put(leaf):
    leaf = np.asarray(leaf)[None]
    return jax.make_array_from_single_device_arrays(
        (len(everywhere),) + leaf.shape[1:], sharding, [jax.device_put(leaf, d) for d in devices])
  return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
  """Fetches this process's first replica of a replicated pytree to host numpy arrays."""
  # Reads the replica's buffer: `x[0]` compiles a gather per leaf shape (~5 s of a short run).
  # A copy, not a view: the device buffer is donated to the next step while Orbax may still
  # be saving this one in the background.
  return jax.tree.map(lambda x: np.array(x.addressable_data(0)).squeeze(0), tree)


def sum_over_processes(count: int) -> int:
  """The sum of every process's `count` (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return count
  return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def sync_processes(name: str) -> None:
  """Waits until every process has come here (a barrier named `name`); no-op on one."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def shard(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
  """Reshapes every array [B, ...] of a host batch to [num_devices, B // num_devices, ...]."""
  return jax.tree.map(lambda x: x.reshape((num_devices, -1) + x.shape[1:]), batch)


def prefetch_to_device(batches: Iterator[dict[str, np.ndarray]], size: int,
                       devices: Sequence[jax.Device]) -> Iterator[Any]:
  """Shards host batches over `devices` and keeps `size` of them in flight on the devices."""
  sharded = (shard(batch, len(devices)) for batch in batches)
  if size <= 0:
    return sharded
  return flax.jax_utils.prefetch_to_device(sharded, size, devices)
