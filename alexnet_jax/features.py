"""fc7 features of a trained AlexNet, stored per split, and nearest neighbours among them.

The paper's section 6.1 (Figure 4, right) compares images by "the feature activations induced
at the last, 4096-dimensional hidden layer": fc7 after its ReLU, the vector fc8 reads. They are
taken from the model's own forward pass (flax's `capture_intermediates`), so the model and its
logits stay as they are. Every device computation goes through a `parallel.DataParallel`
(`parallel.on_this_host`), so a model trained under any parallelism runs here.

`split_features` computes them for a whole split once, through the evaluation's input pipeline
(centre crop, the config's preprocessing) in device batches, and stores them in
WORKDIR/features/fc7_<split>_<digest of the params>/; a later call with the same weights and
config reads them back. `nearest` finds each query's k nearest rows: candidates by matrix
products (squared distances |q-c|^2 - 2 (q-c).(x-c) + |x-c|^2, centred on the queries' mean c),
the bank streamed through the devices in batches, each device keeping the best of its slice;
then the candidates' distances computed directly, in float64, and ranked by them.
"""

from collections.abc import Callable
import functools
import hashlib
import json
import os
import time
from typing import Any, NamedTuple
import uuid

from absl import logging
from etils import epath
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax import normalize
from alexnet_jax import parallel
from alexnet_jax.train_state import TrainState

DIRECTORY = 'features'
# Bank rows per search step, split over the devices: enough that dispatch is not the cost.
_SEARCH_ROWS = 8192
# Candidates beyond k that the matrix-product search keeps for the direct re-ranking.
_EXTRA_CANDIDATES = 16
_PROGRESS_SECONDS = 10.0


class Bank(NamedTuple):
  """A split's fc7 features.

  features: float32 [N, 4096]; row i is the example at positions[i].
  labels: int32 [N].
  positions: int64 [N], each example's index in the split's canonical order (undecodable
    files are left out, so N may be smaller than the split): what fetches it alone
    (`neighbours.split_examples`).
  """
  features: np.ndarray
  labels: np.ndarray
  positions: np.ndarray


def _fc7(apply_fn: Callable[..., Any], normalization: normalize.Normalization, params: Any,
         batch: dict[str, jax.Array]) -> jax.Array:
  """fc7's activations after its ReLU: a batch of b centre crops -> float32 [b, 4096] (per
  device); batch as `input_pipeline.create_eval_iterator` makes it (crops=1)."""
  _, state = apply_fn({'params': params}, normalization(batch), train=False,
                      mutable=['intermediates'],
                      capture_intermediates=lambda module, _: module.name == 'fc7')
  (pre_activation,) = state['intermediates']['fc7']['__call__']
  return nn.relu(pre_activation).astype(jnp.float32)


def _gathered(fn: Callable[..., jax.Array], state: Any, batch: Any) -> jax.Array:
  """`fn(state, batch)` [b, ...] of every device's batch, joined: [B, ...] on each device
  (so that every `DataParallel` returns it whole)."""
  return lax.all_gather(fn(state, batch), parallel.AXIS_NAME, tiled=True)


