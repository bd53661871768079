"""Per-example image preprocessing in TensorFlow: decode, crop, resize, flip, lighting, mean.

Functions of one example, no tf.data (input_pipeline maps them over datasets). Pixels stay on
the 0-255 scale, as in the paper and Caffe. Random choices come from stateless ops seeded by
the caller, so an example's augmentation is a function of its seed alone.

The paper's recipe (facts doc): rescale the shorter side to 256, take the central 256x256,
subtract the mean image; train on random 224 crops, their mirror images and PCA lighting noise;
test on 10 crops (4 corners, centre and their mirrors). We take the central square of the
decoded image and resize it to 256x256 (the same region, decoded only where needed).
"""

import dataclasses
import functools
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

# ImageNet per-channel RGB mean on 0-255 pixels (the torchvision / Flax constants).
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
# PCA of ImageNet RGB on [0, 1] (fb.resnet.torch, facts doc): eigenvalues and eigenvectors as
# columns, so an image's colour shift is EIGVEC @ (alpha * EIGVAL).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
# Inception-style random-resized crop (torchvision's RandomResizedCrop defaults).
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)

# A crop window: int32 [4] = (offset_y, offset_x, height, width).
WindowFn = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Options:
  """What preprocessing does; input_pipeline builds it from the config.

  Attributes:
    image_size: side S of the network input.
    resize_size: side R of the canvas the crops come from (the paper's 256).
    encoded: inputs are image files (scalar strings); False: pixels [h, w, 3].
    train_crop: 'paper' (random S crop of the canvas) or 'random_resized' (Inception style).
    center_crop_train: 'paper' crops come from the central square resized to R x R; False:
      from the whole image with its shorter side resized to R.
    random_flip: mirror training images with probability 1/2.
    pca_lighting_std: standard deviation of the lighting coefficients; 0 turns it off.
    mean: subtracted from the pixels: [3], or [R, R, 3] (a mean image; needs the square
      canvas); None subtracts nothing.
  """
  image_size: int
  resize_size: int
  encoded: bool = True
  train_crop: str = 'paper'
  center_crop_train: bool = True
  random_flip: bool = True
  pca_lighting_std: float = 0.1
  mean: Optional[np.ndarray] = None


def central_square(shape: tf.Tensor) -> tf.Tensor:
  """Window of the largest central square of an image of shape [h, w]."""
  side = tf.minimum(shape[0], shape[1])
  return tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])


def whole_image(shape: tf.Tensor) -> tf.Tensor:
  """Window covering an image of shape [h, w]."""
  return tf.stack([0, 0, shape[0], shape[1]])


def random_resized_window(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Inception-style window: 8-100% of the area, aspect ratio 3/4-4/3 (the whole image if 10
  tries fail)."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([shape, [3]], axis=0),
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed,
      min_object_covered=0.0,  # The area range alone bounds the crop.
      aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
      area_range=CROP_AREA_RANGE,
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def _crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], -1])


def decode_and_crop(data: tf.Tensor, window_fn: WindowFn, encoded: bool = True) -> tf.Tensor:
  """Decodes an image and crops a window of it.

  Args:
    data: an encoded image file, scalar string (JPEG, also CMYK or grey; PNG, GIF, BMP or WebP,
      whatever the file name says), or pixels [h, w, 3] when `encoded` is False.
    window_fn: maps the image's shape int32 [h, w] to the window to keep.
    encoded: whether `data` is a file.

  Returns:
    The window's pixels [h', w', 3] in RGB (uint8 for files).
  """
  if not encoded:
    return _crop(data, window_fn(tf.shape(data)[:2]))

  def jpeg():
    # Decodes only the window (libjpeg skips the rest). INTEGER_ACCURATE is libjpeg's default
    # DCT, PIL's too, so pixels equal PIL's.
    window = window_fn(tf.image.extract_jpeg_shape(data)[:2])
    return tf.image.decode_and_crop_jpeg(
        data, window, channels=3, dct_method='INTEGER_ACCURATE')

  def other():
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return _crop(image, window_fn(tf.shape(image)[:2]))

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def resize(image: tf.Tensor, size) -> tf.Tensor:
  """Bilinear resize to size (h, w), antialiased when shrinking as PIL does: float32."""
  return tf.image.resize(image, size, method='bilinear', antialias=True)


