"""Training-augmentation throughput: our tf.data pipeline on the original photos and on the same
photos prepared (alexnet_jax.prepare), against PIL + NumPy in a process pool on both.

All four do the paper's training augmentation on the real ImageNet photos of shared/data
(original sizes, repeated): decode, the 256x256 canvas (the central square, antialiased
bilinear; already done for prepared data), a random 224 crop, a random mirror and the PCA
lighting shift drawn, into what the training step takes: uint8 pixels and float32 [3] shifts
(the float conversion, mean and shift run on the device, `normalize`). Ours runs through
create_train_iterator on an
image folder and on its prepared TFRecord shards; the reference is what a PyTorch DataLoader
worker does (PIL in worker processes, batches pickled back), reading the same JPEG files, or
the same records of the same shards. First the folder is prepared, timed (preparation speed).
Each arm is timed on one core (private_threadpool_size=1 / a 1-process pool) and on all
cores, interleaved over several rounds (the arms' order reversed every other round), each from
a fresh iterator so nothing is prefetched while another runs; in a round the PIL arms process
the images their tf.data arm did (the epoch's order from the round's step on); each round
lies inside one epoch (a long run's epochs are thousands of steps). Prints medians,
ratios of medians and medians of the rounds' ratios. Pin it to one core to measure per core:

  taskset -c 0 python -m benchmarks.input_pipeline --rounds=5
"""

import multiprocessing
import os
import pathlib
import platform
import statistics
import struct
import tempfile
import time
from typing import Callable

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from alexnet_jax import data_sources
from alexnet_jax import input_pipeline
from alexnet_jax import prepare
from alexnet_jax import preprocessing
from configs import imagenet

_PHOTOS = flags.DEFINE_string(
    'photos', str(pathlib.Path(__file__).resolve().parents[2] / 'shared/data/imagenet-samples'),
    'Folder of JPEG photos (WNID_name.JPEG).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds.')
_BATCHES = flags.DEFINE_integer('batches', 12, 'Batches timed per round.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per batch.')
_COPIES = flags.DEFINE_integer('copies', 4, 'Times each photo appears in the epoch.')

EIGVAL = np.array(preprocessing.PCA_EIGVAL, np.float32) * 255
EIGVEC = np.array(preprocessing.PCA_EIGVEC, np.float32)

# A PIL job's image: a JPEG file's path, or (shard path, offset, length) of a prepared record.
Location = str | tuple[str, int, int]


def make_folder(photos: pathlib.Path, root: pathlib.Path, copies: int) -> int:
  """ROOT/train/<photo>/<copy>.JPEG symlinks, one class per photo; returns the class count."""
  paths = sorted(photos.glob('*.JPEG'))
  for path in paths:
    class_dir = root / 'train' / path.stem
    class_dir.mkdir(parents=True)
    for copy in range(copies):
      (class_dir / f'{copy}.JPEG').symlink_to(path)
  return len(paths)


def record_locations(shards: list[str]) -> dict[str, tuple[str, int, int]]:
  """{image/filename: (shard, offset, length) of its serialized tf.train.Example}, from the
  TFRecord framing (uint64 length, uint32 CRC, data, uint32 CRC), no TensorFlow."""
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  locations = {}
  for shard in shards:
    with open(shard, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]
      key = example_pb2.Example.FromString(record).features.feature['image/filename']
      locations[key.bytes_list.value[0].decode()] = (shard, offset + 12, length)
      offset += 16 + length
  return locations


def _open_image(location: Location) -> Image.Image:
  """The image at a location: a JPEG file, or the JPEG bytes of a prepared record (read with
  one seek, parsed as a tf.train.Example)."""
  if isinstance(location, str):
    return Image.open(location)
  import io  # pylint: disable=g-import-not-at-top
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  shard, offset, length = location
  with open(shard, 'rb') as f:
    f.seek(offset)
    example = example_pb2.Example.FromString(f.read(length))
  return Image.open(io.BytesIO(example.features.feature['image/encoded'].bytes_list.value[0]))


