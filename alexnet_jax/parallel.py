"""Everything device-parallel, in one place: pmap, mesh, batch sharding, replication, prefetch.

The training step is data-parallel: every device holds the train state and a slice of the
global batch, and the gradients are averaged with `lax.pmean` over the axis `AXIS_NAME`. Two
ways run it (`config.parallelism`, see `create`): `jax.pmap` (a replica per device, host
batches reshaped to [devices, ...]) and `jax.jit` over a `Mesh` (global arrays with a
`NamedSharding`, host batches joined by `jax.make_array_from_process_local_data`). A third,
'model', adds the paper's model parallelism on a second mesh axis `MODEL_AXIS`: each device
holds 1/N of every layer's kernels (docs/parallelism.md). The model, the steps and the loop
see only a `DataParallel`, so they do not change with the choice (the model only picks its
convolutions' form, `models.AlexNet.ops`).
"""

import collections
from collections.abc import Callable, Iterator, Sequence
import functools
import itertools
from typing import Any

from absl import logging
import flax.jax_utils
import jax
from jax import lax
from jax.experimental import multihost_utils
import numpy as np

AXIS_NAME = 'batch'
# The mesh axis of `config.parallelism='model'` that splits every layer by output features.
MODEL_AXIS = 'model'


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
  """Mean over the device axis; called inside a pmapped function.

  Under 'model', the layers' leaves (the gradients) are first pinned to their parameters'
  split (`_ModelParallel`): left to itself, XLA's partitioner computed fc8's kernel gradient
  split along its inputs and moved half of it between devices (an all-to-all) to match.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if MODEL_AXIS not in mesh.axis_names:
    return lax.pmean(tree, axis_name=AXIS_NAME)
  tree = jax.tree_util.tree_map_with_path(
      lambda path, leaf: lax.with_sharding_constraint(leaf, _model_split(path, leaf.shape)),
      tree)
  # A mean over one device is the identity, and after the constraint XLA rejects it (jax
  # 0.10.2: "Cross-partition allreduce must be in (partial) manual partitioning mode").
  return tree if mesh.shape[AXIS_NAME] == 1 else lax.pmean(tree, axis_name=AXIS_NAME)


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


def process_0_value(flag: bool) -> bool:
  """Process 0's `flag`, on every process (all must call this at the same point)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.array(flag)))


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


# --------------------------------------- the two data-parallel ways, and model parallelism
PARALLELISMS = ('pmap', 'mesh', 'model')


class DataParallel:
  """How the train and eval steps meet the devices: `pmap`, or `jit` over a `Mesh`.

  The steps are per-device functions (`steps.train_step`, `steps.eval_step`) whose
  collectives name the axis `AXIS_NAME`, so both ways run them unchanged. What the loop holds
  between steps ("on devices") is opaque to it: it only passes it back here.
  """

  def __init__(self, devices: Sequence[jax.Device]):
    self.devices = list(devices)

  def map(self, fn: Callable[..., Any], donate_state: bool = False) -> Callable[..., Any]:
    """`fn(state, batch) -> out` over all processes' devices, batch split, state replicated."""
    raise NotImplementedError

  def put_state(self, tree: Any) -> Any:
    """A host pytree (the same on every process) onto the devices: replicated over the
    data-parallel axis (and, under 'model', its layers' parameters split over `MODEL_AXIS`)."""
    raise NotImplementedError

  def get(self, tree: Any) -> Any:
    """Host numpy copies of a pytree that `put_state` or the step put on the devices (state,
    metrics): the whole arrays, whatever their sharding."""
    raise NotImplementedError

  def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
    """This process's host batch [B / processes, ...] onto its devices, split over them."""
    raise NotImplementedError

  def prefetch(self, batches: Iterator[dict[str, np.ndarray]], size: int) -> Iterator[Any]:
    """`put_batch` of each batch, `size` of them in flight ahead of the step (0: none)."""
    put = map(self.put_batch, batches)
    if size <= 0:
      return put
    return _ahead(put, size)


def _ahead(items: Iterator[Any], size: int) -> Iterator[Any]:
  """Yields from `items`, keeping `size` more already started (device transfers are async)."""
  queue = collections.deque(itertools.islice(items, size))
  for item in items:
    queue.append(item)
    yield queue.popleft()
  yield from queue


