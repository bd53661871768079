"""fc7 features of a trained AlexNet, stored per split, and exact nearest neighbours among them.

The paper's section 6.1 (Figure 4, right) compares images by "the feature activations induced
at the last, 4096-dimensional hidden layer": fc7 after its ReLU, the vector fc8 reads. They are
taken from the model's own forward pass (flax's `capture_intermediates`), so the model and its
logits stay as they are.

`split_features` computes them for a whole split once, through the evaluation's input pipeline
(centre crop, the config's preprocessing) in `parallel`'s device batches, and stores them in
WORKDIR/features/fc7_<split>_<weights>/; a later call with the same weights and config reads
them back. `nearest` searches them exactly: squared distances |q|^2 - 2 q.x + |x|^2 by matrix
products, the bank streamed through the devices in batches, each device keeping the k best of
its slice, merged on the host.
"""

from collections.abc import Callable
import functools
import json
import pathlib
import shutil
import time
from typing import Any, NamedTuple

from absl import logging
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax import normalize
from alexnet_jax import parallel
from alexnet_jax import train

DIRECTORY = 'features'
# Bank rows per search step, split over the devices: enough that dispatch is not the cost.
_SEARCH_ROWS = 8192
_PROGRESS_SECONDS = 10.0


class Bank(NamedTuple):
  """A split's fc7 features.

  features: float32 [N, 4096]; row i is the example at positions[i].
  labels: int32 [N].
  positions: int64 [N], each example's index in the split's canonical order (undecodable
    files are left out, so N may be smaller than the split).
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


def _features_fn(state: train.TrainState, devices: list[jax.Device],
                 normalization: normalize.Normalization
                 ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
  """A function: a batch of B centre crops ('image' uint8 [B, S, S, C], ...), B a multiple of
  len(devices) -> fc7 [B, 4096] (numpy)."""
  p_fc7 = parallel.pmap(functools.partial(_fc7, state.apply_fn, normalization), devices)
  params = parallel.replicate(state.params, devices)

  def features(batch: dict[str, np.ndarray]) -> np.ndarray:
    out = p_fc7(params, parallel.shard(batch, len(devices)))
    return np.asarray(out).reshape(batch['image'].shape[0], -1)
  return features


def _pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
  """`array` [n, ...] with zero rows appended up to a multiple of `multiple`."""
  missing = -len(array) % multiple
  return np.concatenate([array, np.zeros((missing,) + array.shape[1:], array.dtype)])


def image_features(state: train.TrainState, examples: dict[str, np.ndarray],
                   devices: list[jax.Device],
                   normalization: normalize.Normalization) -> np.ndarray:
  """fc7 features of n centre crops (`preprocessing.eval_image`'s arrays, stacked: 'image'
  uint8 [n, S, S, C], ...) -> float32 [n, 4096]."""
  count = len(examples['image'])
  padded = {name: _pad_rows(array, len(devices)) for name, array in examples.items()}
  return _features_fn(state, devices, normalization)(padded)[:count]


def _bank_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Where each array of a `Bank` is stored: directory/<field>.npy."""
  return {name: directory / f'{name}.npy' for name in Bank._fields}


def _read_bank(directory: pathlib.Path) -> Bank:
  """A stored bank, its features memory-mapped."""
  files = _bank_files(directory)
  labels, positions = np.load(files['labels']), np.load(files['positions'])
  # The features file has a row for every example of the split; the decodable come first.
  features = np.load(files['features'], mmap_mode='r')[:len(positions)]
  return Bank(features, labels, positions)


def compute_split(config: ml_collections.ConfigDict, state: train.TrainState, split: str,
                  directory: pathlib.Path) -> Bank:
  """fc7 features of every decodable example of `split`, through the evaluation pipeline.

  Runs on config.num_devices local devices in batches of config.eval_batch_size, logging its
  progress; one process reads the whole split. The features go straight into
  directory/features.npy (memory-mapped, so a split larger than memory is fine), the labels
  and positions beside them (see `Bank`).
  """
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.eval_split, config.steps_per_eval, config.cache = split, -1, False
  devices = parallel.select_devices(config.num_devices)
  parallel.per_device_batch_size(config.eval_batch_size, len(devices), 'eval_batch_size')
  features = _features_fn(state, devices, normalize.for_config(config))
  total = input_pipeline.get_dataset_info(config).num_eval_examples
  files = _bank_files(directory)
  stored, done, labels, positions = None, 0, [], []
  start = last_log = time.time()
  batches = input_pipeline.create_eval_iterator(config, crops=1, process_index=0,
                                                process_count=1)
  for k, batch in enumerate(batches):
    mask = batch['mask']
    rows = features(batch)[mask]
    if stored is None:
      stored = np.lib.format.open_memmap(files['features'], 'w+', np.float32,
                                         (total, rows.shape[1]))
    stored[done:done + len(rows)] = rows
    done += len(rows)
    labels.append(batch['label'][mask])
    positions.append(k * config.eval_batch_size + np.flatnonzero(mask))
    if time.time() - last_log > _PROGRESS_SECONDS:
      last_log = time.time()
      logging.info('fc7 features of %s: %d / %d images, %.0f s', split,
                   min((k + 1) * config.eval_batch_size, total), total, last_log - start)
  stored.flush()
  np.save(files['labels'], np.concatenate(labels))
  np.save(files['positions'], np.concatenate(positions))
  logging.info('fc7 features of the %d %s images in %.1f s.', done, split, time.time() - start)
  return _read_bank(directory)