def pil_augment(location: Location,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """The same augmentation with PIL and NumPy: uint8 [224, 224, 3] and its shift float32 [3]."""
  image = _open_image(location).convert('RGB')
  width, height = image.size
  if (width, height) != (256, 256):  # A prepared canvas is one already.
    scale = 256 / min(width, height)
    image = image.resize((max(256, int(width * scale)), max(256, int(height * scale))),
                         Image.BILINEAR)
  left, top = (image.size[0] - 256) // 2, (image.size[1] - 256) // 2
  pixels = np.asarray(image.crop((left, top, left + 256, top + 256)))
  y, x = rng.integers(0, 256 - 224 + 1, size=2)
  pixels = pixels[y:y + 224, x:x + 224]
  if rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels), EIGVEC @ (rng.normal(0, 0.1, 3).astype(np.float32) *
                                                 EIGVAL)


def pil_batch(job: tuple[list[Location], int]) -> dict[str, np.ndarray]:
  """A batch as create_train_iterator gives it: 'image' uint8 [b, 224, 224, 3], 'lighting'."""
  locations, seed = job
  rng = np.random.default_rng(seed)
  images, shifts = zip(*[pil_augment(location, rng) for location in locations])
  return {'image': np.stack(images), 'lighting': np.stack(shifts)}


def time_tf(config, start_step: int, num_batches: int) -> float:
  """Images/s of a fresh training iterator after its first batch (start-up excluded, as in a
  long run; the pool's workers are started beforehand too)."""
  iterator = input_pipeline.create_train_iterator(config, start_step=start_step)
  next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * config.batch_size / (time.perf_counter() - start)


def batch_keys(config, steps: range) -> list[list[str]]:
  """The keys (original file paths) of create_train_iterator's batches at these global steps."""
  source = data_sources.get_source(config)
  steps_per_epoch = source.num_examples(config.train_split) // config.batch_size
  orders = {}
  batches = []
  for step in steps:
    epoch, index = divmod(step, steps_per_epoch)
    if epoch not in orders:
      epoch_handles = source.handles(config.train_split, shuffle_seed=(config.seed, epoch))
      orders[epoch] = [handle['key'].decode() for handle in epoch_handles.as_numpy_iterator()]
    batches.append(orders[epoch][index * config.batch_size:(index + 1) * config.batch_size])
  return batches


def time_pil(pool, batches: list[list[Location]], first_seed: int) -> float:
  """Images/s of PIL batches of these images from a pool of worker processes."""
  jobs = [(locations, first_seed + i) for i, locations in enumerate(batches)]
  start = time.perf_counter()
  for _ in pool.imap(pil_batch, jobs):
    pass
  return sum(map(len, batches)) / (time.perf_counter() - start)


def _config(dataset: str, data_dir: str, num_classes: int, cores: int):
  config = imagenet.get_config()
  config.dataset, config.data_dir = dataset, data_dir
  config.eval_split = 'train'  # One split: prepared once.
  config.num_classes = num_classes
  config.batch_size = _BATCH_SIZE.value
  config.private_threadpool_size = 1 if cores == 1 else 0
  config.num_parallel_calls = 1 if cores == 1 else -1
  return config


def _summary(name: str, ours: list[float], theirs: list[float]) -> str:
  ratio = statistics.median(ours) / statistics.median(theirs)
  # A round's runs share the machine's load at the time: their ratio is steadier.
  per_round = statistics.median(a / b for a, b in zip(ours, theirs))
  return f'| {name} | {ratio:.2f}x | {per_round:.2f}x |'


