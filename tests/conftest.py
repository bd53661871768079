"""Shared test fixtures.

Tests run on 4 fake CPU devices so that pmap and the collectives really run; the flag has to be
set before JAX is first imported, which is why it lives here.
"""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pathlib  # pylint: disable=g-import-not-at-top

import pytest  # pylint: disable=g-import-not-at-top

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'


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
