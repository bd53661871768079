"""Shared test fixtures.

Tests run on 4 fake CPU devices so that pmap and the collectives really run, with XLA:CPU's
Eigen convolutions as the commands take them; the flags have to be set before JAX starts its
backend, which is why they live here.
"""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pathlib  # pylint: disable=g-import-not-at-top

# Importing the package before JAX starts adds cpu_convolutions.XLA_FLAG, as the commands run.
import alexnet_jax  # pylint: disable=g-import-not-at-top,unused-import

import pytest  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def env(tmp_path_factory) -> dict[str, str]:
  """The environment of the tests' `python -m alexnet_jax...` subprocesses: the repository on
  the path, 2 fake CPU devices, and one JAX compilation cache for the whole session, so that a
  program the modules share (the TINY run's steps) compiles once."""
  cache = tmp_path_factory.mktemp('jax_cache')
  return {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_COMPILATION_CACHE_DIR': str(cache),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}


@pytest.fixture(scope='session')
def imagenet_samples_dir() -> pathlib.Path:
  """The 300 real ImageNet photos of original sizes (read in place)."""
  return SHARED_DATA / 'imagenet-samples'


@pytest.fixture(scope='session')
def imagenette_dir() -> pathlib.Path:
  """Imagenette at 224 px in the ImageFolder layout (read in place)."""
  return SHARED_DATA / 'imagenette2-224'


@pytest.fixture(scope='session')
def small_real_batch(imagenet_samples_dir):
  """8 real photos squashed to 64x64, normalised per channel as torchvision does, labels 0..7.

  Returns {'image': float32 [8, 64, 64, 3], 'label': int32 [8]}: a fixed batch for step tests.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  files = sorted(imagenet_samples_dir.glob('*.JPEG'))[:8]
  images = np.stack([np.asarray(Image.open(f).convert('RGB').resize((64, 64)), np.float32)
                     for f in files])
  images -= np.array([123.675, 116.28, 103.53], np.float32)
  images /= np.array([58.395, 57.12, 57.375], np.float32)
  return {'image': images, 'label': np.arange(8, dtype=np.int32)}


@pytest.fixture(scope='session')
def folder_with_bad_files(tmp_path_factory, imagenet_samples_dir, imagenette_dir):
  """An image folder of two Imagenette classes, 3 real photos each (symlinks), plus a
  truncated JPEG (first class) and a text file named .JPEG (second), in both `train` and
  `val`."""
  root = tmp_path_factory.mktemp('bad_files')
  photo = (imagenet_samples_dir / 'n01534433_junco.JPEG').read_bytes()  # Landscape.
  classes = sorted(path.name for path in (imagenette_dir / 'train').iterdir())[:2]
  for split in ('train', 'val'):
    for name in classes:
      (root / split / name).mkdir(parents=True)
      for path in sorted((imagenette_dir / 'train' / name).iterdir())[:3]:
        (root / split / name / path.name).symlink_to(path)
    (root / split / classes[0] / 'truncated.JPEG').write_bytes(photo[:len(photo) // 2])
    (root / split / classes[1] / 'not_an_image.JPEG').write_text('hello')
  return root


@pytest.fixture(scope='session')
def tiny_imagenette(tmp_path_factory, imagenette_dir):
  """Imagenette's 10 classes, 4 train and 2 val photos each (the first in sorted order,
  symlinked): 40 train and 20 val examples."""
  root = tmp_path_factory.mktemp('tiny_imagenette')
  for split, count in (('train', 4), ('val', 2)):
    for class_dir in sorted((imagenette_dir / split).iterdir()):
      (root / split / class_dir.name).mkdir(parents=True)
      for path in sorted(class_dir.iterdir())[:count]:
        (root / split / class_dir.name / path.name).symlink_to(path)
  return root


@pytest.fixture(scope='session')
def tiny_runs(tmp_path_factory, tiny_imagenette):
  """Two trained workdirs {'a': path, 'b': path} of the paper AlexNet at 63 px (its smallest
  input) on `tiny_imagenette`: two models one SGD step apart.

  'a' is trained here, in this process, for 2 steps of batch 20 (one epoch), checkpointed
  after each and evaluated at the end (eval batch 16: the second of its two batches padded).
  'b' is a copy of 'a' without its last checkpoint, so its model is a's after step 1: a second
  trained model without a second compilation of the train step.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  from alexnet_jax import train  # pylint: disable=g-import-not-at-top
  from configs import imagenette  # pylint: disable=g-import-not-at-top
  config = imagenette.get_config()
  config.data_dir = str(tiny_imagenette)
  config.image_size, config.resize_size = 63, 66
  config.batch_size, config.eval_batch_size = 20, 16
  config.num_train_steps, config.warmup_epochs = 2, 0.0
  config.log_every_steps = config.checkpoint_every_steps = 1
  config.eval_every_epochs = 100.0  # Only at the end.
  runs = tmp_path_factory.mktemp('tiny_runs')
  train.train_and_evaluate(config, runs / 'a')
  shutil.copytree(runs / 'a', runs / 'b')
  shutil.rmtree(runs / 'b' / 'checkpoints' / '2')
  return {'a': runs / 'a', 'b': runs / 'b'}