def main(argv):
  del argv
  num_cores = os.cpu_count()
  with tempfile.TemporaryDirectory() as root:
    folder, output = pathlib.Path(root, 'folder'), pathlib.Path(root, 'prepared')
    num_classes = make_folder(pathlib.Path(_PHOTOS.value), folder, _COPIES.value)
    config = _config('folder', str(folder), num_classes, 1)
    start = time.perf_counter()
    prepare.prepare(config, str(output))  # One process: one core's worth (and a little).
    seconds = time.perf_counter() - start
    num_images = input_pipeline.get_dataset_info(config).num_train_examples
    size = sum(path.stat().st_size for path in output.glob('*.tfrecord'))
    print(f'prepared {num_images} images in {seconds:.1f} s: {num_images / seconds:.1f} '
          f'images/s (listing and tracing included), {size / num_images / 1024:.1f} KiB an image')
    locations = record_locations(sorted(map(str, output.glob('*.tfrecord'))))
    batch = next(input_pipeline.create_train_iterator(config))
    arrays = ', '.join(f'{name} {a.dtype} {list(a.shape)}' for name, a in batch.items())
    per_image = sum(a.nbytes for a in batch.values()) / len(batch['label'])
    print(f'bytes an image sent to the device: {per_image:,.0f} ({arrays})')

    # arm -> (config, pool, the PIL arm's locations of a key or None for a tf.data arm)
    arms: dict[tuple[str, str, int], tuple] = {}
    for cores in (1, num_cores):
      pool = multiprocessing.get_context('spawn').Pool(cores)
      for data, data_dir, locate in (('original', str(folder), str),
                                     ('prepared', str(output), locations.__getitem__)):
        dataset = 'folder' if data == 'original' else 'prepared'
        config = _config(dataset, data_dir, num_classes, cores)
        arms['tf.data', data, cores] = (config, None, None)
        arms['PIL', data, cores] = (config, pool, locate)
        time_tf(config, 0, 1)  # Warm up (listing, tracing).
        time_pil(pool, [[locate(k) for k in keys] for keys in batch_keys(config, range(cores))],
                 0)  # Start the workers.
    results = {arm: [] for arm in arms}
    steps_per_epoch = num_images // _BATCH_SIZE.value
    if steps_per_epoch < _BATCHES.value + 1:  # The untimed first batch, then the timed.
      raise app.UsageError(f'An epoch of {steps_per_epoch} batches cannot hold a round of '
                           f'{_BATCHES.value}: raise --copies.')
    for round_ in range(_ROUNDS.value):
      # Each round inside an epoch of its own: a new epoch builds (and traces) its dataset
      # again, once per 5,000 steps of ImageNet but once per round of this small epoch.
      step = (round_ + 1) * steps_per_epoch
      order = list(arms) if round_ % 2 == 0 else list(arms)[::-1]
      for arm in order:
        config, pool, locate = arms[arm]
        if pool is None:
          results[arm].append(time_tf(config, step, _BATCHES.value))
        else:
          # tf.data's timed batches: those after the first.
          keys = batch_keys(config, range(step + 1, step + 1 + _BATCHES.value))
          results[arm].append(time_pil(pool, [[locate(k) for k in b] for b in keys], step + 1))
      print(f'round {round_ + 1}: ' + ', '.join(
          f'{impl} {data} {cores} core(s) {values[-1]:.0f}'
          for (impl, data, cores), values in results.items()))
    for pool in {arm[1] for arm in arms.values() if arm[1] is not None}:
      pool.close()

  print(f'\n{platform.machine()}, {num_cores} cores, Python {platform.python_version()}, '
        f'TensorFlow {input_pipeline.tf.__version__}, Pillow {Image.__version__}, '
        f'NumPy {np.__version__}; {_ROUNDS.value} rounds of {_BATCHES.value} batches of '
        f'{_BATCH_SIZE.value}')
  print('| arm | cores | median img/s | rounds |\n|---|---|---|---|')
  for (impl, data, cores), values in results.items():
    print(f'| {impl} {data} | {cores} | {statistics.median(values):.0f} | '
          f'{", ".join(f"{v:.0f}" for v in values)} |')
  print('\n| comparison | ratio of medians | median of per-round ratios |\n|---|---|---|')
  get: Callable[..., list[float]] = lambda *arm: results[arm]  # pylint: disable=unnecessary-lambda-assignment
  for cores in (1, num_cores):
    print(_summary(f'{cores} core(s): tf.data prepared / tf.data original',
                   get('tf.data', 'prepared', cores), get('tf.data', 'original', cores)))
    print(_summary(f'{cores} core(s): tf.data prepared / PIL prepared',
                   get('tf.data', 'prepared', cores), get('PIL', 'prepared', cores)))
    print(_summary(f'{cores} core(s): tf.data original / PIL original',
                   get('tf.data', 'original', cores), get('PIL', 'original', cores)))


if __name__ == '__main__':
  app.run(main)
