"""uint8 batches to the device: `normalize` does the float arithmetic tf.data used to do.

It starts from the uint8 crop the host now makes (rounded once where the host resamples), so
these tests check the device's arithmetic and the choices that travel with the batch, not
bit-equality with the old float path on resampled images.

The reference is NumPy, by hand from the formulas (shared/docs/alexnet-facts.md and
docs/input_pipeline.md), in the order the tf.data float path computed them: for the uint8 crop
at offset (y, x) of the canvas, (crop - the mean's window), mirrored if flipped, plus the PCA
shift, divided by the std. With a mean image each training crop is also found in its photo's
canvas at its offset, so the offsets and flips that travel with the batch are the crop's own;
evaluation crops are checked against the 10-crop geometry written out here.
"""

import jax
import numpy as np
import pytest

from alexnet_jax import data_sources
from alexnet_jax import input_pipeline
from alexnet_jax import normalize
from alexnet_jax import preprocessing
from configs import imagenet

SIZE, CANVAS = 32, 40
# float32 rounding: a few ulps of values up to ~5 (divided by std) or ~255.
RTOL = 1e-5


@pytest.fixture(scope='module')
def folder(tmp_path_factory, imagenette_dir):
  """Two Imagenette classes, 4 train and 2 val photos each (symlinks)."""
  root = tmp_path_factory.mktemp('normalize_folder')
  classes = sorted(path.name for path in (imagenette_dir / 'train').iterdir())[:2]
  for split, count in (('train', 4), ('val', 2)):
    for name in classes:
      (root / split / name).mkdir(parents=True)
      for path in sorted((imagenette_dir / split / name).iterdir())[:count]:
        (root / split / name / path.name).symlink_to(path)
  return root


@pytest.fixture(scope='module')
def mean_image_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('mean') / 'mean.npy'
  rng = np.random.default_rng(0)
  np.save(path, rng.uniform(60, 200, (CANVAS, CANVAS, 3)).astype(np.float32))
  return str(path)


def _config(root, **overrides):
  config = imagenet.get_config()
  config.update(dataset='folder', data_dir=str(root), eval_split='val', num_classes=2,
                image_size=SIZE, resize_size=CANVAS, batch_size=8, eval_batch_size=4,
                num_devices=1)
  config.update(overrides)
  return config


def _canvases(config, split):
  """uint8 canvases [n, R, R, 3] of the split's photos (the host's part, as tf.data does it)."""
  source = data_sources.get_source(config)
  options = input_pipeline.preprocessing_options(config)
  return np.stack([preprocessing.canvas(source.load(handle), options).numpy()
                   for handle in source.handles(split)])


def _reference(crop, mean, lighting, std, offset, flip):
  """NumPy float32: (crop - mean's window) mirrored if flip, + lighting, / std. crop: the
  unmirrored uint8 [S, S, 3]."""
  image = crop.astype(np.float32)
  if mean is not None:
    if mean.ndim == 3:
      mean = mean[offset[0]:offset[0] + SIZE, offset[1]:offset[1] + SIZE]
    image = image - mean
  if flip:
    image = image[:, ::-1]
  if lighting is not None:
    image = image + lighting
  return image if std is None else image / std


def _device(config, batch):
  fn = jax.jit(normalize.for_config(config).__call__)
  return np.asarray(fn({name: batch[name] for name in batch if name not in ('label', 'mask')}))


def _assert_close(got, expected):
  scale = np.abs(expected).max()
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize('overrides', [
    dict(),  # The paper's default: channel mean, PCA lighting 0.1.
    dict(divide_by_std=True),
    dict(mean_subtraction='pixel', divide_by_255=True, pca_lighting_std=0.0),
    dict(mean_subtraction='pixel', divide_by_std=True),
    dict(mean_subtraction='none', pca_lighting_std=0.0),
])
def test_train_batch_on_the_device_equals_the_float_path(folder, mean_image_path, overrides):
  config = _config(folder, mean_image_path=mean_image_path, **overrides)
  batch = next(input_pipeline.create_train_iterator(config))
  assert batch['image'].dtype == np.uint8 and batch['image'].shape == (8, SIZE, SIZE, 3)
  lighting = config.pca_lighting_std > 0
  assert ('lighting' in batch) == lighting
  assert ('offset' in batch) == (config.mean_subtraction == 'pixel')
  mean, std = input_pipeline.pixel_statistics(config)
  canvases = _canvases(config, 'train')
  got = _device(config, batch)
  flips = 0
  for i, image in enumerate(batch['image']):
    if 'offset' in batch:
      (y, x), flip = batch['offset'][i], bool(batch['flip'][i])
      crop = image[:, ::-1] if flip else image
      # The crop is its photo's canvas window at the offset (up to the uint8 rounding of
      # resizing only the window), so the offset and flip are the crop's own.
      windows = canvases[:, y:y + SIZE, x:x + SIZE].astype(int)
      assert np.abs(windows - crop).max(axis=(1, 2, 3)).min() <= 1
    else:  # Without a mean image the reference needs no offset, nor the flip.
      y = x = None
      crop, flip = image, False
    flips += flip
    expected = _reference(crop, mean, batch['lighting'][i] if lighting else None, std,
                          (y, x), flip)
    _assert_close(got[i], expected)
  if 'offset' in batch:
    assert 0 < flips < 8  # Both kinds seen (fixed by the seed).


@pytest.mark.parametrize('crops,overrides', [
    (10, dict(mean_subtraction='pixel', divide_by_std=True)),
    (10, dict(divide_by_255=True)),
    (1, dict(mean_subtraction='pixel')),
])
def test_eval_batch_on_the_device_equals_the_float_path(folder, mean_image_path, crops,
                                                         overrides):
  config = _config(folder, mean_image_path=mean_image_path, **overrides)
  batch = next(iter(input_pipeline.create_eval_iterator(config, crops=crops)))
  mean, std = input_pipeline.pixel_statistics(config)
  canvases = _canvases(config, 'val')[:4]
  far, centre = CANVAS - SIZE, (CANVAS - SIZE) // 2
  # torchvision's TenCrop order: 4 corners, centre, then their mirrors.
  views = [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]
  views = [(o, False) for o in views] + [(o, True) for o in views] if crops == 10 else [
      ((centre, centre), False)]
  got = _device(config, batch).reshape(4, len(views), SIZE, SIZE, 3)
  pixels = batch['image'].reshape(4, len(views), SIZE, SIZE, 3)
  for i, canvas in enumerate(canvases):
    for k, ((y, x), flip) in enumerate(views):
      crop = canvas[y:y + SIZE, x:x + SIZE]
      np.testing.assert_array_equal(pixels[i, k], crop[:, ::-1] if flip else crop)
      _assert_close(got[i, k], _reference(crop, mean, None, std, (y, x), flip))


def test_a_batch_crosses_to_the_device_in_a_quarter_of_the_bytes(folder):
  batch = next(input_pipeline.create_train_iterator(_config(folder, image_size=224,
                                                            resize_size=256)))
  per_image = sum(array.nbytes for array in batch.values()) / 8
  # uint8 pixels, float32 lighting [3], int32 label; float32 pixels were 602,112 + 4.
  assert per_image == 224 * 224 * 3 + 3 * 4 + 4 == 150_544