def per_example(fn: Callable[[Any, dict[str, jax.Array]], jax.Array], state: Any,
                data_parallel: parallel.DataParallel
                ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
  """A host function running `fn(state, batch) -> [b, ...]` (per device, row i of the output
  from example i) over the devices of `data_parallel`: a host batch of any size B -> [B, ...]
  (numpy). The batch is padded to a multiple of the devices and the padding dropped."""
  mapped = data_parallel.map(functools.partial(_gathered, fn))
  on_devices = data_parallel.put_state(state)
  multiple = len(data_parallel.devices)

  def run(batch: dict[str, np.ndarray]) -> np.ndarray:
    count = len(next(iter(batch.values())))
    padded = {name: _pad_rows(array, multiple) for name, array in batch.items()}
    return data_parallel.get(mapped(on_devices, data_parallel.put_batch(padded)))[:count]
  return run


def features_fn(state: TrainState, data_parallel: parallel.DataParallel,
                normalization: normalize.Normalization
                ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
  """A function: n centre crops (`preprocessing.eval_image`'s arrays, stacked: 'image' uint8
  [n, S, S, C], ...) -> their fc7 float32 [n, 4096] (numpy)."""
  return per_example(functools.partial(_fc7, state.apply_fn, normalization), state.params,
                     data_parallel)


def _pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
  """`array` [n, ...] with zero rows appended up to a multiple of `multiple`."""
  missing = -len(array) % multiple
  return np.concatenate([array, np.zeros((missing,) + array.shape[1:], array.dtype)])


def _bank_files(directory: epath.Path) -> dict[str, epath.Path]:
  """Where each array of a `Bank` is stored: directory/<field>.npy."""
  return {name: directory / f'{name}.npy' for name in Bank._fields}


def _load(path: epath.Path, mmap: bool = False) -> np.ndarray:
  """A .npy file; memory-mapped if asked and local (a remote one is read whole)."""
  if mmap and os.path.isfile(os.fspath(path)):
    return np.load(os.fspath(path), mmap_mode='r')
  with path.open('rb') as f:
    return np.load(f)


def _read_bank(directory: epath.Path) -> Bank:
  """A stored bank, its features memory-mapped (on a local file system)."""
  files = _bank_files(directory)
  labels, positions = _load(files['labels']), _load(files['positions'])
  # The features file has a row for every example of the split; the decodable come first.
  features = _load(files['features'], mmap=True)[:len(positions)]
  return Bank(features, labels, positions)


def params_digest(params: Any) -> str:
  """16 hex digits of a SHA-256 over the params' names, shapes, dtypes and bytes: the same
  weights give the same digest, whatever file or checkpoint they came from."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)} {leaf.shape} {leaf.dtype};'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()[:16]


def compute_split(config: ml_collections.ConfigDict, state: TrainState, split: str,
                  directory: epath.PathLike) -> Bank:
  """fc7 features of every decodable example of `split`, through the evaluation pipeline.

  Runs as `config` says (from `parallel.on_this_host`) in batches of config.eval_batch_size,
  logging its progress; one process reads the whole split. The features are written to
  directory/features.npy as they come (so a split larger than memory is fine), the labels
  and positions beside them (see `Bank`).
  """
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.eval_split, config.steps_per_eval, config.cache = split, -1, False
  data_parallel = parallel.for_config(config)
  parallel.per_device_batch_size(config.eval_batch_size, len(data_parallel.devices),
                                 'eval_batch_size')
  features = features_fn(state, data_parallel, normalize.for_config(config))
  total = input_pipeline.get_dataset_info(config).num_eval_examples
  files = _bank_files(epath.Path(directory))
  done, labels, positions = 0, [], []
  start = last_log = time.time()
  batches = input_pipeline.create_eval_iterator(config, crops=1, process_index=0,
                                                process_count=1)
  with files['features'].open('wb') as stored:
    for k, batch in enumerate(batches):
      mask = batch['mask']
      rows = features(batch)[mask]
      if not k:  # The .npy header: a row for every example of the split, zeros after `done`.
        np.lib.format.write_array_header_1_0(stored, {
            'descr': np.lib.format.dtype_to_descr(rows.dtype), 'fortran_order': False,
            'shape': (total, rows.shape[1])})
      stored.write(rows.tobytes())
      done += len(rows)
      labels.append(batch['label'][mask])
      positions.append(k * config.eval_batch_size + np.flatnonzero(mask))
      if time.time() - last_log > _PROGRESS_SECONDS:
        last_log = time.time()
        logging.info('fc7 features of %s: %d / %d images, %.0f s', split,
                     min((k + 1) * config.eval_batch_size, total), total, last_log - start)
    stored.write(np.zeros((total - done, rows.shape[1]), rows.dtype).tobytes())
  for name, array in (('labels', np.concatenate(labels)),
                      ('positions', np.concatenate(positions))):
    with files[name].open('wb') as f:
      np.save(f, array)
  logging.info('fc7 features of the %d %s images in %.1f s.', done, split, time.time() - start)
  return _read_bank(epath.Path(directory))


def split_features(config: ml_collections.ConfigDict, state: TrainState,
                   workdir: epath.PathLike, split: str) -> Bank:
  """`split`'s fc7 bank: read from WORKDIR/features/ if computed there before, else computed
  (`compute_split`) and stored there.

  Concurrent calls are safe: each computes into a directory of its own and renames it into
  place, and a call that finds the bank stored meanwhile reads that one.

  Args:
    config: the model's config, from `parallel.on_this_host`.
    state: the model.
    workdir: where the bank is kept: WORKDIR/features/fc7_<split>_<`params_digest`>/.
    split: the split, e.g. config.train_split.
  Returns:
    The bank, its features memory-mapped (on a local file system).
  """
  weights = params_digest(state.params)
  directory = epath.Path(workdir) / DIRECTORY / f'fc7_{split}_{weights}'
  about = {'split': split, 'weights': weights,
           'config': json.loads(config.to_json_best_effort())}
  stored = _stored_bank(directory, about)
  if stored:
    return stored
  # Written beside and renamed: a bank cut short by a crash is never read back.
  partial = directory.with_name(f'{directory.name}.partial-{uuid.uuid4().hex}')
  partial.mkdir(parents=True)
  try:
    compute_split(config, state, split, partial)
    (partial / 'about.json').write_text(json.dumps(about, indent=1))
    stored = _stored_bank(directory, about)  # Another call's, finished meanwhile.
    if not stored:
      _replace(partial, directory)
      logging.info('Stored them in %s.', directory)
      return _read_bank(directory)
  finally:
    if partial.exists():
      partial.rmtree()
  return stored


def _stored_bank(directory: epath.Path, about: dict[str, Any]) -> Bank | None:
  """The bank in `directory` if one is stored there for `about`, else None."""
  about_file = directory / 'about.json'
  if about_file.is_file() and json.loads(about_file.read_text()) == about:
    logging.info('Reading the fc7 features of %s from %s.', about['split'], directory)
    return _read_bank(directory)
  return None


def _replace(new: epath.Path, directory: epath.Path) -> None:
  """Renames `new` to `directory`; a bank there (of another config) is moved aside first."""
  if directory.exists():
    old = directory.with_name(f'{directory.name}.old-{uuid.uuid4().hex}')
    directory.rename(old)
    old.rmtree()
  new.rename(directory)


def _nearest_in_slice(k: int, queries: dict[str, jax.Array],
                      bank: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The k smallest squared distances (by matrix products) from each query to this device's
  rows, and the rows' indices in the device batch, gathered from every device.

  Args:
    k: candidates per device.
    queries: 'centred' [Q, F], the queries minus 'centre' [F].
    bank: 'rows' [r, F] (r = the device's share) and 'valid' bool [r].
  Returns:
    ([D, Q, k], [D, Q, k]) over the D devices of the batch axis, in device order.
  """
  highest = lax.Precision.HIGHEST  # No TF32 or bf16 passes on GPUs.
  q, rows = queries['centred'], bank['rows'] - queries['centre']
  squared = (jnp.sum(q * q, axis=1)[:, None] - 2 * jnp.matmul(q, rows.T, precision=highest)
             + jnp.sum(rows * rows, axis=1)[None, :])
  negative, index = lax.top_k(jnp.where(bank['valid'][None, :], -squared, -jnp.inf), k)
  index = index + parallel.device_index() * rows.shape[0]
  return lax.all_gather((-negative, index), parallel.AXIS_NAME)


def nearest(bank: np.ndarray, queries: np.ndarray, k: int,
            data_parallel: parallel.DataParallel) -> tuple[np.ndarray, np.ndarray]:
  """The k rows of `bank` closest to each query in Euclidean distance.

  Candidates come from the devices: the k + `_EXTRA_CANDIDATES` smallest squared distances
  by matrix products, centred on the queries' mean (which keeps the norms that cancel small
  where the queries lie near the bank). Their distances are then computed directly on the
  host in float64, and they are ranked by those: each distance is the true one rounded to
  float32. A row is missed only where the matrix products' rounding moves it past that many
  candidates.

  Args:
    bank: [N, F] (may be memory-mapped).
    queries: [Q, F].
    k: neighbours per query, 1 <= k <= N.
    data_parallel: the devices to search on (any parallelism; the bank rows are split over
      the batch axis).
  Returns:
    distances float32 [Q, k] (ascending) and row indices int64 [Q, k] into `bank`; equal
    distances are ordered by index.
  """
  if not 1 <= k <= len(bank):
    raise ValueError(f'k={k} neighbours asked of a bank of {len(bank)} rows.')
  queries = np.asarray(queries, np.float32)
  count = min(k + _EXTRA_CANDIDATES, len(bank))
  devices = len(data_parallel.devices)
  rows = -(-min(_SEARCH_ROWS, len(bank)) // devices) * devices
  search = data_parallel.map(functools.partial(_nearest_in_slice, min(count, rows // devices)))
  centre = queries.mean(axis=0)
  on_devices = data_parallel.put_state({'centred': queries - centre, 'centre': centre})
  best_d = np.full((len(queries), 0), np.inf, np.float32)
  best_i = np.zeros((len(queries), 0), np.int64)
  for start in range(0, len(bank), rows):
    chunk = np.asarray(bank[start:start + rows], np.float32)
    batch = {'rows': _pad_rows(chunk, rows), 'valid': _pad_rows(np.ones(len(chunk), bool), rows)}
    d, i = data_parallel.get(search(on_devices, data_parallel.put_batch(batch)))
    # [devices, Q, k'] -> [Q, devices * k'], batch indices -> bank rows.
    best_d = np.concatenate([best_d, d.transpose(1, 0, 2).reshape(len(queries), -1)], axis=1)
    best_i = np.concatenate([best_i, start + i.transpose(1, 0, 2).reshape(len(queries), -1)],
                            axis=1)
    best_d, best_i = _first(best_d, best_i, count)
  return _first(_distances(bank, queries, best_i), best_i, k)


def _first(distances: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k smallest distances [Q, >= k] of each query and their rows [Q, >= k], ties by row."""
  order = np.lexsort((rows, distances), axis=-1)[:, :k]
  return np.take_along_axis(distances, order, axis=1), np.take_along_axis(rows, order, axis=1)


def _distances(bank: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """|query - bank[row]| of each query [Q, F] and its rows [Q, c], in float64, rounded to
  float32 [Q, c]."""
  unique, inverse = np.unique(rows, return_inverse=True)
  chosen = np.asarray(bank[unique], np.float64)[inverse.reshape(rows.shape)]
  difference = chosen - queries[:, None].astype(np.float64)
  return np.sqrt(np.sum(difference * difference, axis=-1)).astype(np.float32)
