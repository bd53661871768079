"""Checks a config before anything is built, so a bad value costs one clear line, not a trace.

Also guards a workdir against being resumed with another config: the first run writes
`WORKDIR/config.json`; a later run must match it in every field that `config_fields` does not
let a resumed run change.
"""

import json
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from alexnet_jax import config_fields
from alexnet_jax import models
from alexnet_jax import optim
from alexnet_jax import parallel

# What a run's config is saved as in its workdir.
CONFIG_FILE = 'config.json'

_DATA_CHOICES = {
    'train_crop': ('paper', 'random_resized'),
    'mean_subtraction': ('channel', 'pixel', 'none'),
    'on_bad_image': ('skip', 'raise'),
    'input_channels': (1, 3),
}
_CHOICES = {
    'model.variant': models.VARIANTS,
    'model.init': models.INIT_SCHEMES,
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.ops': ('auto',) + models.OPS,
    'optimizer': optim.OPTIMIZERS,
    'lr_schedule': optim.SCHEDULES,
    'on_nonfinite': ('stop', 'skip'),
    'parallelism': parallel.PARALLELISMS,
    'eval_crops': (1, 5, 10),
    'plateau_threshold_mode': ('abs', 'rel'),
}
_POSITIVE = ('learning_rate', 'batch_size', 'eval_batch_size', 'image_size', 'resize_size',
             'num_classes', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
             'model_parallel_size')
_NON_NEGATIVE = ('momentum', 'weight_decay', 'label_smoothing', 'pca_lighting_std',
                 'model.dropout_rate', 'warmup_epochs', 'num_devices')
def _get(config: Any, dotted: str) -> Any:
  for key in dotted.split('.'):
    config = config[key]
  return config


def _check_choices(config: Any, choices: dict[str, tuple[Any, ...]]) -> None:
  for field, allowed in choices.items():
    if _get(config, field) not in allowed:
      raise ValueError(f'config.{field}={_get(config, field)!r} is not one of {allowed}.')


def validate_data(config: ml_collections.ConfigDict) -> None:
  """The input pipeline's part of `validate`: it alone has no model minimum image size."""
  _check_choices(config, _DATA_CHOICES)
  if config.image_size > config.resize_size:
    raise ValueError(f'config.image_size={config.image_size} crops from images resized to '
                     f'config.resize_size={config.resize_size}; it cannot be larger.')
  if not 0 < config.crop_area_min <= 1:
    raise ValueError(f'config.crop_area_min={config.crop_area_min} is a share of the image: '
                     'it must be in (0, 1].')
  if config.seed < 0:
    raise ValueError(f'config.seed={config.seed} must not be negative.')
  if config.divide_by_std and config.divide_by_255:
    raise ValueError('config.divide_by_std=True and config.divide_by_255=True: choose one '
                     "(divide_by_std alone gives torchvision's ToTensor + Normalize scale).")
  _check_grey(config)


def _check_grey(config: ml_collections.ConfigDict) -> None:
  """Refuses what needs RGB in a grey run (input_channels=1): ImageNet's colour statistics."""
  if config.input_channels != 1:
    return
  rgb_only = {  # field: (set to an RGB-only value, what it does, what to use instead).
      'pca_lighting_std': (config.pca_lighting_std != 0,
                           "shifts colours along ImageNet's RGB principal components",
                           'set it to 0'),
      'mean_subtraction': (config.mean_subtraction == 'channel', "subtracts ImageNet's RGB mean",
                           "use 'pixel' (the training set's own mean image) or 'none'"),
      'divide_by_std': (config.divide_by_std, "divides by ImageNet's RGB std",
                        'use divide_by_255 or neither'),
  }
  for field, (rgb, what, instead) in rgb_only.items():
    if rgb:
      raise ValueError(f'config.{field}={_get(config, field)!r} {what}; grey images '
                       f'(config.input_channels=1) have no colour: {instead}.')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field, its value and what is allowed."""
  _check_choices(config, _CHOICES)
  validate_data(config)
  for field in _POSITIVE:
    if not _get(config, field) > 0:
      raise ValueError(f'config.{field}={_get(config, field)!r} must be positive.')
  for field in _NON_NEGATIVE:
    if not _get(config, field) >= 0:
      raise ValueError(f'config.{field}={_get(config, field)!r} must not be negative.')
  padding = config.model.conv1_padding
  if padding is not None and (not isinstance(padding, int) or padding < 0):
    raise ValueError(f'config.model.conv1_padding={padding!r} must be None (the variant\'s own) '
                     'or a non-negative int.')
  minimum = models.min_input_size(config.model.variant, padding)
  if config.image_size < minimum:
    raise ValueError(f'config.image_size={config.image_size} is too small for the '
                     f'{config.model.variant!r} AlexNet with config.model.conv1_padding='
                     f'{padding}; the minimum is {minimum}.')
  if config.batch_size % jax.process_count():
    raise ValueError(f'config.batch_size={config.batch_size} must split evenly over '
                     f'{jax.process_count()} processes.')


def check_num_classes(config: ml_collections.ConfigDict, dataset_classes: int) -> None:
  """Raises ValueError unless config.num_classes is the dataset's class count."""
  if dataset_classes != config.num_classes:
    raise ValueError(f'config.num_classes={config.num_classes} but {config.dataset} has '
                     f'{dataset_classes} classes; set --config.num_classes={dataset_classes}.')


def check_workdir(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
  """Refuses a workdir whose saved config differs from `config`; reads only.

  With `allow_config_change` the run goes on and one warning says what changed. Under the
  cosine and linear schedules num_epochs and num_train_steps are not free: they set the
  horizon the learning rate decays over, so changing them re-derives every remaining step's
  rate.

  Raises:
    ValueError: the workdir was written with another config and `allow_config_change` is off.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  saved = config_fields.flatten(config_fields.with_added_defaults(json.loads(path.read_text())))
  now = config_fields.flatten(json.loads(config.to_json_best_effort()))
  differ = sorted(k for k in saved.keys() | now.keys()
                  if not config_fields.may_change_on_resume(k, config.lr_schedule)
                  and saved.get(k) != now.get(k))
  if not differ:
    return
  details = '; '.join(f'{k}: workdir {saved.get(k)!r}, now {now.get(k)!r}' for k in differ)
  horizon = (f'. The {config.lr_schedule} schedule decays over num_epochs/num_train_steps, '
             'so the new horizon re-derives the learning rate of every remaining step'
             if config_fields.HORIZON_FIELDS & set(differ) else '')
  if config.allow_config_change:
    logging.warning('Resuming %s with a changed config (%s)%s.', workdir, details, horizon)
    return
  raise ValueError(f'{workdir} holds a run with another config ({details}){horizon}. Use a '
                   f'fresh --workdir, or pass --config.allow_config_change=True to resume anyway.')


def write_config(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
  """Writes WORKDIR/config.json on process 0, atomically: a reader never sees half of it."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / CONFIG_FILE
  partial = path.parent / f'{path.name}.partial'
  partial.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2,
                                sort_keys=True))
  partial.replace(path)
