"""Per-example preprocessing against PIL and NumPy, on real ImageNet photos."""

import io

import numpy as np
from PIL import Image
import pytest

from alexnet_jax import input_pipeline  # pylint: disable=unused-import  (keeps TF off GPUs)
from alexnet_jax import preprocessing
import tensorflow as tf  # pylint: disable=g-bad-import-order

PHOTOS = ('n01443537_goldfish.JPEG',  # 376x263
          'n01534433_junco.JPEG',  # 500x375
          'n03692522_loupe.JPEG')  # grey, 334x500
GREY_PHOTO = 'n02823750_beer_glass.JPEG'


def _options(**kwargs) -> preprocessing.Options:
  defaults = dict(image_size=224, resize_size=256, random_flip=False, pca_lighting_std=0.0)
  return preprocessing.Options(**{**defaults, **kwargs})


def _pil_canvas(image: Image.Image, size: int = 256) -> np.ndarray:
  """The paper's canvas with PIL: central square, bilinear (antialiased) to size x size."""
  width, height = image.size
  side = min(width, height)
  x, y = (width - side) // 2, (height - side) // 2
  square = image.convert('RGB').crop((x, y, x + side, y + side))
  return np.asarray(square.resize((size, size), Image.BILINEAR), np.float32)


def _encode(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, quality=95) if fmt == 'JPEG' else image.save(buffer, fmt)
  return buffer.getvalue()


@pytest.fixture(scope='module')
def photos(imagenet_samples_dir):
  return {name: (imagenet_samples_dir / name).read_bytes() for name in PHOTOS + (GREY_PHOTO,)}


@pytest.mark.parametrize('name', PHOTOS)
def test_canvas_matches_pil(photos, name):
  canvas = preprocessing.canvas(tf.constant(photos[name]), _options()).numpy()
  expected = _pil_canvas(Image.open(io.BytesIO(photos[name])))
  assert canvas.shape == (256, 256, 3) and canvas.dtype == np.uint8
  # Both round to uint8; TF's antialiased bilinear is the same filter as PIL's.
  assert np.abs(canvas - expected).mean() < 0.5
  assert np.abs(canvas - expected).max() < 3


