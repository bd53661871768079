"""Every config field and what follows from it, in one registry (`FIELDS`).

For each field of configs/imagenet.py the registry says whether a resumed run may change it,
whether it shapes the checkpointed state, which value reproduces what runs did before the
field existed, and whether only training reads it. The workdir guard
(`config_checks.check_workdir`), the checkpoint guard (`checkpointing.check_compatible`),
loading a saved config (`inference.load_config`) and the ensemble check all read it, so a new
field is registered here once; tests/test_config_fields.py fails on a config field that is not.
"""

import dataclasses
from typing import Any

# `Field.on_resume`: must equal the workdir's / may change / may change unless the schedule
# decays over it (then it re-derives every remaining step's learning rate).
FIXED, FREE, HORIZON = 'fixed', 'free', 'horizon'
# The schedules (`optim.SCHEDULES`) that decay to zero over the run's length.
HORIZON_SCHEDULES = ('cosine', 'linear')
# `Field.added` of a field that every saved config.json has.
ALWAYS = object()


@dataclasses.dataclass(frozen=True)
class Field:
  """What one config field means to a run that already exists.

  Attributes:
    on_resume: FIXED, FREE or HORIZON.
    defines_state: changes the shapes or the meaning of the checkpointed state, so a
      checkpoint written with another value cannot be restored.
    added: the value that reproduces runs whose config.json predates the field (ALWAYS: none).
    training_only: only training reads it; evaluating the trained model does not.
  """
  on_resume: str = FIXED
  defines_state: bool = False
  added: Any = ALWAYS
  training_only: bool = False


_FREE = Field(FREE)
_TRAINING = Field(training_only=True)

FIELDS: dict[str, Field] = {
    # Data: where it lies may change (a cluster mounts it elsewhere); what it is may not.
    'dataset': Field(),
    'data_dir': _FREE,
    'manual_dir': _FREE,
    'train_split': Field(),
    'eval_split': Field(),
    'num_classes': Field(defines_state=True),
    'input_channels': Field(defines_state=True, added=3),
    # Preprocessing.
    'image_size': Field(defines_state=True),
    'resize_size': Field(),
    'center_crop_train': _TRAINING,
    'train_crop': _TRAINING,
    'crop_area_min': Field(training_only=True, added=0.08),
    # Evaluation reads it only to turn 10 crops into the 5 unmirrored ones (the ensemble
    # check compares it where the crops include mirrors).
    'random_flip': _TRAINING,
    'pca_lighting_std': _TRAINING,
    'mean_subtraction': Field(),
    'mean_image_path': Field(),
    'divide_by_std': Field(),
    'divide_by_255': Field(added=False),
    'eval_crops': _FREE,
    # Read as one value (`flatten`): what is measured may change between a run's parts. An old
    # run's single evaluation is the one evaluator 'eval' (alexnet_jax.evaluators).
    'evaluators': Field(FREE, added={'eval': {'kind': 'classification'}}),
    'best_metric': Field(added='eval/top1'),
    'on_bad_image': Field(),
    # tf.data: speed knobs are free; what decides the examples' order is not.
    'shuffle_buffer_size': Field(),
    'cache': Field(),
    'num_parallel_calls': _FREE,
    'private_threadpool_size': _FREE,
    'deterministic': Field(),
    'prefetch_to_device': _FREE,
    # The model.
    'model.variant': Field(defines_state=True),
    'model.conv1_padding': Field(defines_state=True, added=None),
    'model.init': Field(),
    'model.dropout_rate': Field(),
    'model.dtype': Field(),
    'model.ops': Field(FREE, added='auto'),  # The same numbers to rounding, other programs.
    'model.lrn_depth_radius': Field(),
    'model.lrn_bias': Field(),
    'model.lrn_alpha': Field(),
    'model.lrn_beta': Field(),
    # The optimizer and its schedule.
    'optimizer': Field(defines_state=True),
    'learning_rate': Field(),
    'momentum': Field(),
    'weight_decay': Field(),
    'weight_decay_on_biases': Field(),
    'label_smoothing': Field(),
    'lr_schedule': Field(),
    'plateau_factor': Field(),
    'plateau_patience': Field(),
    'plateau_min_delta': Field(),
    'plateau_threshold_mode': Field(added='abs'),
    'plateau_max_drops': Field(),
    'step_epochs': Field(),
    'warmup_epochs': Field(),
    # The run: how long, how often, on which devices. Checkpoints hold host arrays, so they
    # do not depend on the devices or the parallelism that wrote them.
    'batch_size': Field(),
    'eval_batch_size': _FREE,
    'num_epochs': Field(HORIZON),
    'num_train_steps': Field(HORIZON),
    'steps_per_eval': _FREE,
    'eval_every_epochs': _FREE,
    'log_every_steps': _FREE,
    'checkpoint_every_steps': _FREE,
    'keep_checkpoints': _FREE,
    'seed': Field(),
    'num_devices': _FREE,
    'parallelism': Field(FREE, added='pmap'),
    'model_parallel_size': Field(FREE, added=2),
    'on_nonfinite': Field(),
    'allow_config_change': _FREE,
    'init_from': _FREE,  # A rerun restores the workdir's own checkpoints, not these weights.
}

STATE_DEFINING = tuple(name for name, field in FIELDS.items() if field.defines_state)
HORIZON_FIELDS = frozenset(name for name, field in FIELDS.items() if field.on_resume == HORIZON)
TRAINING_ONLY = frozenset(name for name, field in FIELDS.items() if field.training_only)


def may_change_on_resume(name: str, lr_schedule: str) -> bool:
  """Whether a resumed run may change field `name` (dotted); unknown fields may not."""
  field = FIELDS.get(name, Field())
  return field.on_resume == FREE or (field.on_resume == HORIZON and
                                     lr_schedule not in HORIZON_SCHEDULES)


def with_added_defaults(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config (nested dicts, as config.json holds it) with the fields it predates set
  to the values its run had; fields it has are kept."""
  saved = _copy(saved)
  for dotted, field in FIELDS.items():
    if field.added is ALWAYS:
      continue
    *parents, name = dotted.split('.')
    node = saved
    for parent in parents:
      node = node.setdefault(parent, {})
    node.setdefault(name, field.added)
  return saved


def _copy(tree: dict[str, Any]) -> dict[str, Any]:
  """A copy of nested dicts (the leaves, JSON values, are shared)."""
  return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested dicts as one dict keyed by dotted names: {'model': {'ops': x}} -> {'model.ops': x};
  a dict that is a field of its own (config.evaluators) stays whole."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and f'{prefix}{key}' not in FIELDS:
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat
