"""Prepares the paper's offline dataset once: every image as its 256x256 canvas, re-encoded.

The paper "down-sampled the images to a fixed resolution of 256 x 256" before training. This
command does that for both config.train_split and config.eval_split of whatever source the
config names (folder, TFDS, digits): the central square resized to config.resize_size x
config.resize_size (--keep_aspect: the whole image with its shorter side config.resize_size,
for train_crop='random_resized'), exactly the canvas training would compute, rounded to uint8
and re-encoded as JPEG. Training on it (`--config.dataset=prepared --config.data_dir=DIR`)
then decodes a small JPEG whose canvas step is an identity resize.

  python -m alexnet_jax.prepare --config=configs/imagenet.py --output=/data/in1k_256

Output, in DIR:
  <split>-<k>-of-<K>.tfrecord  TFRecord shards of tf.train.Example {image/encoded: JPEG bytes,
                               image/class/label: int64, image/filename: the source's key}, the
                               split's examples in a fixed permutation (`ORDER_SEED`) of a
                               listed source (a folder lists class by class), in TFDS's own
                               (already mixed) order for a streamed one,
                               --examples_per_shard each (TFRecord: tf.data reads it natively;
                               ArrayRecord would add a dependency for random access we do not
                               need, as the pipeline reads shards in sequence).
  <split>-<k>-of-<K>.json      that shard's class counts and undecodable files.
  metadata.json                class names, counts per split and class, the files that did not
                               decode, the source, the settings and the shards with their
                               record counts.

Resuming: a shard is written under a temporary name (unique across hosts) and renamed when
complete, so a rerun keeps every finished shard and redoes only the others. Files that do not
decode are logged, listed and counted in metadata.json, not written.

Several processes or hosts: process i of n writes the shards i, i+n, i+2n, ... of the list of
all shards (both splits), and process 0 alone writes metadata.json (renamed into place: no
reader sees half of it). Either as one job, whose processes join as training's do (SLURM's
srun, Open MPI's mpirun, or --coordinator_address, --num_processes and --process_id): process
0 then prepares a TFDS source once while the others wait, and writes metadata.json once every
process is done. Or as independent processes, `--shard_index=i --num_shards=n`, at any time:
a TFDS source must then be prepared already (they would each download it), and
`--shard_index=0` writes metadata.json if every shard exists by then (rerun it at the end if
not: it redoes nothing else).
"""

import itertools
import json
import os
import re
import socket
import time
import uuid
from typing import Any, Iterator, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tensorflow as tf

from alexnet_jax import cli
from alexnet_jax import data_sources
from alexnet_jax import input_pipeline
from alexnet_jax import parallel
from alexnet_jax import preprocessing

METADATA = data_sources.PREPARED_METADATA
# 4:4:4 at quality 90: on the 300 ImageNet photos of shared/data, 25.5 KiB an image at 256 px
# and 38.0 dB PSNR against the float canvas (worst image 30.4 dB); TensorFlow's default 4:2:0
# needs quality 95 for the same size (28.9 KiB) and gives 37.4 dB, its worst 24.5 dB
# (saturated reds lose their edges). docs/input_pipeline.md, "Prepared data".
DEFAULT_QUALITY = 90
CHROMA_DOWNSAMPLING = False
# Training reads prepared shards in sequence through a shuffle buffer, and each host a run of
# them of its own: records in a folder's class-by-class order would give batches (and hosts)
# of a few classes. So a listed split is written in this seed's permutation.
ORDER_SEED = (2012, 0)


class Shard(NamedTuple):
  """Examples [start, stop) of a split's written order, to `name` (no extension)."""
  split: str
  start: int
  stop: int
  name: str


