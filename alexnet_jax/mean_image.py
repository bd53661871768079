"""Computes the paper's mean image: the per-pixel mean of the training set's canvases.

The paper subtracts "the mean activity over the training set from each pixel" of its 256x256
images. This averages the canvases (central square resized to config.resize_size, decoded as
for evaluation) over config.train_split and saves float32 [R, R, C] (C = config.input_channels)
on the 0-255 scale to a .npy, for config.mean_subtraction='pixel' with config.mean_image_path
pointing at it:

  python -m alexnet_jax.mean_image --config=configs/imagenet.py --output=/data/mean_256.npy

ImageNet's 1.28M images take about as long as one evaluation pass over them; --max_images
averages a prefix of the split instead (the split's canonical order, e.g. for a quick try).
"""

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from alexnet_jax import input_pipeline


def compute_mean_image(config: ml_collections.ConfigDict, max_images: int = 0) -> np.ndarray:
  """The mean canvas of config.train_split, float32 [R, R, C] with R = config.resize_size and
  C = config.input_channels.

  Args:
    config: the run's config (data fields only).
    max_images: average the first max_images images, rounded up to whole batches of
      config.eval_batch_size (0: all). Undecodable images are skipped.
  """
  config = config.copy_and_resolve_references()
  config.eval_split = config.train_split
  config.image_size = config.resize_size  # The centre crop of the canvas is the canvas.
  config.mean_subtraction = 'none'  # Not there yet: no mean image to check.
  config.cache = False
  config.steps_per_eval = -(-max_images // config.eval_batch_size) if max_images else -1
  total = np.zeros((config.resize_size, config.resize_size, config.input_channels), np.float64)
  count = 0
  for batch in input_pipeline.create_eval_iterator(config, crops=1):
    total += batch['image'][batch['mask']].sum(axis=0, dtype=np.float64)
    count += int(batch['mask'].sum())
  if not count:
    raise ValueError(f'No decodable image in the {config.train_split!r} split.')
  logging.info('Mean image of %d images of %s.', count, config.dataset)
  return (total / count).astype(np.float32)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  output = _OUTPUT.value or config.mean_image_path
  if not output:
    raise app.UsageError('Say where to save it: --output=PATH.npy (or config.mean_image_path).')
  mean = compute_mean_image(config, _MAX_IMAGES.value)
  with tf.io.gfile.GFile(output, 'wb') as f:
    np.save(f, mean)
  logging.info('Saved %s; train with --config.mean_subtraction=pixel '
               '--config.mean_image_path=%s', output, output)


if __name__ == '__main__':
  # Flags are defined only when run as a command, so importing compute_mean_image next to the
  # trainer's own --config flag does not clash.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'The training config.')
  _OUTPUT = flags.DEFINE_string('output', None,
                                'Where to save the .npy (default: config.mean_image_path).')
  _MAX_IMAGES = flags.DEFINE_integer('max_images', 0,
                                     'Average only the first N images (0: all).')
  flags.mark_flag_as_required('config')
  app.run(main)