def shorter_side_size(shape: tf.Tensor, size: int) -> tf.Tensor:
  """(h, w) with the shorter side `size` and the aspect ratio kept (longer side floored)."""
  return shape * size // tf.minimum(shape[0], shape[1])


def canvas(data: tf.Tensor, options: Options, square: bool = True) -> tf.Tensor:
  """The image the crops come from, mean subtracted.

  Args:
    data: see decode_and_crop.
    options: see Options.
    square: the central square resized to R x R; False: the whole image, shorter side R.

  Returns:
    float32 [R, R, 3] (square) or [R, >= R, 3] / [>= R, R, 3].
  """
  size = options.resize_size
  if square:
    image = resize(decode_and_crop(data, central_square, options.encoded), (size, size))
  else:
    image = decode_and_crop(data, whole_image, options.encoded)
    image = resize(image, shorter_side_size(tf.shape(image)[:2], size))
  return subtract_mean(image, options.mean)


def subtract_mean(image: tf.Tensor, mean: Optional[np.ndarray]) -> tf.Tensor:
  """image - mean, broadcasting a [3] mean; the identity for None."""
  if mean is None:
    return image
  return image - tf.constant(mean, tf.float32)


def pca_lighting(seed: tf.Tensor, std: float) -> tf.Tensor:
  """The paper's colour shift, float32 [3] on 0-255 pixels: EIGVEC @ (alpha * EIGVAL * 255),
  alpha ~ N(0, std^2) drawn once per image."""
  alpha = tf.random.stateless_normal([3], seed, stddev=std)
  eigval = tf.constant(PCA_EIGVAL, tf.float32) * 255.0
  return tf.linalg.matvec(tf.constant(PCA_EIGVEC, tf.float32), alpha * eigval)


def train_image(data: tf.Tensor, seed: tf.Tensor, options: Options) -> tf.Tensor:
  """One augmented training image.

  Args:
    data: see decode_and_crop.
    seed: int [2], the seed of this example's random choices.
    options: see Options.

  Returns:
    float32 [S, S, 3].
  """
  size = options.image_size
  crop_seed, flip_seed, lighting_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  if options.train_crop == 'random_resized':
    window_fn = functools.partial(random_resized_window, seed=crop_seed)
    image = resize(decode_and_crop(data, window_fn, options.encoded), (size, size))
    image = subtract_mean(image, options.mean)
  else:
    image = canvas(data, options, square=options.center_crop_train)
    image = tf.image.stateless_random_crop(image, [size, size, 3], crop_seed)
  if options.random_flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if options.pca_lighting_std:
    image += pca_lighting(lighting_seed, options.pca_lighting_std)
  return tf.ensure_shape(image, [size, size, 3])


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central size x size crop of [h, w, c], at ((h - size) // 2, (w - size) // 2)."""
  y = (tf.shape(image)[0] - size) // 2
  x = (tf.shape(image)[1] - size) // 2
  return image[y:y + size, x:x + size]


def ten_crops(image: tf.Tensor, size: int) -> tf.Tensor:
  """The paper's test views of [h, w, 3]: [10, size, size, 3].

  Order (torchvision's TenCrop): top-left, top-right, bottom-left, bottom-right, centre, then
  the horizontal mirrors of those five in the same order.
  """
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size)]
  crops = [image[y:y + size, x:x + size] for y, x in corners]
  crops.append(center_crop(image, size))
  crops = tf.stack(crops)
  return tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)


def eval_image(data: tf.Tensor, options: Options, crops: int = 1) -> tf.Tensor:
  """A test image: crops of the square canvas.

  Args:
    data: see decode_and_crop.
    options: see Options (the augmentation fields are ignored).
    crops: 1 (the centre) or 10 (see ten_crops).

  Returns:
    float32 [S, S, 3], or [10, S, S, 3] for 10 crops.
  """
  size = options.image_size
  image = canvas(data, options, square=True)
  if crops == 10:
    return tf.ensure_shape(ten_crops(image, size), [10, size, size, 3])
  return tf.ensure_shape(center_crop(image, size), [size, size, 3])