def shard_list(source: data_sources.Source, splits: list[str],
               examples_per_shard: int) -> list[Shard]:
  """All shards of all splits, in the order --shard_index deals them out."""
  shards = []
  for split in splits:
    num_examples = source.num_examples(split)
    if not num_examples:
      raise ValueError(f'The {split!r} split is empty: nothing to prepare.')
    count = -(-num_examples // examples_per_shard)
    for k in range(count):
      shards.append(Shard(split, k * examples_per_shard,
                          min((k + 1) * examples_per_shard, num_examples),
                          f'{split}-{k:05d}-of-{count:05d}'))
  return shards


def _settings(config: ml_collections.ConfigDict, quality: int, keep_aspect: bool,
              examples_per_shard: int, order_seed: tuple[int, int] | None) -> dict[str, Any]:
  return {'size': config.resize_size, 'quality': quality, 'keep_aspect': keep_aspect,
          'channels': config.input_channels, 'chroma_downsampling': CHROMA_DOWNSAMPLING,
          'examples_per_shard': examples_per_shard,
          'order_seed': None if order_seed is None else list(order_seed)}


def _write_atomically(path: str, write_fn):
  """write_fn(temporary path), then renames it to path: readers never see a partial file."""
  # PIDs repeat across hosts that share the output.
  temporary = f'{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}'
  write_fn(temporary)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def _write_json(path: str, value: Any):
  def write(temporary):
    with tf.io.gfile.GFile(temporary, 'w') as f:
      json.dump(value, f, indent=1)
  _write_atomically(path, write)


def _read_json(path: str) -> Any:
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _encoder(source: data_sources.Source, config: ml_collections.ConfigDict, quality: int,
             keep_aspect: bool):
  """A tf.function: a handle -> its canvas as JPEG bytes (scalar string)."""
  # The training canvas, uint8 (see preprocessing.canvas).
  options = preprocessing.Options(image_size=config.resize_size,
                                  resize_size=config.resize_size, encoded=source.encoded,
                                  channels=config.input_channels)

  @tf.function
  def encode(handle):
    pixels = preprocessing.canvas(source.load(handle), options, square=not keep_aspect)
    return tf.io.encode_jpeg(pixels, quality=quality, chroma_downsampling=CHROMA_DOWNSAMPLING)

  return encode


def _example(jpeg: bytes, label: int, key: bytes) -> bytes:
  return tf.train.Example(features=tf.train.Features(feature={
      'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
      'image/class/label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
      'image/filename': tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
  })).SerializeToString()


class _Progress:
  """Logs images done, images/s and the ETA of this process every `every` images."""

  def __init__(self, total: int, every: int):
    self._total, self._every, self._done = total, every, 0
    self._start = time.perf_counter()

  def step(self):
    self._done += 1
    if self._done % self._every and self._done != self._total:
      return
    rate = self._done / (time.perf_counter() - self._start)
    logging.info('Prepared %d of %d images (%.1f%%), %.1f images/s, ETA %.0f min.',
                 self._done, self._total, 100 * self._done / self._total, rate,
                 (self._total - self._done) / rate / 60)


def _write_shard(shard: Shard, handles: Iterator[dict[str, tf.Tensor]],
                 source: data_sources.Source, encode, output: str, settings: dict[str, Any],
                 progress: _Progress):
  """Writes one shard's TFRecord (renamed last: its existence marks the shard done) after its
  JSON of class counts and undecodable files, from the shard's handles."""
  counts = [0] * len(source.class_names)
  failed = []

  def write(temporary):
    with tf.io.TFRecordWriter(temporary) as writer:
      for handle in handles:
        key = handle['key'].numpy()
        try:
          jpeg = encode(handle).numpy()
        except input_pipeline._FILE_ERRORS as error:  # pylint: disable=protected-access
          # The op's own line (before TensorFlow's node list, after any traceback of where it
          # was traced), less node names: "Invalid JPEG data or crop window."
          reason = error.message.partition('\n\t [[')[0].strip().split('\n')[-1]
          reason = re.sub(r'\{\{[^}]*\}\}\s*', '', reason)
          logging.warning('Cannot decode %s (%s); listed in %s.', key.decode(), reason,
                          METADATA)
          failed.append(key.decode())
        else:
          label = int(handle['label'])
          counts[label] += 1
          writer.write(_example(jpeg, label, key))
        progress.step()
    _write_json(os.path.join(output, shard.name + '.json'),
                {'settings': settings, 'class_counts': counts, 'failed': failed})

  _write_atomically(os.path.join(output, shard.name + '.tfrecord'), write)


def _is_done(shard: Shard, output: str, settings: dict[str, Any]) -> bool:
  """Whether the shard is complete; a shard of other settings is an error (no mixed data)."""
  path = os.path.join(output, shard.name)
  if not (tf.io.gfile.exists(path + '.tfrecord') and tf.io.gfile.exists(path + '.json')):
    return False
  theirs = _read_json(path + '.json')['settings']
  if theirs != settings:
    raise ValueError(f'{output} holds shards prepared with {theirs}, not {settings}; use '
                     'another --output or the same flags.')
  return True


def _write_metadata(config: ml_collections.ConfigDict, source: data_sources.Source,
                    shards: list[Shard], output: str, settings: dict[str, Any]):
  """Writes metadata.json from the shards' JSONs (every shard done)."""
  splits = {}
  for shard in shards:
    info = _read_json(os.path.join(output, shard.name + '.json'))
    split = splits.setdefault(shard.split, {
        'num_examples': 0, 'num_listed': 0, 'class_counts': [0] * len(source.class_names),
        'num_failed': 0, 'failed': [], 'shards': [], 'shard_sizes': []})
    split['num_examples'] += sum(info['class_counts'])
    split['num_listed'] += shard.stop - shard.start
    split['class_counts'] = [a + b for a, b in zip(split['class_counts'], info['class_counts'])]
    split['failed'] += info['failed']
    split['num_failed'] += len(info['failed'])
    split['shards'].append(shard.name + '.tfrecord')
    # Records in the shard: processes split the records by them (PreparedSource.files_read).
    split['shard_sizes'].append(sum(info['class_counts']))
  for split in splits.values():
    split['class_counts'] = dict(zip(source.class_names, split['class_counts']))
  _write_json(os.path.join(output, METADATA), {
      'class_names': list(source.class_names),
      'source': {'dataset': config.dataset, 'data_dir': config.data_dir,
                 'splits': list(splits)},
      'settings': settings,
      'splits': splits,
  })
  for name, split in splits.items():
    logging.info('%s: %d images in %d shards, %d undecodable%s.', name, split['num_examples'],
                 len(split['shards']), split['num_failed'],
                 f' (e.g. {split["failed"][0]})' if split['failed'] else '')


def prepare(config: ml_collections.ConfigDict, output: str, quality: int = DEFAULT_QUALITY,
            keep_aspect: bool = False, shard_index: int = 0, num_shards: int = 1,
            examples_per_shard: int = 1024, log_every: int = 1000) -> bool:
  """Writes this process's shards of config's train and eval splits into `output`.

  Args:
    config: the run's config: its source (dataset, data_dir, splits), resize_size (the side R
      of the canvases written) and input_channels.
    output: the directory written (created if need be).
    quality: JPEG quality, 1-100.
    keep_aspect: whole images with the shorter side R, [R, >= R] or [>= R, R], instead of
      the R x R central square.
    shard_index, num_shards: this process writes shards shard_index, +num_shards, ... of all;
      in a multi-process job, its process index and count.
    examples_per_shard: the source's examples per shard (undecodable ones included).
    log_every: log progress every so many images.

  Returns:
    Whether this process wrote metadata.json (process 0, every shard of every process done).

  Raises:
    ValueError: missing data, bad arguments or an output prepared with other settings.
  """
  if not 0 <= shard_index < num_shards:
    raise ValueError(f'--shard_index={shard_index} is not in [0, --num_shards={num_shards}).')
  if config.dataset == 'prepared':
    raise ValueError('config.dataset is already prepared; prepare the original source.')
  in_job = jax.process_count() > 1
  if num_shards > 1 and not in_job and data_sources.is_unprepared_tfds(config):
    raise ValueError(
        f'TFDS dataset {config.dataset} is not prepared (config.data_dir={config.data_dir}), '
        'and independent processes (--num_shards) would each download it: run them as one '
        'job (srun, mpirun or --coordinator_address, --num_processes and --process_id), whose '
        f'process 0 prepares it, or prepare it first: tfds build {config.dataset}.')
  source = data_sources.get_source(config)
  order_seed = None if source.streamed else ORDER_SEED
  settings = _settings(config, quality, keep_aspect, examples_per_shard, order_seed)
  shards = shard_list(source, list(dict.fromkeys([config.train_split, config.eval_split])),
                      examples_per_shard)
  tf.io.gfile.makedirs(output)
  mine = [s for s in shards[shard_index::num_shards] if not _is_done(s, output, settings)]
  logging.info('Preparing %d shards in %s: this process has %d of the %d (%d done already).',
               len(mine), output, len(shards[shard_index::num_shards]), len(shards),
               len(shards[shard_index::num_shards]) - len(mine))
  if mine:
    encode = _encoder(source, config, quality, keep_aspect)
    progress = _Progress(sum(s.stop - s.start for s in mine), log_every)
    for split in dict.fromkeys(shard.split for shard in mine):
      todo = [shard for shard in mine if shard.split == split]
      # One pass over the split, keeping the positions of these shards: a skip to each shard
      # would read a TFDS split's records again for every shard.
      wanted = tf.constant([shard.start // examples_per_shard for shard in todo], tf.int64)
      handles = iter(source.handles(split, shuffle_seed=order_seed).enumerate().filter(
          lambda position, _: tf.reduce_any(position // examples_per_shard == wanted))
                     .map(lambda _, handle: handle))
      for shard in todo:
        _write_shard(shard, itertools.islice(handles, shard.stop - shard.start), source,
                     encode, output, settings, progress)
  if in_job:
    parallel.sync_processes('alexnet_jax: prepare wrote its shards')
  if shard_index != 0:
    return False
  missing = [s.name for s in shards if not _is_done(s, output, settings)]
  if missing:
    logging.info('%d shards of other processes are not done yet (e.g. %s); rerun '
                 '--shard_index=0 when they are: it writes %s.', len(missing), missing[0],
                 METADATA)
    return False
  _write_metadata(config, source, shards, output, settings)
  return True


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.start()
  with cli.user_errors():
    shard_index, num_shards = _SHARD_INDEX.value, _NUM_SHARDS.value
    if jax.process_count() > 1:
      if (shard_index, num_shards) not in ((0, 1), (jax.process_index(), jax.process_count())):
        raise ValueError(f'--shard_index={shard_index} --num_shards={num_shards} in a job of '
                         f'{jax.process_count()} processes: leave them out, each process of a '
                         'job takes its own place in it.')
      shard_index, num_shards = jax.process_index(), jax.process_count()
    prepare(_CONFIG.value, _OUTPUT.value, _QUALITY.value, _KEEP_ASPECT.value, shard_index,
            num_shards, _EXAMPLES_PER_SHARD.value, _LOG_EVERY.value)


if __name__ == '__main__':
  # Flags are defined only when run as a command, so importing prepare next to the trainer's
  # own --config flag does not clash.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'The config whose source to prepare.',
                                            lock_config=True)
  _OUTPUT = flags.DEFINE_string('output', None, 'Directory of the prepared dataset.')
  _QUALITY = flags.DEFINE_integer('quality', DEFAULT_QUALITY, 'JPEG quality.', lower_bound=1,
                                  upper_bound=100)
  _KEEP_ASPECT = flags.DEFINE_bool(
      'keep_aspect', False, "Whole images, shorter side config.resize_size (for "
      "train_crop='random_resized'), instead of the central square.")
  _SHARD_INDEX = flags.DEFINE_integer(
      'shard_index', 0, 'This independent process writes shards shard_index, +num_shards, ... '
      '(in a multi-process job: its process index).', lower_bound=0)
  _NUM_SHARDS = flags.DEFINE_integer(
      'num_shards', 1, 'Independent processes sharing the work (in a job: its processes).',
      lower_bound=1)
  _EXAMPLES_PER_SHARD = flags.DEFINE_integer('examples_per_shard', 1024,
                                             'Images per TFRecord file.', lower_bound=1)
  _LOG_EVERY = flags.DEFINE_integer('log_every', 1000, 'Log progress every N images.',
                                    lower_bound=1)
  flags.mark_flags_as_required(['config', 'output'])
  app.run(main, flags_parser=cli.parse_flags)
