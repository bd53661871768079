"""tf.data input pipelines: the endless training stream and one pass over the evaluation split.

The training loop calls create_train_iterator / create_eval_iterator and gets numpy batches
of uint8 pixels with the random choices the device still applies (`alexnet_jax.normalize`
turns them into the network's input inside the step, with `pixel_statistics`' constants).
Nothing here imports JAX (data flows one way), and TensorFlow is kept off the GPUs.

Determinism and resuming: an epoch is num_train_examples // batch_size global batches (the
remainder is dropped). Epoch e reads the training split in an order seeded by (seed, e) and
augments the example at position i of the epoch with stateless random ops seeded by
(seed, e, i). Global step k's batch thus depends on (seed, k) alone, and a run restarted with
start_step=k yields exactly what an uninterrupted run yields from step k on; the steps before
are skipped as handles (paths, arrays, undecoded records), never as decoded images.

Several processes: process p of P makes the slice [p b, (p + 1) b) of every global batch
(b = batch_size / P). Where handles are paths or pixels in memory (folders, digits), every
process lists the whole epoch and keeps its slots, so the global batch does not depend on P.
Where handles are records that carry the images (TFDS, prepared shards), process p reads only
its share of the split (`data_sources.process_range`) and shuffles that with the epoch's seed:
one process sees what it always did, and P processes' batches depend on (seed, k, P).
Evaluation always reads per-process shares (the totals do not depend on the order).

Undecodable files: each is logged by name and counted in the iterator's `num_skipped`
(config.on_bad_image='skip'), or raises ValueError naming it ('raise'). A skipped training
example's slot takes a copy of another example of its batch, so batches stay the same size
and aligned with steps; a skipped evaluation example gets mask False, so the evaluation covers
the decodable examples only. Training decodes with a plain map, which is faster but fails a
whole batch on one bad file; it switches to decoding examples one by one from that batch on.
"""

import dataclasses
import itertools
import threading
from typing import Callable, Iterator, Optional

from absl import logging
import numpy as np
import tensorflow as tf

from alexnet_jax import config_checks
from alexnet_jax import data_sources
from alexnet_jax import preprocessing

# TensorFlow only feeds data here; it must not take GPU memory from JAX.
tf.config.set_visible_devices([], 'GPU')

