"""The config-field registry, and the guards that read it: resume, checkpoints, old workdirs."""

import importlib
import json
import pathlib

import ml_collections
import pytest

from alexnet_jax import checkpointing
from alexnet_jax import config_checks
from alexnet_jax import config_fields
from alexnet_jax import inference

CONFIG_MODULES = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / 'configs').glob(
    '*.py') if p.stem != '__init__')


def _fields(module: str) -> set[str]:
  config = importlib.import_module(f'configs.{module}').get_config()
  return set(config_fields.flatten(json.loads(config.to_json_best_effort())))


@pytest.mark.parametrize('module', CONFIG_MODULES)
def test_every_field_of_every_config_is_registered(module):
  assert _fields(module) - config_fields.FIELDS.keys() == set()


def test_every_registered_field_is_a_field_of_the_papers_config():
  assert config_fields.FIELDS.keys() - _fields('imagenet') == set()


def _old_workdir(tmp_path, config, *removed):
  """A workdir whose config.json was written before the `removed` fields existed."""
  saved = json.loads(config.to_json_best_effort())
  for dotted in removed:
    *parents, name = dotted.split('.')
    node = saved
    for parent in parents:
      node = node[parent]
    del node[name]
  (tmp_path / config_checks.CONFIG_FILE).write_text(json.dumps(saved))
  return tmp_path


def _digits():
  from configs import default  # pylint: disable=g-import-not-at-top
  return default.get_config()


def test_a_workdir_from_before_added_fields_resumes(tmp_path):
  added = [n for n, f in config_fields.FIELDS.items() if f.added is not config_fields.ALWAYS]
  assert {'input_channels', 'model.conv1_padding', 'parallelism'} <= set(added)
  workdir = _old_workdir(tmp_path, _digits(), *added)
  config_checks.check_workdir(_digits(), workdir)  # Raised "input_channels: workdir None, now 3".


def test_an_old_workdir_is_still_refused_where_its_run_differs(tmp_path):
  workdir = _old_workdir(tmp_path, _digits(), 'input_channels')
  config = _digits()
  config.input_channels = 1
  with pytest.raises(ValueError, match=r'input_channels: workdir 3, now 1'):
    config_checks.check_workdir(config, workdir)


def test_resume_rules_come_from_the_registry(tmp_path):
  workdir = _old_workdir(tmp_path, _digits())
  config = _digits()  # cosine: the horizon is fixed.
  config.eval_batch_size, config.parallelism = 32, 'mesh'  # Free.
  config_checks.check_workdir(config, workdir)
  config.num_epochs = 7.0
  with pytest.raises(ValueError, match='num_epochs: workdir 5.0, now 7.0.*cosine'):
    config_checks.check_workdir(config, workdir)
  config.lr_schedule = 'constant'  # Then it is free, and lr_schedule is not.
  with pytest.raises(ValueError, match="lr_schedule: workdir 'cosine', now 'constant'"):
    config_checks.check_workdir(config, workdir)


@pytest.mark.slow
@pytest.mark.parametrize('field, value', [('input_channels', 1), ('model.conv1_padding', 4)])
def test_a_checkpoint_of_other_shapes_is_refused_naming_the_field(tiny_runs, field, value):
  config = inference.load_config(None, tiny_runs['a'])
  *parents, name = field.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  with config.unlocked():
    node[name] = value
  with pytest.raises(checkpointing.CheckpointError, match=rf'{field}: checkpoint \S+, this run'):
    inference.load_state(config, tiny_runs['a'])


def test_a_checkpoint_from_before_added_fields_restores_into_their_old_values():
  saved = {'num_classes': 10, 'model': {'variant': 'paper'}, 'optimizer': 'sgd',
           'image_size': 64}
  now = config_fields.with_added_defaults(saved)
  checkpointing.check_compatible(saved, now, 'here')
  with pytest.raises(checkpointing.CheckpointError, match='input_channels: checkpoint 3, this '
                     'run 1'):
    checkpointing.check_compatible(saved, {**now, 'input_channels': 1}, 'here')


def test_loading_an_old_config_fills_its_added_fields(tmp_path):
  workdir = _old_workdir(tmp_path, _digits(), 'input_channels', 'model.ops')
  config = inference.load_config(None, workdir)
  assert isinstance(config, ml_collections.ConfigDict)
  assert (config.input_channels, config.model.ops) == (3, 'auto')
  assert config.model.dropout_rate == _digits().model.dropout_rate
