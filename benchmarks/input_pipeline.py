"""Training-augmentation throughput: our tf.data pipeline against PIL + NumPy in a process pool.

Both do the paper's training augmentation on the real ImageNet photos of shared/data (original
sizes, repeated): decode, shorter side to 256 and the central 256x256 (antialiased bilinear),
a random 224 crop, a random mirror, PCA lighting noise and the per-channel mean. Ours runs
through create_train_iterator on an image folder; the reference is what a PyTorch DataLoader
worker does (PIL in worker processes, batches pickled back). Each is timed on one core
(private_threadpool_size=1 / a 1-process pool) and on all cores, interleaved A B A B over
several rounds, each round from a fresh iterator so nothing is prefetched while the other
runs; in a round both process the same images (the epoch's order from the round's step on).
Prints medians, their ratio and the median of the rounds' ratios.

  python -m benchmarks.input_pipeline --rounds=5
"""

import multiprocessing
import os
import pathlib
import platform
import statistics
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from alexnet_jax import data_sources
from alexnet_jax import input_pipeline
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
MEAN = np.array(preprocessing.IMAGENET_MEAN_RGB, np.float32)


def make_folder(photos: pathlib.Path, root: pathlib.Path, copies: int) -> int:
  """ROOT/train/<photo>/<copy>.JPEG symlinks, one class per photo; returns the class count."""
  paths = sorted(photos.glob('*.JPEG'))
  for path in paths:
    class_dir = root / 'train' / path.stem
    class_dir.mkdir(parents=True)
    for copy in range(copies):
      (class_dir / f'{copy}.JPEG').symlink_to(path)
  return len(paths)


def pil_augment(path: str, rng: np.random.Generator) -> np.ndarray:
  """The same augmentation with PIL and NumPy: float32 [224, 224, 3]."""
  image = Image.open(path).convert('RGB')
  width, height = image.size
  scale = 256 / min(width, height)
  image = image.resize((max(256, int(width * scale)), max(256, int(height * scale))),
                       Image.BILINEAR)
  left, top = (image.size[0] - 256) // 2, (image.size[1] - 256) // 2
  pixels = np.asarray(image.crop((left, top, left + 256, top + 256)), np.float32)
  y, x = rng.integers(0, 256 - 224 + 1, size=2)
  pixels = pixels[y:y + 224, x:x + 224]
  if rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  shift = EIGVEC @ (rng.normal(0, 0.1, 3).astype(np.float32) * EIGVAL)
  return pixels + (shift - MEAN)


def pil_batch(job: tuple[list[str], int]) -> np.ndarray:
  paths, seed = job
  rng = np.random.default_rng(seed)
  return np.stack([pil_augment(path, rng) for path in paths])


def time_tf(config, start_step: int, num_batches: int) -> float:
  """Images/s of a fresh training iterator after its first batch (start-up excluded, as in a
  long run; the pool's workers are started beforehand too)."""
  iterator = input_pipeline.create_train_iterator(config, start_step=start_step)
  next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * config.batch_size / (time.perf_counter() - start)


def batch_paths(config, steps: range) -> list[list[str]]:
  """The files of create_train_iterator's batches at these global steps."""
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


def time_pil(pool, batches: list[list[str]], first_seed: int) -> float:
  """Images/s of PIL batches of these files from a pool of worker processes."""
  jobs = [(paths, first_seed + i) for i, paths in enumerate(batches)]
  start = time.perf_counter()
  for _ in pool.imap(pil_batch, jobs):
    pass
  return sum(map(len, batches)) / (time.perf_counter() - start)


def main(argv):
  del argv
  num_cores = os.cpu_count()
  with tempfile.TemporaryDirectory() as root:
    num_classes = make_folder(pathlib.Path(_PHOTOS.value), pathlib.Path(root), _COPIES.value)
    configs, pools = {}, {}
    for cores in (1, num_cores):
      config = imagenet.get_config()
      config.dataset = 'folder'
      config.data_dir = root
      config.eval_split = 'train'
      config.num_classes = num_classes
      config.batch_size = _BATCH_SIZE.value
      config.private_threadpool_size = 1 if cores == 1 else 0
      config.num_parallel_calls = 1 if cores == 1 else -1
      configs[cores] = config
      pools[cores] = multiprocessing.get_context('spawn').Pool(cores)
      time_pil(pools[cores], batch_paths(config, range(cores)), 0)  # Start the workers.
      time_tf(config, 0, 1)  # Warm up (listing, tracing).
    results = {(impl, cores): [] for impl in ('tf.data', 'PIL') for cores in configs}
    for round_ in range(_ROUNDS.value):
      for cores, config in configs.items():
        step = (round_ + 1) * (_BATCHES.value + 1)
        results['tf.data', cores].append(time_tf(config, step, _BATCHES.value))
        # tf.data's timed batches: those after the first.
        batches = batch_paths(config, range(step + 1, step + 1 + _BATCHES.value))
        results['PIL', cores].append(time_pil(pools[cores], batches, step + 1))
      print(f'round {round_ + 1}: ' + ', '.join(
          f'{impl} {cores} core(s) {values[-1]:.0f}' for (impl, cores), values in
          results.items()))
    for pool in pools.values():
      pool.close()

  print(f'\n{platform.machine()}, {num_cores} cores, Python {platform.python_version()}, '
        f'TensorFlow {input_pipeline.tf.__version__}, Pillow {Image.__version__}, '
        f'NumPy {np.__version__}; {_ROUNDS.value} rounds of {_BATCHES.value} batches of '
        f'{_BATCH_SIZE.value}')
  print('| cores | tf.data img/s | PIL pool img/s | ratio of medians | median ratio per round |')
  print('|---|---|---|---|---|')
  for cores in configs:
    ours, theirs = results['tf.data', cores], results['PIL', cores]
    ratio = statistics.median(ours) / statistics.median(theirs)
    # A round's two runs share the machine's load at the time: their ratio is steadier.
    per_round = statistics.median(a / b for a, b in zip(ours, theirs))
    print(f'| {cores} | {statistics.median(ours):.0f} | {statistics.median(theirs):.0f} | '
          f'{ratio:.2f}x | {per_round:.2f}x |')


if __name__ == '__main__':
  app.run(main)