def split_features(config: ml_collections.ConfigDict, state: train.TrainState,
                   workdir: str | pathlib.Path, split: str, weights: str) -> Bank:
  """`split`'s fc7 bank: read from WORKDIR/features/ if computed there before, else computed
  (`compute_split`) and stored there.

  Args:
    config: the model's config.
    state: the model (its params are `weights`).
    workdir: where the bank is kept (WORKDIR/features/fc7_<split>_<weights>/).
    split: the split, e.g. config.train_split.
    weights: names the params, e.g. 'step1029' or a weights file's name.
  Returns:
    The bank, its features memory-mapped.
  """
  directory = pathlib.Path(workdir) / DIRECTORY / f'fc7_{split}_{weights}'
  about = {'split': split, 'weights': weights,
           'config': json.loads(config.to_json_best_effort())}
  about_file = directory / 'about.json'
  if about_file.is_file() and json.loads(about_file.read_text()) == about:
    logging.info('Reading the fc7 features of %s from %s.', split, directory)
    return _read_bank(directory)
  # Written beside and renamed: a bank cut short by a crash is never read back.
  partial = directory.with_name(directory.name + '.partial')
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  compute_split(config, state, split, partial)
  (partial / 'about.json').write_text(json.dumps(about, indent=1))
  shutil.rmtree(directory, ignore_errors=True)
  partial.rename(directory)
  logging.info('Stored them in %s.', directory)
  return _read_bank(directory)


def _nearest_in_slice(queries: jax.Array, rows: jax.Array, valid: jax.Array,
                      k: int) -> tuple[jax.Array, jax.Array]:
  """The k smallest squared distances from each query to this device's rows, and their
  indices in the slice: queries [Q, F], rows [r, F], valid bool [r] -> ([Q, k], [Q, k])."""
  highest = lax.Precision.HIGHEST  # No TF32 or bf16 passes on GPUs: the search is exact.
  squared = (jnp.sum(queries * queries, axis=1)[:, None]
             - 2 * jnp.matmul(queries, rows.T, precision=highest)
             + jnp.sum(rows * rows, axis=1)[None, :])
  negative, index = lax.top_k(jnp.where(valid[None, :], -squared, -jnp.inf), k)
  return -negative, index


def nearest(bank: np.ndarray, queries: np.ndarray, k: int,
            devices: list[jax.Device]) -> tuple[np.ndarray, np.ndarray]:
  """The k rows of `bank` closest to each query in Euclidean distance, exactly.

  Args:
    bank: [N, F] (may be memory-mapped).
    queries: [Q, F].
    k: neighbours per query, 1 <= k <= N.
    devices: from `parallel.select_devices`.
  Returns:
    distances float32 [Q, k] (ascending) and row indices int64 [Q, k] into `bank`; equal
    distances are ordered by index.
  """
  if not 1 <= k <= len(bank):
    raise ValueError(f'k={k} neighbours asked of a bank of {len(bank)} rows.')
  rows = -(-min(_SEARCH_ROWS, len(bank)) // len(devices)) * len(devices)
  per_device = rows // len(devices)
  p_nearest = parallel.pmap(functools.partial(_nearest_in_slice, k=min(k, per_device)),
                            devices)
  replicated = parallel.replicate(np.asarray(queries, np.float32), devices)
  best_d = np.full((len(queries), 0), np.inf, np.float32)
  best_i = np.zeros((len(queries), 0), np.int64)
  for start in range(0, len(bank), rows):
    chunk = np.asarray(bank[start:start + rows], np.float32)
    valid = _pad_rows(np.ones(len(chunk), bool), rows)
    sharded = parallel.shard({'rows': _pad_rows(chunk, rows), 'valid': valid}, len(devices))
    d, i = (np.asarray(x) for x in p_nearest(replicated, sharded['rows'], sharded['valid']))
    # [devices, Q, k'] -> [Q, devices * k'], slice indices -> bank rows.
    i = start + per_device * np.arange(len(devices))[:, None, None] + i
    best_d = np.concatenate([best_d, d.transpose(1, 0, 2).reshape(len(queries), -1)], axis=1)
    best_i = np.concatenate([best_i, i.transpose(1, 0, 2).reshape(len(queries), -1)], axis=1)
    order = np.lexsort((best_i, best_d), axis=-1)[:, :k]
    best_d = np.take_along_axis(best_d, order, axis=1)
    best_i = np.take_along_axis(best_i, order, axis=1)
  return np.sqrt(np.maximum(best_d, 0)), best_i