# dataset='fake' has ImageNet's sizes.
FAKE_NUM_TRAIN_EXAMPLES = 1_281_167
FAKE_NUM_EVAL_EXAMPLES = 50_000

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training loop needs to know about a dataset."""
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  class_names: list[str]
  # Each process reads its own share of the records (`data_sources.Source.streamed`), so the
  # training batches depend on the process count.
  streamed: bool = False


def get_dataset_info(config) -> DatasetInfo:
  """Sizes and class names of config.dataset (config.train_split, config.eval_split).

  Raises:
    ValueError: the data are missing, or config.num_classes differs from the data's.
  """
  if config.dataset == 'fake':
    info = DatasetInfo(config.num_classes, FAKE_NUM_TRAIN_EXAMPLES, FAKE_NUM_EVAL_EXAMPLES,
                       [str(c) for c in range(config.num_classes)])
  else:
    source = data_sources.get_source(config)
    info = DatasetInfo(len(source.class_names), source.num_examples(config.train_split),
                       source.num_examples(config.eval_split), list(source.class_names),
                       source.streamed)
  config_checks.check_num_classes(config, info.num_classes)
  return info


class BatchIterator:
  """Iterator of numpy batches that logs and counts the examples whose file would not decode.

  Attributes:
    num_skipped: undecodable examples this iterator met so far (in this process).
  """

  def __init__(self, batches: Iterator[Batch], on_bad_image: str = 'skip', train: bool = True):
    self._batches = batches
    self._on_bad_image = on_bad_image
    self._train = train
    self.num_skipped = 0

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    batch = next(self._batches)
    if 'ok' not in batch:  # Synthetic data, or the fast map's (nothing to skip).
      return batch
    ok, keys = batch.pop('ok'), batch.pop('key')
    bad = ~ok & batch['mask'] if 'mask' in batch else ~ok  # Padding does not count.
    if bad.any():
      self._skip(batch, ok, [key.decode() for key in keys[bad]])
    return batch

  def _skip(self, batch: Batch, ok: np.ndarray, names: list[str]):
    if self._on_bad_image == 'raise':
      raise ValueError(f'Cannot decode image {names[0]} (corrupt or not an image); fix or '
                       "remove it, or set config.on_bad_image='skip' to skip such files.")
    for name in names:
      logging.warning('Skipping undecodable image %s', name)
    self.num_skipped += len(names)
    if not self._train:
      batch['mask'] = batch['mask'] & ok
      return
    good = np.flatnonzero(ok)
    if not good.size:
      raise ValueError(f'No image of a training batch decodes (e.g. {names[0]}); is the data '
                       'corrupt?')
    bad = np.flatnonzero(~ok)
    source = good[np.arange(len(bad)) % len(good)]
    for name in batch:  # The pixels, the label and the example's random choices.
      batch[name] = batch[name].copy()  # tf.data's arrays are read-only.
      batch[name][bad] = batch[name][source]


def create_train_iterator(config, start_step: int = 0, process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> BatchIterator:
  """The endless training stream from global step `start_step` on.

  Args:
    config: the run's config (see configs/imagenet.py).
    start_step: the global step of the first batch.
    process_index: this process (default 0); the trainer passes jax.process_index().
    process_count: the number of processes (default 1).

  Returns:
    An iterator of {'image': uint8 [b, S, S, ch], 'label': int32 [b]} plus the random
    choices `preprocessing.train_image` leaves to the device ('lighting' float32 [b, 3] when
    config.pca_lighting_std; 'offset' int32 [b, 2] and 'flip' bool [b] for a mean image),
    with b = config.batch_size // process_count, S = config.image_size and
    ch = config.input_channels; its num_skipped counts the undecodable files met.
  """
  index, count = _process(process_index, process_count)
  batch_size = _local_batch_size(config.batch_size, count, 'batch_size')
  if config.dataset == 'fake':
    batch = _fake_batch(config, batch_size)
    if config.pca_lighting_std:  # No shift, but the step compiles as it does for real data.
      batch['lighting'] = np.zeros((batch_size, 3), np.float32)
    return BatchIterator(dict(batch) for _ in itertools.count())
  source = data_sources.get_source(config)
  options = preprocessing_options(config, source.encoded, source.full_chroma_canvases)
  num_examples = source.num_examples(config.train_split)
  steps_per_epoch = num_examples // config.batch_size
  if not steps_per_epoch:
    raise ValueError(f'The {config.train_split!r} split has {num_examples} examples, fewer '
                     f'than one batch (config.batch_size={config.batch_size}).')

  def batches_from(step: int, careful: bool) -> Iterator[Batch]:
    first_epoch, first_step = divmod(step, steps_per_epoch)
    for epoch in itertools.count(first_epoch):
      skip = first_step * batch_size if epoch == first_epoch else 0
      ds = _train_epoch(config, source, options, epoch, skip, steps_per_epoch, index, count,
                        careful)
      yield from _numpy_batches(ds)

  return BatchIterator(_fall_back_to_careful(batches_from, start_step, config.on_bad_image),
                       config.on_bad_image, train=True)


# The errors a file that is missing, truncated or not an image raises in the map.
_FILE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.DataLossError)


def _fall_back_to_careful(batches_from: Callable[[int, bool], Iterator[Batch]], step: int,
                          on_bad_image: str) -> Iterator[Batch]:
  """Fast batches until a file fails one, then careful ones from that batch on.

  Yields batches_from(step, careful=False) until a batch fails, then
  batches_from(its step, careful=True). The fast map (_decode) cannot drop one example, so a
  bad file fails its whole batch; the careful one (_decode_carefully) skips it, at a cost of
  about 11% of the throughput, paid only once a bad file has shown up. Batches are the same
  either way (with config.deterministic False, the failure can surface a batch or two after
  the bad file's, and the examples in flight may be seen twice or missed).
  """
  try:
    for batch in batches_from(step, False):
      yield batch
      step += 1
    return
  except _FILE_ERRORS as error:
    # Only the text is kept: the error's traceback holds the failed iterator and its buffers.
    reason = str(error).strip().partition('\n')[0]
  logging.warning('An image of the batch of step %d does not decode (%s); decoding examples '
                  "one by one from there on, to find it (on_bad_image='%s').", step, reason,
                  on_bad_image)
  yield from batches_from(step, True)


def _train_epoch(config, source: data_sources.Source, options: preprocessing.Options,
                 epoch: int, skip: int, steps: int, index: int, count: int,
                 careful: bool) -> tf.data.Dataset:
  """One epoch's batches of this process, from its example `skip` of the epoch on."""
  seed_pair = (config.seed, epoch)
  batch_size = config.batch_size // count
  if source.streamed:
    ds = source.handles(config.train_split, seed_pair, index, count)
    # Each share holds at least steps * batch_size examples (floor(n / P) >= floor(n / B) b).
    ds = ds.take(steps * batch_size).enumerate().skip(skip)
    # Local position i -> its slot in the epoch's global batches, which seeds the example.
    ds = ds.map(lambda i, handle: (
        i // batch_size * config.batch_size + index * batch_size + i % batch_size, handle))
  else:
    ds = source.handles(config.train_split, seed_pair)
    ds = ds.take(steps * config.batch_size).enumerate().skip(skip * count)
    ds = ds.filter(lambda position, _: position % config.batch_size // batch_size == index)
  epoch_seed = tf.constant(seed_pair, tf.int64)

  def image(position, handle):
    seed = tf.random.experimental.stateless_fold_in(epoch_seed, position)
    return preprocessing.train_image(source.load(handle), seed, options)

  if careful:
    ds = _decode_carefully(ds, image, config)
  else:
    ds = _decode(ds, image, config)
  return _finish(ds.batch(batch_size, drop_remainder=True), config)


def create_eval_iterator(config, crops: Optional[int] = None,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> BatchIterator:
  """One pass over config.eval_split, every example once over all processes.

  Args:
    config: the run's config (see configs/imagenet.py).
    crops: the crops asked for, 1 (centre crop), 5 or 10 (see `eval_crops`); None means
      config.eval_crops.
    process_index: this process (default 0); the trainer passes jax.process_index().
    process_count: the number of processes (default 1).

  Returns:
    An iterator of {'image': uint8 [b, S, S, ch] ([b, C, S, S, ch] for C = eval_crops(...)
    crops; ch = config.input_channels),
    'label': int32 [b], 'mask': bool [b]} (plus, for a mean image, 'offset' int32 [b, 2]
    ([b, C, 2]) and 'flip' bool [b] ([b, C]): see `preprocessing.eval_image`),
    b = config.eval_batch_size // process_count, of this process's share of the split
    (`data_sources.process_range`), padded after its end (mask False); every process yields
    ceil(num_examples / eval_batch_size) batches (the shares differ by at most one example),
    at most config.steps_per_eval when that is positive.
  """
  index, count = _process(process_index, process_count)
  batch_size = _local_batch_size(config.eval_batch_size, count, 'eval_batch_size')
  crops = eval_crops(config, crops)
  if config.dataset == 'fake':
    batch = _fake_batch(config, batch_size, crops)
    num_batches = _num_eval_batches(FAKE_NUM_EVAL_EXAMPLES, config)
    start, stop = data_sources.process_range(FAKE_NUM_EVAL_EXAMPLES, index, count)
    return BatchIterator(
        {**batch, 'mask': np.arange(k * batch_size, (k + 1) * batch_size) < stop - start}
        for k in range(num_batches))
  if config.cache:
    key = (config.to_json(), crops, index, count)
    if key not in _EVAL_DATASETS:
      _EVAL_DATASETS[key] = _eval_dataset(config, crops, index, count)
    ds = _EVAL_DATASETS[key]
  else:
    ds = _eval_dataset(config, crops, index, count)
  return BatchIterator(_numpy_batches(ds), config.on_bad_image, train=False)


def _numpy_batches(ds: tf.data.Dataset) -> Iterator[Batch]:
  """`ds.as_numpy_iterator()`, deleted on a thread of its own once exhausted.

  Deleting a tf.data iterator joins its autotuning thread, whose pass over the pipeline,
  starved by a train step on every core, held the next batch 13-60 s at some epochs' starts
  (docs/results.md). The thread is no daemon, so the interpreter's exit waits for it rather
  than cut it off in TensorFlow's C++. An iterator dropped before its end (a preempted
  evaluation, a run's last epoch) is deleted where it is dropped: one whose threads are still
  producing, deleted on a non-daemon thread, kept the process from exiting.
  """
  iterator = [ds.as_numpy_iterator()]
  yield from iterator[0]
  threading.Thread(target=iterator.clear).start()


def eval_crops(config, crops: Optional[int] = None) -> int:
  """The crops an evaluation uses: 1, 5 or 10 (`preprocessing.CROP_NAMES`).

  Multi-crop follows the training data: the paper's 10 crops include mirrors, which a model
  trained without `random_flip` never saw (mirrored digits are other symbols), so 10 becomes
  the 5 unmirrored crops there.
  """
  crops = config.eval_crops if crops is None else crops
  if crops not in preprocessing.CROP_NAMES:
    raise ValueError(f'Evaluation crops must be one of {tuple(preprocessing.CROP_NAMES)}, not '
                     f'{crops}.')
  return 5 if crops == 10 and not config.random_flip else crops


# Evaluation datasets kept for config.cache (their decoded images cached by tf.data).
_EVAL_DATASETS: dict[tuple, tf.data.Dataset] = {}


def _eval_dataset(config, crops: int, index: int, count: int) -> tf.data.Dataset:
  """This process's evaluation batches of its share, padded with masked copies of the
  share's first example."""
  source = data_sources.get_source(config)
  options = preprocessing_options(config, source.encoded)
  num_examples = source.num_examples(config.eval_split)
  start, stop = data_sources.process_range(num_examples, index, count)
  if num_examples < count:  # Checked on every process: those with a share would wait.
    raise ValueError(f'The {config.eval_split!r} split has {num_examples} examples, fewer than '
                     f'the {count} processes that share it.' if num_examples else
                     f'The {config.eval_split!r} split is empty.')
  handles = source.handles(config.eval_split, process_index=index, process_count=count)
  batch_size = config.eval_batch_size // count
  # ceil(ceil(n / P) / b) == ceil(n / B): the largest share fills as many batches as all do.
  # The padding example read once: a repeat of take(1) would reopen the share for each copy.
  ds = handles.concatenate(handles.take(1).cache().repeat())
  ds = ds.take(_num_eval_batches(num_examples, config) * batch_size).enumerate()
  ds = ds.map(lambda position, handle: (position, {**handle, 'mask': position < stop - start}))
  ds = _decode_carefully(
      ds, lambda _, handle: preprocessing.eval_image(source.load(handle), options, crops),
      config)
  if config.cache:
    ds = ds.cache()
  return _finish(ds.batch(batch_size), config)


def _num_eval_batches(num_examples: int, config) -> int:
  num_batches = -(-num_examples // config.eval_batch_size)
  if config.steps_per_eval > 0:
    num_batches = min(num_batches, config.steps_per_eval)
  return num_batches


# ------------------------------------------------------------------------------- shared


def preprocessing_options(config, encoded: bool = True,
                          decode_window: bool = False) -> preprocessing.Options:
  """The preprocessing a config asks for (inputs encoded files, or pixels; decode_window: see
  `preprocessing.Options`).

  Raises:
    ValueError: a bad setting (see `config_checks.validate_data`), or a missing mean image.
  """
  config_checks.validate_data(config)
  mean, _ = pixel_statistics(config)  # Checks the mean image here, before any step runs.
  return preprocessing.Options(
      image_size=config.image_size,
      resize_size=config.resize_size,
      encoded=encoded,
      channels=config.input_channels,
      train_crop=config.train_crop,
      crop_area_min=config.crop_area_min,
      center_crop_train=config.center_crop_train,
      random_flip=config.random_flip,
      pca_lighting_std=config.pca_lighting_std,
      keep_window=mean is not None and mean.ndim == 3,
      decode_window=decode_window)


def pixel_statistics(config) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
  """The constants the device normalises pixels with (`normalize.Normalization`): the mean
  (see _mean) and the std (see _std).

  Raises:
    ValueError: mean_subtraction='pixel' without a usable mean image.
  """
  return _mean(config), _std(config)


def _std(config) -> Optional[np.ndarray]:
  """What the pixels are divided by: the ImageNet std [3] (torchvision), [255] (d2l's [0, 1]
  pixels) or None (the paper's 0-255)."""
  if config.divide_by_std:
    return np.array(preprocessing.IMAGENET_STD_RGB, np.float32)
  if config.divide_by_255:
    return np.array([255.0], np.float32)
  return None


def _mean(config) -> Optional[np.ndarray]:
  """What mean_subtraction subtracts: [3], [R, R, input_channels] or None."""
  if config.mean_subtraction == 'none':
    return None
  if config.mean_subtraction == 'channel':
    return np.array(preprocessing.IMAGENET_MEAN_RGB, np.float32)
  if config.train_crop != 'paper' or not config.center_crop_train:
    raise ValueError("mean_subtraction='pixel' subtracts a mean image of the central "
                     "squares: it needs train_crop='paper' and center_crop_train=True.")
  path = config.mean_image_path
  command = (f'python -m alexnet_jax.mean_image --config=<your config> '
             f'--output={path or "PATH.npy"}')
  if not path or not tf.io.gfile.exists(path):
    raise ValueError("mean_subtraction='pixel' needs the training set's mean image at "
                     f'config.mean_image_path (now {path}); compute it once with\n  {command}')
  with tf.io.gfile.GFile(path, 'rb') as f:
    mean = np.load(f)
  expected = (config.resize_size, config.resize_size, config.input_channels)
  if mean.shape != expected:
    raise ValueError(f'The mean image {path} has shape {mean.shape}, not {expected} '
                     f'(config.resize_size, config.input_channels); recompute it with\n'
                     f'  {command}')
  return mean.astype(np.float32)


def _process(index: Optional[int], count: Optional[int]) -> tuple[int, int]:
  index, count = index or 0, count or 1
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} is not in [0, process_count={count}).')
  return index, count


def _local_batch_size(global_batch_size: int, count: int, name: str) -> int:
  if global_batch_size % count:
    raise ValueError(f'config.{name}={global_batch_size} does not split evenly over {count} '
                     'processes.')
  return global_batch_size // count


def _parallelism(config) -> int:
  return config.num_parallel_calls if config.num_parallel_calls > 0 else tf.data.AUTOTUNE


def _decode(ds: tf.data.Dataset, image_fn: Callable, config) -> tf.data.Dataset:
  """Maps (position, handle) to {**image_fn's dict, 'label'}; a bad file fails the batch it is
  in."""
  return ds.map(lambda position, handle: {**image_fn(position, handle),
                                          'label': handle['label']},
                num_parallel_calls=_parallelism(config), deterministic=config.deterministic)


def _decode_carefully(ds: tf.data.Dataset, image_fn: Callable, config) -> tf.data.Dataset:
  """Maps (position, handle) to {**image_fn's dict, 'label', 'key', 'ok'} (+ 'mask' if the
  handle has it).

  tf.data cannot catch an op's error in a map, so each example is decoded in a one-element
  dataset whose errors are dropped; zeros with ok=False stand in for a dropped one.
  Every example keeps its place in the stream, so batches never depend on which files are bad.
  The nested datasets cost about 11% of a core's throughput next to _decode's plain map.
  """
  def example(position, handle):
    passed = {name: handle[name] for name in ('label', 'key', 'mask') if name in handle}
    decoded = tf.data.Dataset.from_tensors((position, handle)).map(
        lambda p, h: {**image_fn(p, h), 'ok': True, **passed}).ignore_errors()
    made = {name: spec for name, spec in decoded.element_spec.items()
            if name not in passed and name != 'ok'}
    # Lazy: the zeros are made only for an example that failed.
    failed = tf.data.Dataset.range(1).map(lambda _: {
        **{name: tf.zeros(spec.shape, spec.dtype) for name, spec in made.items()},
        'ok': False, **passed})
    return decoded.concatenate(failed).take(1)

  parallel = _parallelism(config)
  # One element per input, so a deterministic interleave keeps the input order.
  return ds.interleave(example, cycle_length=parallel, block_length=1,
                       num_parallel_calls=parallel, deterministic=config.deterministic)


def _finish(ds: tf.data.Dataset, config) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = config.deterministic
  if config.private_threadpool_size > 0:
    options.threading.private_threadpool_size = config.private_threadpool_size
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _fake_batch(config, batch_size: int, crops: int = 1) -> Batch:
  """Random uint8 pixels and random labels, fixed by the seed."""
  rng = np.random.default_rng(config.seed)
  size = config.image_size
  lead = [batch_size] + ([crops] if crops > 1 else [])
  batch = {'image': rng.integers(0, 256, lead + [size, size, config.input_channels],
                                 dtype=np.uint8),
           'label': rng.integers(0, config.num_classes, batch_size, dtype=np.int32)}
  if config.mean_subtraction == 'pixel':  # The mean image's central window, unmirrored.
    batch['offset'] = np.full(lead + [2], (config.resize_size - size) // 2, np.int32)
    batch['flip'] = np.zeros(lead, bool)
  return batch