def test_shorter_side_resize_matches_pil(photos):
  name = PHOTOS[1]
  canvas = preprocessing.canvas(tf.constant(photos[name]), _options(), square=False).numpy()
  image = Image.open(io.BytesIO(photos[name]))
  width, height = image.size
  expected = np.asarray(image.resize((width * 256 // height, 256), Image.BILINEAR), np.float32)
  assert canvas.shape == expected.shape == (256, 341, 3)
  assert np.abs(canvas - expected).mean() < 0.5


def test_decodes_grey_cmyk_and_png_named_jpeg(photos):
  grey = Image.open(io.BytesIO(photos[GREY_PHOTO]))
  assert grey.mode == 'L'
  decoded = preprocessing.decode_and_crop(tf.constant(photos[GREY_PHOTO]),
                                          preprocessing.whole_image).numpy()
  np.testing.assert_array_equal(decoded, np.repeat(np.asarray(grey)[..., None], 3, axis=-1))

  rgb = Image.open(io.BytesIO(photos[PHOTOS[0]])).convert('RGB')
  cmyk = _encode(rgb.convert('CMYK'), 'JPEG')
  decoded = preprocessing.decode_and_crop(tf.constant(cmyk), preprocessing.central_square)
  expected = np.asarray(Image.open(io.BytesIO(cmyk)).convert('RGB'))
  side = min(expected.shape[:2])
  y, x = (expected.shape[0] - side) // 2, (expected.shape[1] - side) // 2
  np.testing.assert_array_equal(decoded.numpy(), expected[y:y + side, x:x + side])

  png = _encode(rgb, 'PNG')  # ImageNet has PNG files named .JPEG.
  assert not tf.io.is_jpeg(png)
  decoded = preprocessing.decode_and_crop(tf.constant(png), preprocessing.whole_image)
  np.testing.assert_array_equal(decoded.numpy(), np.asarray(rgb))


def test_truncated_jpeg_fails_to_decode(photos):
  truncated = photos[PHOTOS[1]][:len(photos[PHOTOS[1]]) // 2]
  with pytest.raises(tf.errors.InvalidArgumentError):
    preprocessing.canvas(tf.constant(truncated), _options())


def _train_images(data: bytes, options: preprocessing.Options,
                  num: int) -> dict[str, np.ndarray]:
  """train_image for seeds (0, 0) ... (0, num - 1), stacked: 'image' [num, S, S, 3], ..."""
  seeds = tf.data.Dataset.range(num).map(lambda i: tf.stack([tf.constant(0, tf.int64), i]))
  images = seeds.map(lambda seed: preprocessing.train_image(tf.constant(data), seed, options))
  return next(images.batch(num).as_numpy_iterator())


def _find_offset(crop: np.ndarray, canvas: np.ndarray) -> tuple[int, int]:
  """The (y, x) where crop sits in canvas (up to the rounding of resizing the window alone,
  1 of 255); raises if nowhere."""
  size, crop, canvas = crop.shape[0], crop.astype(int), canvas.astype(int)
  for y in range(canvas.shape[0] - size + 1):
    for x in range(canvas.shape[1] - size + 1):
      if (np.abs(canvas[y, x:x + size] - crop[0]).max() <= 1 and
          np.abs(canvas[y:y + size, x:x + size] - crop).max() <= 1):
        return y, x
  raise AssertionError('the crop is not a window of the canvas')


@pytest.mark.parametrize('square', [True, False])
def test_paper_crops_are_windows_of_the_canvas(photos, square):
  # keep_window (for a mean image, square canvases only): the offsets travel with the crops.
  options = _options(center_crop_train=square, keep_window=square)
  data = photos[PHOTOS[0]]  # 376x263.
  canvas = preprocessing.canvas(tf.constant(data), options, square=square).numpy()
  assert canvas.shape == ((256, 256, 3) if square else (256, 365, 3))
  images = _train_images(data, options, 12)
  crops = images['image']
  assert crops.shape == (12, 224, 224, 3) and crops.dtype == np.uint8
  offsets = [_find_offset(crop, canvas) for crop in crops]
  assert all(0 <= y <= canvas.shape[0] - 224 and 0 <= x <= canvas.shape[1] - 224
             for y, x in offsets)
  assert len(set(offsets)) >= 10  # Uniform over the offsets.
  if square:
    np.testing.assert_array_equal(images['offset'], offsets)
    assert not images['flip'].any()  # random_flip=False.
  else:
    assert 'offset' not in images
  np.testing.assert_array_equal(crops, _train_images(data, options, 12)['image'])  # Seeded.


@pytest.mark.parametrize('subsampling, channels, keep_aspect, decode_window', [
    ('4:4:4', 3, False, True),  # As alexnet_jax.prepare writes its canvases.
    ('4:4:4', 1, False, True),  # Grey runs.
    ('4:4:4', 3, True, True),  # prepare --keep_aspect: shorter side 256.
    # Chroma at half resolution: a window's edges would differ, so such sources decode whole.
    ('4:2:0', 3, False, False),
])
def test_a_canvas_jpeg_gives_the_crops_of_decoding_it_whole(photos, subsampling, channels,
                                                            keep_aspect, decode_window):
  """A prepared canvas decodes only the crop's window: the pixels must be those of decoding
  the whole JPEG and cropping there (libjpeg via TF, and PIL's decoder)."""
  photo = Image.open(io.BytesIO(photos[PHOTOS[1]])).convert('RGB')  # 500x375.
  canvas = (photo.resize((341, 256), Image.BILINEAR) if keep_aspect else
            Image.fromarray(_pil_canvas(photo).astype(np.uint8)))
  buffer = io.BytesIO()
  canvas.save(buffer, 'JPEG', quality=90, subsampling=subsampling)
  data = buffer.getvalue()
  options = _options(channels=channels, center_crop_train=not keep_aspect, random_flip=False,
                     decode_window=decode_window)
  crops = _train_images(data, options, 16)['image']
  whole = tf.io.decode_jpeg(data, channels=channels, dct_method='INTEGER_ACCURATE').numpy()
  pil = np.asarray(Image.open(io.BytesIO(data)).convert('L' if channels == 1 else 'RGB'))
  if channels == 3:  # PIL's grey conversion rounds otherwise than libjpeg's.
    np.testing.assert_array_equal(whole, pil)
  found = set()
  for crop in crops:
    found.add(_find_exact(crop, whole))
  assert len(found) >= 12  # Random offsets, each a window of the whole decode, bit for bit.


def _find_exact(crop: np.ndarray, image: np.ndarray) -> tuple[int, int]:
  """The (y, x) where crop equals a window of image exactly; raises if nowhere."""
  size = crop.shape[0]
  for y in range(image.shape[0] - size + 1):
    for x in range(image.shape[1] - size + 1):
      if np.array_equal(image[y:y + size, x:x + size], crop):
        return y, x
  raise AssertionError('the crop is no window of the whole decode')


def test_flips_half_the_time():
  pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  options = _options(image_size=8, resize_size=8, encoded=False, random_flip=True,
                     keep_window=True)
  drawn = _train_images(pixels, options, 400)
  images = drawn['image']
  flipped = [np.array_equal(image, pixels[:, ::-1]) for image in images]
  assert all(f or np.array_equal(image, pixels) for f, image in zip(flipped, images))
  assert 0.4 < np.mean(flipped) < 0.6  # 5 standard deviations of a fair coin.
  np.testing.assert_array_equal(drawn['flip'], flipped)  # The flag the device is given.


def test_pca_lighting_formula_and_statistics():
  eigval = np.array(preprocessing.PCA_EIGVAL) * 255
  eigvec = np.array(preprocessing.PCA_EIGVEC)
  seed = tf.constant([3, 4], tf.int64)
  alpha = tf.random.stateless_normal([3], seed, stddev=0.1).numpy()
  np.testing.assert_allclose(preprocessing.pca_lighting(seed, 0.1).numpy(),
                             eigvec @ (alpha * eigval), rtol=1e-5, atol=1e-4)

  num = 4000
  shifts = tf.data.Dataset.range(num).map(
      lambda i: preprocessing.pca_lighting(tf.stack([tf.constant(7, tf.int64), i]), 0.1))
  shifts = np.stack(list(shifts.as_numpy_iterator()))
  coefficients = shifts @ eigvec  # Along the eigenvectors: alpha * eigval.
  std = 0.1 * eigval
  assert np.all(np.abs(coefficients.mean(axis=0)) < 4 * std / np.sqrt(num))
  np.testing.assert_allclose(coefficients.std(axis=0), std, rtol=0.05)


def test_lighting_travels_with_the_pixels(photos):
  data = photos[PHOTOS[1]]
  plain = _train_images(data, _options(), 2)
  lit = _train_images(data, _options(pca_lighting_std=0.1), 2)
  assert 'lighting' not in plain
  np.testing.assert_array_equal(lit['image'], plain['image'])  # The device adds the shift.
  seeds = [tf.random.experimental.stateless_split(tf.constant([0, i], tf.int64), 3)[2]
           for i in range(2)]
  np.testing.assert_array_equal(
      lit['lighting'], np.stack([preprocessing.pca_lighting(s, 0.1).numpy() for s in seeds]))
  assert np.all(np.abs(lit['lighting']) > 1e-3)


@pytest.mark.parametrize('area_min', [0.08, 0.35])
def test_random_resized_windows(area_min):
  shape = tf.constant([375, 500])
  windows = tf.data.Dataset.range(500).map(lambda i: preprocessing.random_resized_window(
      shape, tf.stack([tf.constant(0, tf.int64), i]), area_min))
  y, x, height, width = np.stack(list(windows.as_numpy_iterator())).T
  assert np.all((y >= 0) & (x >= 0) & (y + height <= 375) & (x + width <= 500))
  area = height * width / (375 * 500)
  assert area_min - 0.01 <= area.min() < area_min + 0.05 and area.max() <= 1.0
  ratio = width / height
  assert np.all((ratio > 3 / 4 * 0.95) & (ratio < 4 / 3 * 1.05))
  assert np.ptp(area) > 0.5  # They do vary.


def test_random_resized_train_image(photos):
  options = _options(train_crop='random_resized', random_flip=True, pca_lighting_std=0.1)
  drawn = _train_images(photos[PHOTOS[1]], options, 3)
  images = drawn['image']
  assert images.shape == (3, 224, 224, 3) and images.dtype == np.uint8
  assert not np.array_equal(images[0], images[1])
  assert drawn['lighting'].shape == (3, 3)


def test_ten_crops_are_corners_centre_and_mirrors(photos):
  data = photos[PHOTOS[2]]
  options = _options()
  crops = preprocessing.eval_image(tf.constant(data), options, crops=10)['image'].numpy()
  canvas = _pil_canvas(Image.open(io.BytesIO(data)))
  views = [canvas[:224, :224], canvas[:224, 32:], canvas[32:, :224], canvas[32:, 32:],
           canvas[16:240, 16:240]]
  views += [view[:, ::-1] for view in views]
  assert crops.shape == (10, 224, 224, 3)
  for crop, view in zip(crops, views):
    assert np.abs(crop - view).mean() < 0.5
  centre = preprocessing.eval_image(tf.constant(data), options)['image'].numpy()
  # Resized as a window: float rounding, then uint8's.
  np.testing.assert_allclose(centre, crops[4], atol=1)
