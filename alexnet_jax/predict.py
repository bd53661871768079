"""Classifies images: `python -m alexnet_jax.predict --workdir=DIR IMAGE_OR_FOLDER [...]`.

Prints each image's top-5 classes with their names and probabilities, using a checkpoint of
the training run in DIR (--checkpoint: 'latest', 'best' or a step) or a weights file
(--init_from). Images get the evaluation's preprocessing (the centre crop of the central
square, the config's mean and scale); a folder stands for the images in it. The config is
the one the run saved in DIR unless --config names one; the model runs as
`parallel.on_this_host` says (any run's parallelism, on this host's devices).

A file that cannot be read or decoded costs one error line and the other images are still
classified; the exit status is then 1. --picture=PNG also draws each image above a bar chart of
its top 5 (the paper's Figure 4, left).
"""

import functools
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

# TensorFlow only decodes images: keep it off the GPUs and quiet. Must precede its first import.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from alexnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
from alexnet_jax import cli
from alexnet_jax import config_checks
from alexnet_jax import data_sources
from alexnet_jax import features
from alexnet_jax import inference
from alexnet_jax import input_pipeline
from alexnet_jax import labels
from alexnet_jax import normalize
from alexnet_jax import parallel
from alexnet_jax import plots
from alexnet_jax import preprocessing
from alexnet_jax.train_state import TrainState

_MODEL = cli.define_model_flags()
TOP_K = 5


def image_files(paths: list[str]) -> list[pathlib.Path]:
  """The files named, and the images in the folders named (by extension, sorted)."""
  files = []
  for path in map(pathlib.Path, paths):
    if path.is_dir():
      files.extend(sorted(p for p in path.iterdir()
                          if p.suffix.lower() in data_sources.IMAGE_EXTENSIONS))
    else:
      files.append(path)
  return files


def load_image(path: pathlib.Path, options: preprocessing.Options) -> dict[str, np.ndarray]:
  """The evaluation's centre crop of an image file: `preprocessing.eval_image`'s arrays,
  'image' uint8 [S, S, C] (0-255, as shown) and what `normalize` needs of it.

  Raises:
    ValueError: the file cannot be read or is no image this pipeline decodes.
  """
  if not path.is_file():
    raise ValueError('no such file')
  try:
    return {name: value.numpy() for name, value in
            preprocessing.eval_image(tf.io.read_file(str(path)), options).items()}
  except tf.errors.OpError as e:
    # TensorFlow wraps the reason in the failing op's name and device.
    raise ValueError(re.sub(r'\{\{.*?\}\}|\[Op:.*', '', e.message).strip()) from e


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """`labels.class_names`, or the label numbers where the dataset is not at hand."""
  try:
    return labels.class_names(config)
  except ValueError as e:
    logging.warning('Printing label numbers, not class names: %s', e)
    return [str(c) for c in range(config.num_classes)]


def format_prediction(path: pathlib.Path, probs: np.ndarray, names: list[str]) -> str:
  """The path, then one line per class of the TOP_K most probable: probability and name.

  probs: float [num_classes], summing to 1.
  """
  top = np.argsort(-probs, kind='stable')[:TOP_K]
  return '\n'.join([str(path)] + [f'  {probs[c]:7.2%}  {names[c]}' for c in top])


def _probabilities(apply_fn: Callable[..., jax.Array], normalization: normalize.Normalization,
                   params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Softmax of the model's logits: a batch of B centre crops ('image' [B, S, S, C], ...) ->
  [B, num_classes]."""
  return jax.nn.softmax(apply_fn({'params': params}, normalization(batch), train=False))


def classify(files: list[pathlib.Path], state: TrainState,
             options: preprocessing.Options, normalization: normalize.Normalization,
             names: list[str], data_parallel: parallel.DataParallel,
             picture: epath.PathLike | None = None) -> int:
  """Prints each file's prediction, or logs why it has none; returns how many have none.

  The model runs on the devices of `data_parallel`. With `picture`, also draws the classified
  images with their top 5 there (`plots.plot_predictions`).
  """
  probabilities = features.per_example(
      functools.partial(_probabilities, state.apply_fn, normalization), state.params,
      data_parallel)
  failed, shown = 0, []
  for path in files:
    try:
      example = load_image(path, options)
    except ValueError as e:
      logging.error('%s: cannot classify: %s', path, e)
      failed += 1
      continue
    batch = {name: value[None] for name, value in example.items()}
    probs = probabilities(batch)[0]
    print(format_prediction(path, probs, names), flush=True)
    if picture:
      shown.append((example['image'], path.name, probs))
  if picture and shown:
    images, titles, probs = zip(*shown)
    plots.plot_predictions(images, titles, np.stack(probs), names, picture, TOP_K)
    print(f'Wrote {picture}')
  return failed


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Name the images (or folders of images) to classify.')
  cli.start()
  with cli.user_errors():
    checkpoint = checkpointing.parse_checkpoint(_MODEL.checkpoint.value)
    config = inference.load_config(_MODEL.config.value, _MODEL.workdir.value)
    config_checks.validate(config)
    config = parallel.on_this_host(config)
    state = inference.load_state(config, _MODEL.workdir.value, checkpoint,
                                 _MODEL.init_from.value)
    options = input_pipeline.preprocessing_options(config, encoded=True)
    files = image_files(argv[1:])
    if not files:
      raise ValueError(f'No images in {argv[1:]} ({", ".join(data_sources.IMAGE_EXTENSIONS)}).')
    data_parallel = parallel.for_config(config)
  picture = flags.FLAGS.picture and epath.Path(flags.FLAGS.picture)
  if classify(files, state, options, normalize.for_config(config), class_names(config),
              data_parallel, picture):
    raise SystemExit(1)


if __name__ == '__main__':
  # Defined here, not on import: neighbours imports this module for its image loading and
  # must not take this flag.
  flags.DEFINE_string('picture', None, 'Also draw each image and its top 5 into this PNG.')
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
