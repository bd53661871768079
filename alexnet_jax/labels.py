"""Human-readable class names of a config's dataset, read without its images.

Label i is the dataset's i-th class: a digit, an image folder's i-th class folder, or a TFDS
label. ImageNet's labels are WordNet ids (n01440764, ...); `imagenet_class_names.txt`, bundled
here, names the 1,000 ILSVRC-2012 ids in TFDS's label order (the names of Keras'
imagenet_class_index.json; TFDS itself holds the ids only). A label that is one of these ids
gets its name appended: 'n01440764 tench'.
"""

import functools
import pathlib

import ml_collections

from alexnet_jax import config_checks
from alexnet_jax import data_sources

_IMAGENET_NAMES_FILE = pathlib.Path(__file__).with_name('imagenet_class_names.txt')


@functools.lru_cache(maxsize=None)
def imagenet_names() -> dict[str, str]:
  """{WordNet id: name} of the 1,000 ILSVRC-2012 classes: {'n01440764': 'tench', ...}."""
  lines = _IMAGENET_NAMES_FILE.read_text().splitlines()
  return dict(line.split(' ', 1) for line in lines)


def readable(label: str) -> str:
  """'n01440764' -> 'n01440764 tench'; a label that is no ImageNet id stays as it is."""
  name = imagenet_names().get(label)
  return f'{label} {name}' if name else label


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """The readable names of config.dataset's classes, [config.num_classes], index = label.

  Raises:
    ValueError: the dataset cannot be found, or has not config.num_classes classes.
  """
  if config.dataset == 'fake':
    labels = [str(c) for c in range(config.num_classes)]
  elif config.dataset == 'digits':
    labels = data_sources.digits_source().class_names
  elif config.dataset == 'folder':
    labels = data_sources.folder_class_names(config.data_dir, config.train_split)
  elif config.dataset == 'prepared':
    labels = data_sources.get_source(config).class_names  # Reads metadata.json only.
  else:
    labels = data_sources.tfds_class_names(config.dataset, config.data_dir)
  config_checks.check_num_classes(config, len(labels))
  return [readable(label) for label in labels]
