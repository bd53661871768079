"""Where examples come from: TFDS, an image folder, scikit-learn's bundled digits, or the
shards of alexnet_jax.prepare.

A source lists a split as a tf.data stream of handles, small dicts {'key': the example's name
for warnings (file path or TFDS id), 'label': int32, ...}, in a canonical order or in an order
shuffled by a seed. Handles are cheap (a path, an undecoded record, 8x8 pixels), so the
pipeline skips them before any image is decoded; `load` then turns a handle into the example's
data (encoded file or pixels) for preprocessing.

Several processes: process p of P lists only its share of a split, the examples
`process_range(n, p, P)` of the canonical order, and reads only the records of that share
(the TFDS slice `split[start:stop]`, or the prepared shards that hold it), so a host reads no
other host's examples: except, in the first shard of a prepared share, the records before it,
which the TFRecord reader reads through to skip them (at most one shard a process).

Used through input_pipeline, which keeps TensorFlow off the GPUs.
"""

import abc
import functools
import json
import os
from typing import Optional
from unittest import mock

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader as tfds_downloader

from alexnet_jax import parallel

# What tfds.folder_dataset.ImageFolder and torchvision's ImageFolder accept, minus the formats
# tf.io.decode_image cannot read.
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif', '.webp')
# The files the installed TFDS imagenet2012 builder reads from its manual dir.
IMAGENET_MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
DIGITS_TEST_FRACTION = 0.2
# Retries of each TFDS download request (TFDS's own default: 10).
DOWNLOAD_RETRIES = 2
# What alexnet_jax.prepare writes next to its shards.
PREPARED_METADATA = 'metadata.json'

ShuffleSeed = Optional[tuple[int, int]]


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Examples [start, stop) of a split's canonical order that process p of P reads: P
  consecutive shares whose sizes differ by at most one (the later ones the larger; TFDS's
  even_splits gives its extra examples to the first ones instead)."""
  return (num_examples * process_index // process_count,
          num_examples * (process_index + 1) // process_count)


class Source(abc.ABC):
  """A dataset's splits as streams of handles."""

  # Label i is class_names[i].
  class_names: list[str]
  # load() returns an encoded image file (scalar string); False: pixels [h, w, 1 or 3].
  encoded: bool
  # Handles are records read in sequence that carry the encoded image (TFDS, prepared): a
  # process lists only its share. False: paths or pixels in memory, which every process can
  # list whole for free.
  streamed: bool
  # Its images are JPEG canvases at full chroma resolution (alexnet_jax.prepare's): a crop's
  # window alone decodes to the whole image's pixels there (`preprocessing.Options`).
  full_chroma_canvases: bool = False

  @abc.abstractmethod
  def num_examples(self, split: str) -> int:
    """Number of examples in a split."""

  @abc.abstractmethod
  def handles(self, split: str, shuffle_seed: ShuffleSeed = None, process_index: int = 0,
              process_count: int = 1) -> tf.data.Dataset:
    """This process's share of a split's handles (`process_range`; all of it for one
    process), in canonical order or shuffled by a seed (two non-negative ints)."""

  @abc.abstractmethod
  def load(self, handle: dict[str, tf.Tensor]) -> tf.Tensor:
    """The example's data (graph function): encoded file, or pixels [h, w, 1 or 3]."""


class ArraySource(Source):
  """Splits held as numpy arrays of handles; a shuffle is a full permutation.

  Each split is a dict of equally long arrays: 'key' and 'label', plus 'pixels' [n, h, w, 1 or
  3] (grey or RGB; preprocessing converts to the channels asked for) when the data are in
  memory (read_files False); otherwise 'key' is the file to read.
  """

  def __init__(self, splits: dict[str, dict[str, np.ndarray]], class_names: list[str],
               read_files: bool):
    self._splits = splits
    self.class_names = class_names
    self.encoded = read_files
    self.streamed = False

  def _split(self, split: str) -> dict[str, np.ndarray]:
    if split not in self._splits:
      raise ValueError(f'Unknown split {split!r}; this dataset has {sorted(self._splits)}.')
    return self._splits[split]

  def num_examples(self, split: str) -> int:
    return len(self._split(split)['label'])

  def handles(self, split: str, shuffle_seed: ShuffleSeed = None, process_index: int = 0,
              process_count: int = 1) -> tf.data.Dataset:
    start, stop = process_range(self.num_examples(split), process_index, process_count)
    arrays = {name: array[start:stop] for name, array in self._split(split).items()}
    if shuffle_seed is not None:
      order = np.random.default_rng(shuffle_seed).permutation(len(arrays['label']))
      arrays = {name: array[order] for name, array in arrays.items()}
    return tf.data.Dataset.from_tensor_slices(arrays)

  def load(self, handle: dict[str, tf.Tensor]) -> tf.Tensor:
    return tf.io.read_file(handle['key']) if self.encoded else handle['pixels']


