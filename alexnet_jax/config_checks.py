"""Checks a config before anything is built, so a bad value costs one clear line, not a trace.

Also guards a workdir against being resumed with another config: the first run writes
`WORKDIR/config.json`; a later run must match it in every field outside `_FREE_FIELDS`.
"""

import json
import pathlib
from typing import Any

import jax
import ml_collections

from alexnet_jax import models
from alexnet_jax import optim

# What a run's config is saved as in its workdir.
CONFIG_FILE = 'config.json'

_DATA_CHOICES = {
    'train_crop': ('paper', 'random_resized'),
    'mean_subtraction': ('channel', 'pixel', 'none'),
    'on_bad_image': ('skip', 'raise'),
}
_CHOICES = {
    'model.variant': models.VARIANTS,
    'model.init': models.INIT_SCHEMES,
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'optimizer': optim.OPTIMIZERS,
    'lr_schedule': optim.SCHEDULES,
    'on_nonfinite': ('stop', 'skip'),
    'eval_crops': (1, 10),
}
_POSITIVE = ('learning_rate', 'batch_size', 'eval_batch_size', 'image_size', 'resize_size',
             'num_classes', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints')
_NON_NEGATIVE = ('momentum', 'weight_decay', 'label_smoothing', 'pca_lighting_std',
                 'model.dropout_rate', 'warmup_epochs', 'num_devices')
# Fields a resumed run may change freely: how long, how often, where the data lies, and the
# device count (checkpoints do not depend on it).
_FREE_FIELDS = frozenset({
    'num_epochs', 'num_train_steps', 'allow_config_change', 'num_devices', 'log_every_steps',
    'checkpoint_every_steps', 'keep_checkpoints', 'eval_every_epochs', 'steps_per_eval',
    'eval_batch_size', 'eval_crops', 'data_dir', 'manual_dir', 'prefetch_to_device',
    'num_parallel_calls', 'private_threadpool_size', 'init_from',
})


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
  if config.seed < 0:
    raise ValueError(f'config.seed={config.seed} must not be negative.')


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
  minimum = models.min_input_size(config.model.variant)
  if config.image_size < minimum:
    raise ValueError(f'config.image_size={config.image_size} is too small for the '
                     f'{config.model.variant!r} AlexNet; the minimum is {minimum}.')
  if config.batch_size % jax.process_count():
    raise ValueError(f'config.batch_size={config.batch_size} must split evenly over '
                     f'{jax.process_count()} processes.')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def check_num_classes(config: ml_collections.ConfigDict, dataset_classes: int) -> None:
  """Raises ValueError unless config.num_classes is the dataset's class count."""
  if dataset_classes != config.num_classes:
    raise ValueError(f'config.num_classes={config.num_classes} but {config.dataset} has '
                     f'{dataset_classes} classes; set --config.num_classes={dataset_classes}.')


def check_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Writes WORKDIR/config.json on a first run; refuses a workdir of a different run.

  Raises:
    ValueError: the workdir was written with another config and `allow_config_change` is off.
  """
  path = workdir / CONFIG_FILE
  current = json.loads(config.to_json_best_effort())
  if path.exists() and not config.allow_config_change:
    saved = _flatten(json.loads(path.read_text()))
    now = _flatten(current)
    differ = sorted(k for k in saved.keys() | now.keys()
                    if k not in _FREE_FIELDS and saved.get(k) != now.get(k))
    if differ:
      details = '; '.join(f'{k}: workdir {saved.get(k)!r}, now {now.get(k)!r}' for k in differ)
      raise ValueError(f'{workdir} holds a run with another config ({details}). Use a fresh '
                       f'--workdir, or pass --config.allow_config_change=True to resume anyway.')
  if jax.process_index() == 0:
    path.write_text(json.dumps(current, indent=2, sort_keys=True))
