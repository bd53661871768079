"""Per-example image preprocessing in TensorFlow: decode, crop, resize, flip, lighting, mean.

Functions of one example, no tf.data (input_pipeline maps them over datasets). Pixels stay on
the 0-255 scale, as in the paper and Caffe. Random choices come from stateless ops seeded by
the caller, so an example's augmentation is a function of its seed alone.

The paper's recipe (facts doc): rescale the shorter side to 256, take the central 256x256,
subtract the mean image; train on random 224 crops, their mirror images and PCA lighting noise;
test on 10 crops (4 corners, centre and their mirrors; 5 unmirrored ones for data trained
without flips). We take the central square of the
decoded image and resize it to 256x256 (the same region, decoded only where needed).
"""

import dataclasses
import functools
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

# ImageNet per-channel RGB mean on 0-255 pixels (the torchvision / Flax constants).
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
# ImageNet per-channel RGB standard deviation on 0-255 pixels (torchvision's constants).
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
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
    encoded: inputs are image files (scalar strings); False: pixels [h, w, 1 or 3].
    channels: C of the output, 3 (RGB; grey files repeated) or 1 (grey; colour files and
      pixels reduced to their luminance, grey stays grey).
    train_crop: 'paper' (random S crop of the canvas) or 'random_resized' (Inception style).
    center_crop_train: 'paper' crops come from the central square resized to R x R; False:
      from the whole image with its shorter side resized to R.
    random_flip: mirror training images with probability 1/2.
    pca_lighting_std: standard deviation of the lighting coefficients; 0 turns it off.
    mean: subtracted from the pixels: [C], or [R, R, C] (a mean image; needs the square
      canvas); None subtracts nothing.
    std: [C] or [1]; the result (lighting noise included) is divided by it, as torchvision
      does ([1] = 255: d2l's [0, 1] pixels); None keeps the paper's 0-255 scale.
  """
  image_size: int
  resize_size: int
  encoded: bool = True
  channels: int = 3
  train_crop: str = 'paper'
  center_crop_train: bool = True
  random_flip: bool = True
  pca_lighting_std: float = 0.1
  mean: Optional[np.ndarray] = None
  std: Optional[np.ndarray] = None


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


def _with_channels(pixels: tf.Tensor, channels: int) -> tf.Tensor:
  """pixels [h, w, 1 or 3] as [h, w, channels]: grey repeated to RGB, or RGB reduced to its
  luminance (tf.image.rgb_to_grayscale, ITU-R 601 weights)."""
  if pixels.shape[-1] == channels:
    return pixels
  if channels == 3:
    return tf.image.grayscale_to_rgb(pixels)
  return tf.image.rgb_to_grayscale(pixels)


def decode_and_crop(data: tf.Tensor, window_fn: WindowFn, encoded: bool = True,
                    channels: int = 3) -> tf.Tensor:
  """Decodes an image and crops a window of it.

  Args:
    data: an encoded image file, scalar string (JPEG, also CMYK or grey; PNG, GIF, BMP or WebP,
      whatever the file name says), or pixels [h, w, 1 or 3] when `encoded` is False.
    window_fn: maps the image's shape int32 [h, w] to the window to keep.
    encoded: whether `data` is a file.
    channels: 3 (RGB) or 1 (grey) in the output, whatever the file or pixels hold.

  Returns:
    The window's pixels [h', w', channels] (uint8 for files).
  """
  if not encoded:
    data = _with_channels(data, channels)
    return _crop(data, window_fn(tf.shape(data)[:2]))

  def jpeg():
    # Decodes only the window (libjpeg skips the rest). INTEGER_ACCURATE is libjpeg's default
    # DCT, PIL's too, so pixels equal PIL's.
    window = window_fn(tf.image.extract_jpeg_shape(data)[:2])
    return tf.image.decode_and_crop_jpeg(
        data, window, channels=channels, dct_method='INTEGER_ACCURATE')

  def other():
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    return _crop(image, window_fn(tf.shape(image)[:2]))

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def resize(image: tf.Tensor, size, window: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Bilinear resize to size (h, w), antialiased when shrinking as PIL does: float32.

  With a window (y, x, h', w') of the resized image, only that window's pixels are computed:
  the values of resizing and then cropping (up to float rounding, < 0.01), for less work.
  An image already of that size (alexnet_jax.prepare's canvases) is only cropped: at scale 1
  the triangle filter's weights are 1 and 0, so the result is the same, bit for bit, without
  the resample's 2 ms or so an image (a prepared 256x256 JPEG decodes in about 1 ms).
  """
  def resample():
    if window is None:
      return tf.image.resize(image, size, method='bilinear', antialias=True)
    # The op tf.image.resize runs, asked for a translated window.
    scale = tf.cast(size, tf.float32) / tf.cast(tf.shape(image)[:2], tf.float32)
    return tf.raw_ops.ScaleAndTranslate(
        images=image[None], size=window[2:], scale=scale,
        translation=-tf.cast(window[:2], tf.float32), kernel_type='triangle',
        antialias=True)[0]

  def crop():
    return tf.cast(image if window is None else _crop(image, window), tf.float32)

  return tf.cond(tf.reduce_all(tf.shape(image)[:2] == size), crop, resample)


def shorter_side_size(shape: tf.Tensor, size: int) -> tf.Tensor:
  """(h, w) with the shorter side `size` and the aspect ratio kept (longer side floored)."""
  return shape * size // tf.minimum(shape[0], shape[1])


def _decode_for_canvas(data: tf.Tensor, options: Options,
                       square: bool) -> tuple[tf.Tensor, tf.Tensor]:
  """The decoded pixels the canvas is resized from, and the canvas size (h, w)."""
  image = decode_and_crop(data, central_square if square else whole_image, options.encoded,
                          options.channels)
  size = options.resize_size
  if square:
    return image, tf.constant([size, size])
  return image, shorter_side_size(tf.shape(image)[:2], size)


def canvas(data: tf.Tensor, options: Options, square: bool = True) -> tf.Tensor:
  """The image the crops come from, mean subtracted.

  Args:
    data: see decode_and_crop.
    options: see Options.
    square: the central square resized to R x R; False: the whole image, shorter side R.

  Returns:
    float32 [R, R, C] (square) or [R, >= R, C] / [>= R, R, C].
  """
  image, size = _decode_for_canvas(data, options, square)
  return subtract_mean(resize(image, size), options.mean)


def canvas_crop(data: tf.Tensor, options: Options, offset_fn: Callable[[tf.Tensor], tf.Tensor],
                square: bool = True) -> tf.Tensor:
  """The S x S crop of the canvas at offset_fn(canvas size (h, w)), mean subtracted; only the
  crop is resized. float32 [S, S, C]."""
  image, size = _decode_for_canvas(data, options, square)
  offset = offset_fn(size)
  crop = options.image_size
  image = resize(image, size, window=tf.concat([offset, [crop, crop]], axis=0))
  return subtract_mean(image, options.mean, offset)


def subtract_mean(image: tf.Tensor, mean: Optional[np.ndarray],
                  offset: tf.Tensor = (0, 0)) -> tf.Tensor:
  """image [h, w, C] - mean: [C], or [R, R, C] whose window at `offset` is subtracted; the
  identity for None."""
  if mean is None:
    return image
  mean = tf.constant(mean, tf.float32)
  if mean.shape.rank == 3:
    mean = tf.slice(mean, [offset[0], offset[1], 0], tf.shape(image))
  return image - mean


def scale(image: tf.Tensor, std: Optional[np.ndarray]) -> tf.Tensor:
  """image / std, broadcasting a [C] or [1] std over the channels; the identity for None."""
  if std is None:
    return image
  return image / tf.constant(std, tf.float32)


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
    float32 [S, S, C].
  """
  size = options.image_size
  crop_seed, flip_seed, lighting_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  if options.train_crop == 'random_resized':
    window_fn = functools.partial(random_resized_window, seed=crop_seed)
    image = resize(decode_and_crop(data, window_fn, options.encoded, options.channels),
                   (size, size))
    image = subtract_mean(image, options.mean)
  else:
    def random_offset(canvas_size):
      # Uniform over the offsets that keep the crop inside the canvas (as tf.image's crop).
      draw = tf.random.stateless_uniform([2], crop_seed, 0, tf.int32.max, tf.int32)
      return draw % (canvas_size - size + 1)
    image = canvas_crop(data, options, random_offset, square=options.center_crop_train)
  if options.random_flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if options.pca_lighting_std:
    image += pca_lighting(lighting_seed, options.pca_lighting_std)
  return tf.ensure_shape(scale(image, options.std), [size, size, options.channels])


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central size x size crop of [h, w, c], at ((h - size) // 2, (w - size) // 2)."""
  y = (tf.shape(image)[0] - size) // 2
  x = (tf.shape(image)[1] - size) // 2
  return image[y:y + size, x:x + size]


# The views `multi_crops` returns, by count, as reports name them.
CROP_NAMES = {
    1: 'the centre crop',
    5: '5 crops (4 corners and the centre, not mirrored: training did not flip)',
    10: "the paper's 10 crops (4 corners, the centre and their mirrors)",
}


def multi_crops(image: tf.Tensor, size: int, crops: int) -> tf.Tensor:
  """The test views of [h, w, 3]: [crops, size, size, 3], crops 5 or 10.

  Order (torchvision's FiveCrop / TenCrop): top-left, top-right, bottom-left, bottom-right,
  centre, then for 10 (the paper's) the horizontal mirrors of those five in the same order.
  """
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size)]
  views = [image[y:y + size, x:x + size] for y, x in corners]
  views.append(center_crop(image, size))
  views = tf.stack(views)
  if crops == 5:
    return views
  return tf.concat([views, tf.reverse(views, axis=[2])], axis=0)


def eval_image(data: tf.Tensor, options: Options, crops: int = 1) -> tf.Tensor:
  """A test image: crops of the square canvas.

  Args:
    data: see decode_and_crop.
    options: see Options (the augmentation fields are ignored).
    crops: 1 (the centre), 5 or 10 (see multi_crops).

  Returns:
    float32 [S, S, C], or [crops, S, S, C] for 5 or 10 crops.
  """
  size = options.image_size
  if crops > 1:
    return tf.ensure_shape(scale(multi_crops(canvas(data, options), size, crops), options.std),
                           [crops, size, size, options.channels])
  image = canvas_crop(data, options, lambda canvas_size: (canvas_size - size) // 2)
  return tf.ensure_shape(scale(image, options.std), [size, size, options.channels])
