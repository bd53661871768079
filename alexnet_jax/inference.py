"""The trained model that evaluation and prediction use: its config and its weights.

The config is the one the training run saved in its workdir unless one is given. The weights
come from a checkpoint of the workdir ('latest', 'best' or a step; see
`checkpointing.restore`) or from a weights file (see `convert.load_params`).
"""

import json

from etils import epath
import ml_collections

from alexnet_jax import checkpointing
from alexnet_jax import config_checks
from alexnet_jax import config_fields
from alexnet_jax import convert
from alexnet_jax import train_state


def load_config(config: ml_collections.ConfigDict | None,
                workdir: epath.PathLike) -> ml_collections.ConfigDict:
  """`config` if given, else the config the training run saved in `workdir`.

  A saved config from before a field existed gets that field's old behaviour
  (`config_fields.with_added_defaults`), so older runs still evaluate and predict.

  Raises:
    FileNotFoundError: no `config`, and the workdir has no saved config.
  """
  if config is not None:
    return config
  path = epath.Path(workdir) / config_checks.CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: pass the --workdir of a training run, or '
                            'a --config.')
  saved = config_fields.with_added_defaults(json.loads(path.read_text()))
  return ml_collections.ConfigDict(saved)


def load_state(config: ml_collections.ConfigDict, workdir: epath.PathLike,
               checkpoint: int | str = 'latest',
               init_from: str | None = None) -> train_state.TrainState:
  """The host train state of a trained model.

  Args:
    config: the model's config.
    workdir: the training run's workdir.
    checkpoint: which of its checkpoints: a step, 'latest' or 'best' (see
      `checkpointing.restore`).
    init_from: a weights file (see `convert.load_params`) to use instead of a checkpoint.
  Returns:
    A `TrainState` whose step is the checkpoint's (0 with `init_from`); with `init_from` only
    its params and step mean anything.
  Raises:
    checkpointing.CheckpointError: no such checkpoint, unreadable, or of another model.
    ValueError: the weights file is unreadable or of another model.
  """
  state = train_state.zeros_state(config)
  if init_from:
    return state.replace(params=convert.load_params(
        init_from, config.model.variant, config.num_classes, config.image_size,
        config.model.conv1_padding, config.input_channels))
  directory = epath.Path(workdir) / checkpointing.DIRECTORY
  if not directory.is_dir():
    raise checkpointing.CheckpointError(f'No checkpoints in {workdir} ({directory} does not '
                                        'exist): pass the --workdir of a training run.')
  manager = checkpointing.create_manager(directory, config.keep_checkpoints, read_only=True)
  try:
    state, _ = checkpointing.restore(manager, state, checkpointing.config_to_dict(config),
                                     checkpoint)
  finally:
    manager.close()
  return state