class _Pmap(DataParallel):
  """`jax.pmap`: the state carries a leading [devices] axis, one replica per device."""

  def map(self, fn, donate_state=False):
    return pmap(fn, self.devices, donate_state)

  def put_state(self, tree):
    return replicate(tree, self.devices)

  def get(self, tree):
    return unreplicate(tree)

  def put_batch(self, batch):
    return shard(batch, len(self.devices))

  def prefetch(self, batches, size):
    return prefetch_to_device(batches, size, self.devices)


class _Mesh(DataParallel):
  """`jax.jit` over a `Mesh` with one axis of all processes' devices: global arrays with a
  `NamedSharding`, the state replicated and the batch split along the axis.

  The step runs under `jax.shard_map` over that axis, so each device computes what it does
  under pmap and the same collectives average the gradients.

  Args:
    devices: this process's devices.
    mesh_shape, axis_names: how all processes' devices (in process order) form the mesh.
  """

  def __init__(self, devices, mesh_shape: tuple[int, ...] = (-1,),
               axis_names: tuple[str, ...] = (AXIS_NAME,)):
    super().__init__(devices)
    self.mesh = jax.sharding.Mesh(np.array(_all_processes(devices)).reshape(mesh_shape),
                                  axis_names)
    self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._split = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(AXIS_NAME))

  def map(self, fn, donate_state=False):
    spec = jax.sharding.PartitionSpec
    # Outputs are replicated by the step's own pmean/psum; check_vma cannot see that through
    # the custom_vjp ops (LRN, fast_ops' max-pool and partitionable convolutions), so it is
    # off. Manual over the batch axis only: any other axis (`MODEL_AXIS`) is left to XLA's
    # partitioner.
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(spec(), spec(AXIS_NAME)),
                           out_specs=spec(), axis_names={AXIS_NAME}, check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())

  def put_state(self, tree):
    def put(path, leaf):
      leaf = np.asarray(leaf)
      return jax.make_array_from_callback(leaf.shape, self._state_sharding(path, leaf.shape),
                                          lambda index: leaf[index])
    return jax.tree_util.tree_map_with_path(put, tree)

  def _state_sharding(self, path: tuple[Any, ...], shape: tuple[int, ...]
                      ) -> jax.sharding.NamedSharding:
    """The sharding of the state leaf at `path` (a key path) of `shape`: replicated."""
    del path, shape
    return self._replicated

  def get(self, tree):
    def fetch(x):
      # From this process's shards: replicated, or split over the 'model' axis (which lies
      # within each host), they hold every part. A copy: the buffer is donated to the next
      # step while Orbax may still be saving this one (see `unreplicate`).
      parts = {_slices(shard.index): shard for shard in x.addressable_shards}
      if set(map(_slices, x.sharding.devices_indices_map(x.shape).values())) - parts.keys():
        raise ValueError(f'An array of shape {x.shape} ({x.sharding.spec}) has parts on other '
                         'hosts only; the model axis must lie within each host.')
      host = np.empty(x.shape, x.dtype)
      for shard in parts.values():
        host[shard.index] = np.asarray(shard.data)
      return host
    return jax.tree.map(fetch, tree)

  def put_batch(self, batch):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self._split, x), batch)