class TfdsSource(Source):
  """A prepared TFDS dataset, read without decoding; a shuffle reads the files in a seeded
  order through a seeded shuffle buffer."""

  def __init__(self, builder: tfds.core.DatasetBuilder, shuffle_buffer_size: int):
    self._builder = builder
    self._shuffle_buffer_size = shuffle_buffer_size
    self._image_key, self._label_key = _supervised_keys(builder)
    self.class_names = list(builder.info.features[self._label_key].names)
    self.encoded = self.streamed = True

  def _check_split(self, split: str):
    if split not in self._builder.info.splits:
      raise ValueError(f'Unknown split {split!r} of {self._builder.name}; it has '
                       f'{sorted(self._builder.info.splits)}.')

  def num_examples(self, split: str) -> int:
    self._check_split(split)
    return self._builder.info.splits[split].num_examples

  def handles(self, split: str, shuffle_seed: ShuffleSeed = None, process_index: int = 0,
              process_count: int = 1) -> tf.data.Dataset:
    start, stop = process_range(self.num_examples(split), process_index, process_count)
    seed = _int_seed(shuffle_seed)
    ds = self._builder.as_dataset(
        # What tfds.split_for_jax_process does, with process_range's rounding: TFDS reads
        # only the files that hold the slice (skipping into the first one).
        split=f'{split}[{start}:{stop}]',
        shuffle_files=seed is not None,
        decoders={self._image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(
            shuffle_seed=seed, add_tfds_id=True, try_autocache=False, skip_prefetch=True))
    ds = ds.map(lambda example: {
        'key': example['tfds_id'],
        'label': tf.cast(example[self._label_key], tf.int32),
        'image': example[self._image_key],
    })
    if seed is not None:
      ds = ds.shuffle(self._shuffle_buffer_size, seed=seed)
    return ds

  def load(self, handle: dict[str, tf.Tensor]) -> tf.Tensor:
    return handle['image']


def _int_seed(shuffle_seed: ShuffleSeed) -> Optional[int]:
  """One int seed for TensorFlow's shuffles, from the pair (None stays None: no shuffle)."""
  if shuffle_seed is None:
    return None
  return int(np.random.SeedSequence(shuffle_seed).generate_state(1)[0])


class PreparedSource(Source):
  """The TFRecord shards of alexnet_jax.prepare in data_dir, described by its metadata.json.

  A handle is a parsed record, {'key': the original file's name, 'label', 'image': JPEG
  bytes}; a shuffle reads the shards of the process's share in a seeded order through a
  seeded shuffle buffer (as TfdsSource does).
  """

  def __init__(self, data_dir: Optional[str], shuffle_buffer_size: int):
    path = os.path.join(data_dir or '', PREPARED_METADATA)
    if not data_dir or not tf.io.gfile.exists(path):
      raise ValueError(f"dataset='prepared' needs config.data_dir holding {PREPARED_METADATA} "
                       f'(not found: {path}); write it with python -m alexnet_jax.prepare '
                       '--config=<the original config> --output=DIR.')
    with tf.io.gfile.GFile(path) as f:
      self._metadata = json.load(f)
    self._data_dir = data_dir
    self._shuffle_buffer_size = shuffle_buffer_size
    self.class_names = self._metadata['class_names']
    self.encoded = self.streamed = True
    self.full_chroma_canvases = not self._metadata['settings']['chroma_downsampling']

  def _split(self, split: str) -> dict:
    if split not in self._metadata['splits']:
      raise ValueError(f'Unknown split {split!r} of the prepared {self._data_dir}; it has '
                       f'{sorted(self._metadata["splits"])}.')
    return self._metadata['splits'][split]

  def num_examples(self, split: str) -> int:
    return self._split(split)['num_examples']

  def files_read(self, split: str, process_index: int = 0,
                 process_count: int = 1) -> list[tuple[str, int, int]]:
    """What process p of P reads of a split: (shard path, records skipped, records read) of
    each shard that holds part of its share, in canonical order. Only the first may skip
    records (the TFRecord reader reads through them, without parsing them)."""
    info = self._split(split)
    if 'shard_sizes' not in info:
      raise ValueError(f'{os.path.join(self._data_dir, PREPARED_METADATA)} lacks the shard sizes '
                       'that processes share the shards by (an older alexnet_jax.prepare wrote '
                       'it, in an older order): prepare the data again into a new --output.')
    start, stop = process_range(info['num_examples'], process_index, process_count)
    reads, first = [], 0
    for name, size in zip(info['shards'], info['shard_sizes']):
      skip = max(start - first, 0)
      take = min(stop, first + size) - first - skip
      if take > 0:
        reads.append((os.path.join(self._data_dir, name), skip, take))
      first += size
    return reads

  def handles(self, split: str, shuffle_seed: ShuffleSeed = None, process_index: int = 0,
              process_count: int = 1) -> tf.data.Dataset:
    reads = self.files_read(split, process_index, process_count)
    seed = _int_seed(shuffle_seed)
    if seed is not None:
      reads = [reads[i] for i in np.random.default_rng(seed).permutation(len(reads))]
    files, skips, takes = (list(column) for column in zip(*reads)) if reads else ([], [], [])
    features = {'image/encoded': tf.io.FixedLenFeature([], tf.string),
                'image/class/label': tf.io.FixedLenFeature([], tf.int64),
                'image/filename': tf.io.FixedLenFeature([], tf.string)}

    def handle(record):
      example = tf.io.parse_single_example(record, features)
      return {'key': example['image/filename'],
              'label': tf.cast(example['image/class/label'], tf.int32),
              'image': example['image/encoded']}

    ds = tf.data.Dataset.from_tensor_slices((tf.constant(files, tf.string),
                                             tf.constant(skips, tf.int64),
                                             tf.constant(takes, tf.int64)))
    ds = ds.flat_map(lambda path, skip, take: tf.data.TFRecordDataset(path).skip(skip).take(take))
    ds = ds.map(handle)
    if seed is not None:
      ds = ds.shuffle(self._shuffle_buffer_size, seed=seed)
    return ds

  def load(self, handle: dict[str, tf.Tensor]) -> tf.Tensor:
    return handle['image']


def get_source(config) -> Source:
  """The source config.dataset names: 'folder', 'digits', 'prepared' (alexnet_jax.prepare's
  output in config.data_dir), or a TFDS name (prepared if need be).

  Raises:
    ValueError: the data are missing, with what to put where.
  """
  if config.dataset == 'folder':
    return folder_source(config.data_dir, config.train_split, config.eval_split)
  if config.dataset == 'digits':
    return digits_source()
  if config.dataset == 'prepared':
    return PreparedSource(config.data_dir, config.shuffle_buffer_size)
  return TfdsSource(tfds_builder(config.dataset, config.data_dir, config.manual_dir),
                    config.shuffle_buffer_size)


# ------------------------------------------------------------------------------- folder


def folder_source(root: Optional[str], *splits: str) -> ArraySource:
  """An image folder ROOT/<split>/<class>/<image>; label = index of the class in the sorted
  class folders of the first split (the training split)."""
  listings = {split: _list_folder(_split_dir(root, split)) for split in dict.fromkeys(splits)}
  class_names = sorted(listings[splits[0]])
  class_index = {name: i for i, name in enumerate(class_names)}
  arrays = {}
  for split, listing in listings.items():
    extra = sorted(set(listing) - set(class_index))
    if extra:
      raise ValueError(f'{os.path.join(root, split)} has classes the {splits[0]!r} split lacks: '
                       f'{extra[:5]}; both splits need the same class folders.')
    paths = [path for name in sorted(listing) for path in listing[name]]
    labels = [class_index[name] for name in sorted(listing) for _ in listing[name]]
    arrays[split] = {'key': np.array(paths), 'label': np.array(labels, np.int32)}
  return ArraySource(arrays, class_names, read_files=True)


def folder_class_names(root: Optional[str], split: str) -> list[str]:
  """The class names of `folder_source(root, split, ...)` from its folders, no image listed."""
  return _class_folders(_split_dir(root, split))


def _split_dir(root: Optional[str], split: str) -> str:
  if not root:
    raise ValueError("dataset='folder' needs config.data_dir: the root of ROOT/<split>/<class>/"
                     '*.JPEG.')
  return os.path.join(root, split)


def _class_folders(split_dir: str) -> list[str]:
  """The sorted class folder names of one split."""
  if not tf.io.gfile.isdir(split_dir):
    raise ValueError(f'Image folder split {split_dir} does not exist; expected '
                     f'{split_dir}/<class>/<image>.JPEG (set config.data_dir and the split names).')
  # Hidden folders (.ipynb_checkpoints, ...) are not classes.
  classes = sorted(name.rstrip('/') for name in tf.io.gfile.listdir(split_dir)
                   if not name.startswith('.')
                   and tf.io.gfile.isdir(os.path.join(split_dir, name)))
  if not classes:
    raise ValueError(f'{split_dir} has no class folders; expected {split_dir}/<class>/<image>.')
  return classes


@functools.lru_cache(maxsize=None)
def _list_folder(split_dir: str) -> dict[str, list[str]]:
  """{class folder name: sorted image paths} of one split; cached (ImageNet has 1.3M files)."""
  listing = {name: [] for name in _class_folders(split_dir)}
  for path in tf.io.gfile.glob(os.path.join(split_dir, '*', '*')):
    name = os.path.basename(os.path.dirname(path))
    if name in listing and path.lower().endswith(IMAGE_EXTENSIONS):
      listing[name].append(path)
  for name, paths in listing.items():
    if not paths:
      raise ValueError(f'Class folder {os.path.join(split_dir, name)} has no images '
                       f'({", ".join(IMAGE_EXTENSIONS)}); remove it or add its images.')
    paths.sort()
  logging.info('Listed %d images in %d classes under %s.',
               sum(map(len, listing.values())), len(listing), split_dir)
  return listing


# ------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=None)
def digits_source() -> ArraySource:
  """scikit-learn's 1,797 8x8 digits: a fixed stratified 80/20 'train'/'test' split, pixels
  0..16 scaled to 0..255 and rounded to uint8 (as every source's pixels), grey [8, 8, 1]
  (preprocessing repeats it for 3-channel models)."""
  # Imported here: scikit-learn is only needed for this source.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  pixels = np.round(digits.images[..., None] * (255 / 16)).astype(np.uint8)
  train, test = model_selection.train_test_split(
      np.arange(len(digits.target)), test_size=DIGITS_TEST_FRACTION,
      stratify=digits.target, random_state=0)
  splits = {}
  for split, index in (('train', np.sort(train)), ('test', np.sort(test))):
    splits[split] = {
        'key': np.array([f'digits/{i}' for i in index]),
        'label': digits.target[index].astype(np.int32),
        'pixels': pixels[index],
    }
  return ArraySource(splits, [str(c) for c in range(10)], read_files=False)


# --------------------------------------------------------------------------------- TFDS


def tfds_builder(name: str, data_dir: Optional[str],
                 manual_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """The TFDS builder of a prepared dataset; prepares it first if need be.

  Raises:
    ValueError: unknown name, a manual download missing (saying which files go where), or
      preparation failed (e.g. no internet).
  """
  builder = _find_builder(name, data_dir)
  # Process 0's view decides for all: a host that already sees the files process 0 has just
  # written would otherwise skip the barrier that the others wait at.
  if not parallel.process_0_value(builder.is_prepared()):
    # Process 0 alone prepares (hosts writing the same files would collide); the others wait,
    # and hear of its failure through their own check below rather than hang at the barrier.
    failure = None
    if jax.process_index() == 0:
      try:
        _prepare(builder, manual_dir)
      except ValueError as e:
        failure = e
    parallel.sync_processes(f'alexnet_jax: TFDS {name} prepared')
    if failure is not None:
      raise failure
    builder = _find_builder(name, data_dir)
  if not builder.is_prepared():
    raise ValueError(f'TFDS dataset {name} is not prepared in {builder.data_dir_root} after '
                     'process 0 prepared it: give every host a data_dir on a file system they '
                     'share, or prepare it on each host first (see the log of process 0).')
  return builder


def is_unprepared_tfds(config) -> bool:
  """Whether config.dataset is a TFDS dataset that `get_source` would have to prepare."""
  if config.dataset in ('folder', 'digits', 'prepared'):
    return False
  return not _find_builder(config.dataset, config.data_dir).is_prepared()


def tfds_class_names(name: str, data_dir: Optional[str]) -> list[str]:
  """A TFDS dataset's label names, from its builder's code: works before it is prepared."""
  builder = _find_builder(name, data_dir)
  return list(builder.info.features[_supervised_keys(builder)[1]].names)


def _find_builder(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset={name!r} is neither 'folder', 'digits', 'prepared', "
                     f"'fake' nor a TFDS dataset: {e}") from e


def _supervised_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """The (image, label) feature names of a TFDS dataset."""
  return builder.info.supervised_keys or ('image', 'label')


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir: Optional[str]):
  """Downloads and prepares a TFDS dataset, once (manual datasets need their files first)."""
  root = str(builder.data_dir_root)
  manual_dir = manual_dir or os.path.join(root, 'downloads', 'manual')
  command = f'tfds build {builder.name} --data_dir={root}'
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    command += f' --manual_dir={manual_dir}'
    required = IMAGENET_MANUAL_FILES if builder.name == 'imagenet2012' else ()
    missing = [os.path.join(manual_dir, f) for f in required
               if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
    if missing or not tf.io.gfile.exists(manual_dir):
      raise ValueError(_missing_manual_message(builder, root, manual_dir, missing, command))
  logging.info('Preparing TFDS %s in %s, once (ImageNet takes hours).', builder.name, root)
  try:
    # TFDS retries a failed request 10 times, backing off exponentially: 3 min 24 s before a
    # host that does not resolve (no internet) fails. 2 retries still ride out a blip.
    with mock.patch.object(tfds_downloader, 'MAX_RETRIES', DOWNLOAD_RETRIES):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # Any failure of TFDS's download or build; re-raised with the fix.
    # One line, the reason's first: TFDS's download errors (no internet) run to many lines.
    reason = str(e).strip().partition('\n')[0]
    raise ValueError(
        f'TFDS dataset {builder.name} is not prepared in {root} and preparing it failed '
        f'({type(e).__name__}: {reason}). It downloads once where the internet is reachable; '
        f'or run `{command}` on a machine that has it and copy {builder.data_dir} here.') from e


def _missing_manual_message(builder, root: str, manual_dir: str, missing: list[str],
                            command: str) -> str:
  if builder.name == 'imagenet2012':
    return (
        f'ImageNet (TFDS imagenet2012) is not prepared in {root}, and its manual download is '
        f'missing: {", ".join(missing)}.\n'
        f'Download {" and ".join(IMAGENET_MANUAL_FILES)} from '
        'https://image-net.org/download-images (free registration) into '
        f'{manual_dir} (or set config.manual_dir), then run once (hours):\n  {command}\n'
        'or just rerun this command, which prepares it. An extracted ImageNet works too: '
        "--config.dataset=folder --config.data_dir=ROOT with ROOT/train/<wnid>/*.JPEG and "
        "ROOT/val/<wnid>/*.JPEG (and --config.eval_split=val).")
  return (f'TFDS dataset {builder.name} is not prepared in {root} and needs a manual download '
          f'into {manual_dir} (config.manual_dir):\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}\n'
          f'then run once:\n  {command}')
