"""Per-example image preprocessing in TensorFlow: decode, crop, resize, flip; random choices.

Functions of one example, no tf.data (input_pipeline maps them over datasets). They make uint8
pixels and every random choice (crop, flip, the PCA lighting shift), and nothing more: the
float conversion, mean, lighting and scale run on the device inside the compiled step
(`alexnet_jax.normalize`), so a batch crosses to the device at a quarter of float32's bytes
and the host skips the float work (two thirds of a prepared image's host time). Random choices
come from stateless ops seeded by the caller, so an example's augmentation is a function of
its seed alone.

The paper's recipe (facts doc): rescale the shorter side to 256, take the central 256x256,
subtract the mean image; train on random 224 crops, their mirror images and PCA lighting noise;
test on 10 crops (4 corners, centre and their mirrors; 5 unmirrored ones for data trained
without flips). We take the central square of the
decoded image and resize it to 256x256 (the same region, decoded only where needed).
"""

import dataclasses
import functools
from typing import Callable, Optional

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
# Inception-style random-resized crop (torchvision's RandomResizedCrop defaults; the smallest
# area is Options.crop_area_min).
CROP_AREA_MIN = 0.08
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
    crop_area_min: the smallest share of the image a 'random_resized' crop covers.
    center_crop_train: 'paper' crops come from the central square resized to R x R; False:
      from the whole image with its shorter side resized to R.
    random_flip: mirror training images with probability 1/2.
    pca_lighting_std: standard deviation of the lighting coefficients; 0 turns it off.
    keep_window: also return where each crop lies on the canvas and whether it was mirrored
      ('offset', 'flip'): the device subtracts a mean image's window of the canvas with them
      (`normalize`; needs the square canvas of train_crop='paper').
    decode_window: the files are JPEGs at full chroma resolution (alexnet_jax.prepare's): of
      one that is its own canvas, decode only a training crop's window (`canvas_crop`).
  """
  image_size: int
  resize_size: int
  encoded: bool = True
  channels: int = 3
  train_crop: str = 'paper'
  crop_area_min: float = CROP_AREA_MIN
  center_crop_train: bool = True
  random_flip: bool = True
  pca_lighting_std: float = 0.1
  keep_window: bool = False
  decode_window: bool = False


def central_square(shape: tf.Tensor) -> tf.Tensor:
  """Window of the largest central square of an image of shape [h, w]."""
  side = tf.minimum(shape[0], shape[1])
  return tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])


def whole_image(shape: tf.Tensor) -> tf.Tensor:
  """Window covering an image of shape [h, w]."""
  return tf.stack([0, 0, shape[0], shape[1]])


def random_resized_window(shape: tf.Tensor, seed: tf.Tensor,
                          area_min: float = CROP_AREA_MIN) -> tf.Tensor:
  """Inception-style window: area_min-100% of the area, aspect ratio 3/4-4/3 (the whole image
  if 10 tries fail)."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([shape, [3]], axis=0),
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed,
      min_object_covered=0.0,  # The area range alone bounds the crop.
      aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
      area_range=(area_min, 1.0),
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


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Float pixels rounded to the nearest uint8, clipped to 0..255."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def resize(image: tf.Tensor, size, window: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Bilinear resize of uint8 [h, w, C] to size (h', w'), antialiased when shrinking as PIL
  does, rounded to uint8 (as alexnet_jax.prepare stores its canvases).

  With a window (y, x, h', w') of the resized image, only that window's pixels are computed:
  the values of resizing and then cropping (up to float rounding, < 0.01), for less work.
  An image already of that size (alexnet_jax.prepare's canvases) is only cropped: at scale 1
  the triangle filter's weights are 1 and 0, so the result is the same, bit for bit, without
  the resample's 2 ms or so an image (a prepared 256x256 JPEG decodes in about 1 ms), and
  without any float work.
  """
  def resample():
    if window is None:
      return to_uint8(tf.image.resize(image, size, method='bilinear', antialias=True))
    # The op tf.image.resize runs, asked for a translated window.
    scale = tf.cast(size, tf.float32) / tf.cast(tf.shape(image)[:2], tf.float32)
    return to_uint8(tf.raw_ops.ScaleAndTranslate(
        images=image[None], size=window[2:], scale=scale,
        translation=-tf.cast(window[:2], tf.float32), kernel_type='triangle',
        antialias=True)[0])

  def crop():
    return image if window is None else _crop(image, window)

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
  """The image the crops come from.

  Args:
    data: see decode_and_crop.
    options: see Options.
    square: the central square resized to R x R; False: the whole image, shorter side R.

  Returns:
    uint8 [R, R, C] (square) or [R, >= R, C] / [>= R, R, C].
  """
  image, size = _decode_for_canvas(data, options, square)
  return resize(image, size)


def canvas_crop(data: tf.Tensor, options: Options, offset_fn: Callable[[tf.Tensor], tf.Tensor],
                square: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
  """The S x S crop of the canvas at offset_fn(canvas size (h, w)); only the crop is resized.

  With options.decode_window, a JPEG that is its own canvas has only the crop's window
  decoded: at full chroma resolution libjpeg decodes the blocks that hold it as it would in
  the whole image, so the pixels are those of decoding it all and cropping (tested; with
  4:2:0 chroma the window's edges differ, which is why only full-chroma sources set it).

  Returns:
    uint8 [S, S, C], and its offset on the canvas, int32 [2] = (y, x).
  """
  crop = options.image_size

  def window_at(size):
    offset = offset_fn(size)
    return offset, tf.concat([offset, [crop, crop]], axis=0)

  def whole():
    image, size = _decode_for_canvas(data, options, square)
    offset, window = window_at(size)
    return resize(image, size, window=window), offset

  def window_only():
    offset, window = window_at(tf.image.extract_jpeg_shape(data)[:2])
    return tf.image.decode_and_crop_jpeg(data, window, channels=options.channels,
                                         dct_method='INTEGER_ACCURATE'), offset

  if not (options.encoded and options.decode_window):
    return whole()
  return tf.cond(_is_jpeg_canvas(data, options.resize_size, square), window_only, whole)


def _is_jpeg_canvas(data: tf.Tensor, size: int, square: bool) -> tf.Tensor:
  """Whether `data` is a JPEG whose shape is already its canvas's (an identity resize)."""
  def canvas_shaped():
    shape = tf.image.extract_jpeg_shape(data)[:2]
    canvas_size = tf.constant([size, size]) if square else shorter_side_size(shape, size)
    return tf.reduce_all(shape == canvas_size)
  return tf.cond(tf.io.is_jpeg(data), canvas_shaped, lambda: tf.constant(False))


def pca_lighting(seed: tf.Tensor, std: float) -> tf.Tensor:
  """The paper's colour shift, float32 [3] on 0-255 pixels: EIGVEC @ (alpha * EIGVAL * 255),
  alpha ~ N(0, std^2) drawn once per image."""
  alpha = tf.random.stateless_normal([3], seed, stddev=std)
  eigval = tf.constant(PCA_EIGVAL, tf.float32) * 255.0
  return tf.linalg.matvec(tf.constant(PCA_EIGVEC, tf.float32), alpha * eigval)


def train_image(data: tf.Tensor, seed: tf.Tensor, options: Options) -> dict[str, tf.Tensor]:
  """One augmented training image and the random choices the device still applies.

  Args:
    data: see decode_and_crop.
    seed: int [2], the seed of this example's random choices.
    options: see Options.

  Returns:
    {'image': uint8 [S, S, C] (cropped, mirrored)}, plus 'lighting': float32 [3], the colour
    shift `pca_lighting` (when options.pca_lighting_std), and with options.keep_window
    'offset': int32 [2], the crop's place on the canvas, and 'flip': bool [], mirrored.
  """
  size = options.image_size
  crop_seed, flip_seed, lighting_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  if options.train_crop == 'random_resized':
    window_fn = functools.partial(random_resized_window, seed=crop_seed,
                                  area_min=options.crop_area_min)
    image = resize(decode_and_crop(data, window_fn, options.encoded, options.channels),
                   (size, size))
    offset = tf.zeros([2], tf.int32)  # Not a window of the canvas: keep_window refuses it.
  else:
    def random_offset(canvas_size):
      # Uniform over the offsets that keep the crop inside the canvas (as tf.image's crop).
      draw = tf.random.stateless_uniform([2], crop_seed, 0, tf.int32.max, tf.int32)
      return draw % (canvas_size - size + 1)
    image, offset = canvas_crop(data, options, random_offset,
                                square=options.center_crop_train)
  # The draw of tf.image.stateless_random_flip_left_right, kept for a mean image's window.
  flip = (tf.random.stateless_uniform([], flip_seed) < 0.5) & options.random_flip
  out = {'image': tf.ensure_shape(tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image),
                                  [size, size, options.channels])}
  if options.pca_lighting_std:
    out['lighting'] = pca_lighting(lighting_seed, options.pca_lighting_std)
  if options.keep_window:
    out.update(offset=tf.ensure_shape(tf.cast(offset, tf.int32), [2]), flip=flip)
  return out


# The views `multi_crops` returns, by count, as reports name them.
CROP_NAMES = {
    1: 'the centre crop',
    5: '5 crops (4 corners and the centre, not mirrored: training did not flip)',
    10: "the paper's 10 crops (4 corners, the centre and their mirrors)",
}


def multi_crops(image: tf.Tensor, size: int,
                crops: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The test views of [h, w, C], crops 5 or 10.

  Order (torchvision's FiveCrop / TenCrop): top-left, top-right, bottom-left, bottom-right,
  centre, then for 10 (the paper's) the horizontal mirrors of those five in the same order.

  Returns:
    The views [crops, size, size, C], their offsets int32 [crops, 2] = (y, x) and whether
    each is mirrored, bool [crops].
  """
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  offsets = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
             ((height - size) // 2, (width - size) // 2)]
  views = tf.stack([image[y:y + size, x:x + size] for y, x in offsets])
  offsets = tf.stack([tf.stack(offset) for offset in offsets])
  if crops == 5:
    return views, offsets, tf.zeros([5], tf.bool)
  return (tf.concat([views, tf.reverse(views, axis=[2])], axis=0),
          tf.concat([offsets, offsets], axis=0), tf.range(10) >= 5)


def eval_image(data: tf.Tensor, options: Options, crops: int = 1) -> dict[str, tf.Tensor]:
  """A test image: crops of the square canvas.

  Args:
    data: see decode_and_crop.
    options: see Options (the augmentation fields are ignored).
    crops: 1 (the centre), 5 or 10 (see multi_crops).

  Returns:
    {'image': uint8 [S, S, C], or [crops, S, S, C] for 5 or 10 crops}, plus with
    options.keep_window 'offset': int32 [2] ([crops, 2]) and 'flip': bool [] ([crops]).
  """
  size = options.image_size
  if crops > 1:
    image, offset, flip = multi_crops(canvas(data, options), size, crops)
    shape = [crops, size, size, options.channels]
  else:
    image, offset = canvas_crop(data, options, lambda canvas_size: (canvas_size - size) // 2)
    flip, shape = tf.constant(False), [size, size, options.channels]
  out = {'image': tf.ensure_shape(image, shape)}
  if options.keep_window:
    out.update(offset=tf.ensure_shape(tf.cast(offset, tf.int32), shape[:-3] + [2]), flip=flip)
  return out