class _ModelParallel(_Mesh):
  """The paper's model parallelism (section 3.2) beside data parallelism: `jax.jit` over a
  `Mesh` of [devices / N, N] devices with axes (`AXIS_NAME`, `MODEL_AXIS`), N =
  `config.model_parallel_size`.

  Every kernel and bias, and the optimizer state that mirrors them, is split along its last
  (output-feature) axis over `MODEL_AXIS`: each of the N devices of a mesh row holds 1/N of
  every layer. Everything else in the state is replicated; the batch is split over
  `AXIS_NAME` and replicated over `MODEL_AXIS`. The step runs under `jax.shard_map` manual over
  `AXIS_NAME` only, so its collectives stay the data-parallel ones, and XLA's SPMD partitioner
  splits each layer over `MODEL_AXIS` from the parameters' shardings: a device computes the
  output features whose kernels it holds, and the activations move where a layer needs all of
  its input (docs/parallelism.md).
  """

  def __init__(self, devices, model_parallel_size: int):
    if model_parallel_size < 1 or len(devices) % model_parallel_size:
      raise ValueError(
          f'config.model_parallel_size={model_parallel_size} must be a positive divisor of '
          f'the {len(devices)} devices of each host: each network is split over that many '
          f"devices of one host (the 'model' axis), and the 'batch' axis is the rest. With one "
          "device per host, use --config.parallelism=pmap or mesh.")
    super().__init__(devices, (-1, model_parallel_size), (AXIS_NAME, MODEL_AXIS))

  def _state_sharding(self, path, shape):
    size = self.mesh.shape[MODEL_AXIS]
    if _is_layer_parameter(path) and shape[-1] % size:
      raise ValueError(
          f'config.model_parallel_size={size} does not divide the {shape[-1]} output features '
          f'of {jax.tree_util.keystr(path)}; choose a size that divides every layer width '
          '(and num_classes).')
    return jax.sharding.NamedSharding(self.mesh, _model_split(path, shape))


def _slices(index: tuple[slice, ...]) -> tuple[tuple[int | None, int | None], ...]:
  """A shard's index as a hashable key (slices are not hashable before Python 3.12)."""
  return tuple((part.start, part.stop) for part in index)


def _is_layer_parameter(path: tuple[Any, ...]) -> bool:
  """Whether a key path names a kernel or bias (of the params, or of a state mirroring them)."""
  last = path[-1] if path else None
  return isinstance(last, jax.tree_util.DictKey) and last.key in ('kernel', 'bias')


def _model_split(path: tuple[Any, ...], shape: tuple[int, ...]) -> jax.sharding.PartitionSpec:
  """A layer's kernel or bias split along its last (output-feature) axis; anything else whole."""
  if not _is_layer_parameter(path):
    return jax.sharding.PartitionSpec()
  return jax.sharding.PartitionSpec(*[None] * (len(shape) - 1), MODEL_AXIS)


def create(parallelism: str, devices: Sequence[jax.Device],
           model_parallel_size: int = 2) -> DataParallel:
  """The `DataParallel` that `config.parallelism` names, over `devices` of every process.

  model_parallel_size: `config.model_parallel_size`, read by 'model' only (2: the paper's).
  """
  kinds = {'pmap': _Pmap, 'mesh': _Mesh,
           'model': functools.partial(_ModelParallel, model_parallel_size=model_parallel_size)}
  if parallelism not in kinds:
    raise ValueError(f'config.parallelism={parallelism!r}; choose one of {PARALLELISMS}.')
  return kinds[parallelism](devices)


def for_config(config: Any) -> DataParallel:
  """The `DataParallel` that `config.parallelism` names, on `config.num_devices` local devices
  (`select_devices`) of every process."""
  return create(config.parallelism, select_devices(config.num_devices),
                config.model_parallel_size)


def on_this_host(config: Any) -> Any:
  """The config a tool (evaluate, predict, features, neighbours) runs a trained model with here.

  The run's own `config.parallelism` on its `config.num_devices` where this host can run them;
  else all local devices, and 'mesh' (data-parallel, the whole model on each device) where
  they cannot form the 'model' mesh (fewer devices than `config.model_parallel_size`, or not
  a multiple of it): one warning line says so. The params are the same tree under every
  parallelism, so any checkpoint restores into any of them. `train_state.model_ops` resolves the
  model's ops 'auto' from the returned parallelism (the same numbers to float rounding).

  Args:
    config: the trained model's config (not changed).
  Returns:
    A copy with `parallelism` and `num_devices` (0: all) set to what this host runs.
  """
  config = config.copy_and_resolve_references()
  available = len(jax.local_devices())
  if config.num_devices > available:
    logging.warning('The run used %d devices; this host has %d: running on them.',
                    config.num_devices, available)
    config.num_devices = 0
  count = config.num_devices or available
  if config.parallelism == 'model' and count % config.model_parallel_size:
    logging.warning("The run split its model over %d devices (parallelism='model'); %d "
                    "here cannot: running it data-parallel (parallelism='mesh').",
                    config.model_parallel_size, count)
    config.parallelism = 'mesh'
  return config
