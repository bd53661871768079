"""Every tool on every run: evaluate, predict, neighbours and features run a model trained under
any `config.parallelism` on this host's devices (`parallel.on_this_host`), and write workdirs
through etils.epath (a path only epath can reach: a mocked gs:// bucket).

conftest's tiny run 'a', its config saying it was trained under 'model' (a checkpoint holds the
same params tree under every parallelism), is evaluated on a host of ONE device and compared
with its evaluation on 2 devices split as it says.
"""

import json
import os
import pathlib
import shutil

from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing
import jax
import numpy as np
import pytest

from alexnet_jax import evaluation
from alexnet_jax import features
from alexnet_jax import inference
from alexnet_jax import input_pipeline
from alexnet_jax import normalize
from alexnet_jax import parallel
from alexnet_jax import plots
from alexnet_jax import train_state
from started import Started


@pytest.fixture(scope='module')
def model_run(tiny_runs, tmp_path_factory):
  """Run a's workdir, its config saying parallelism='model' over 2 devices."""
  workdir = tmp_path_factory.mktemp('model_run') / 'run'
  shutil.copytree(tiny_runs['a'], workdir, ignore=shutil.ignore_patterns('features', 'eval_*'))
  config = json.loads((workdir / 'config.json').read_text())
  config.update(parallelism='model', model_parallel_size=2, num_devices=2)
  (workdir / 'config.json').write_text(json.dumps(config))
  return workdir


@pytest.fixture(scope='module')
def one_device(model_run, tiny_imagenette, env):
  """evaluate, predict and neighbours on model_run in processes that see one device."""
  photo = sorted((tiny_imagenette / 'val').glob('*/*'))[0]
  env = {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  return Started({
      'evaluate': ('alexnet_jax.evaluate', [f'--workdir={model_run}']),
      'predict': ('alexnet_jax.predict', [f'--workdir={model_run}', str(photo)]),
      'neighbours': ('alexnet_jax.neighbours', [f'--workdir={model_run}', '--k=2',
                                                '--eval_index=0']),
  }, env)


def _config(workdir, parallelism: str, num_devices: int):
  config = inference.load_config(None, workdir)
  config.parallelism, config.num_devices = parallelism, num_devices
  return parallel.on_this_host(config)


@pytest.mark.usefixtures('one_device')  # Started first: they run while this test does.
def test_the_params_are_one_tree_under_every_parallelism(model_run):
  shapes = [jax.tree.map(lambda x: x.shape,
                         train_state.zeros_state(_config(model_run, p, 2)).params)
            for p in parallel.PARALLELISMS]
  assert shapes[0] == shapes[1] == shapes[2]
  assert train_state.model_ops(_config(model_run, 'model', 2)) == 'partitionable'


def test_the_host_rule(model_run, caplog):
  assert _config(model_run, 'model', 2).parallelism == 'model'
  assert _config(model_run, 'model', 4).parallelism == 'model'
  for devices in (1, 3):
    config = _config(model_run, 'model', devices)
    assert (config.parallelism, config.num_devices) == ('mesh', devices)
  assert "running it data-parallel (parallelism='mesh')" in caplog.text
  config = _config(model_run, 'pmap', 8)  # More than the 4 devices here: all of them.
  assert (config.parallelism, config.num_devices) == ('pmap', 0)


@pytest.mark.slow
def test_a_model_parallel_run_evaluates_on_one_device_as_on_two(model_run, one_device):
  status, stdout, stderr = one_device['evaluate']
  assert status == 0, stderr[-3000:]
  assert "parallelism='model'); 1 here cannot" in stderr
  report = json.loads((model_run / 'eval_step2_1crop.json').read_text())
  config = _config(model_run, 'model', 2)
  assert config.parallelism == 'model'
  split = evaluation.evaluate_state(config, inference.load_state(config, model_run), 1)
  assert report['count'] == split['count'] == 20
  assert report['top1'] == split['top1']
  assert report['loss'] == pytest.approx(split['loss'], rel=1e-5)
  assert f"top-1 accuracy {report['top1']:.4f}" in stdout


def test_predict_and_neighbours_run_a_model_parallel_run_on_one_device(one_device):
  for name in ('predict', 'neighbours'):
    status, stdout, stderr = one_device[name]
    assert status == 0, f'{name}: {stderr[-3000:]}'
    assert "running it data-parallel (parallelism='mesh')" in stderr
  assert one_device['predict'][1].count('%') == 5
  assert 'The 2 nearest of 40 train images' in one_device['neighbours'][1]


@pytest.mark.slow
@pytest.mark.parametrize('parallelism', parallel.PARALLELISMS)
def test_features_under_every_parallelism_are_what_fc8_reads(model_run, parallelism):
  """fc7 of 7 eval images (padded to the devices) through each parallelism on 2 devices,
  against the logits of a plain jitted forward pass: fc8 of them."""
  config = _config(model_run, parallelism, 2)
  assert config.parallelism == parallelism
  state = inference.load_state(config, model_run)
  batch = next(iter(input_pipeline.create_eval_iterator(config, crops=1)))
  images = {'image': batch['image'][:7]}
  fc7 = features.features_fn(state, parallel.for_config(config),
                             normalize.for_config(config))(images)
  logits = np.asarray(jax.jit(lambda x: state.apply_fn({'params': state.params}, x,
                                                       train=False))(
      normalize.for_config(config)(images)))
  fc8 = state.params['fc8']
  np.testing.assert_allclose(fc7 @ np.asarray(fc8['kernel']) + np.asarray(fc8['bias']), logits,
                             rtol=1e-4, atol=1e-4 * np.abs(logits).max())


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/... served by epath from tmp_path/...: a path only epath can reach
  (`pathlib.Path('gs://bucket/run') / 'x'` is the local gs:/bucket/run/x)."""
  # With TensorFlow installed, epath sends gs:// to tf.io.gfile whatever the mock says.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  def local(path):
    return os.fspath(path).replace('gs://bucket', str(tmp_path))

  def redirect(original, *paths, **kwargs):
    return original(*map(local, paths), **kwargs)
  names = ('copy', 'exists', 'glob', 'isdir', 'listdir', 'makedirs', 'mkdir', 'remove',
           'rename', 'replace', 'rmtree', 'stat')
  with epath_testing.mock_epath(**{name: redirect for name in names},
                                open=lambda original, path, mode: original(local(path), mode)):
    yield tmp_path


def test_features_and_pictures_go_to_a_workdir_that_only_epath_reaches(model_run, bucket):
  workdir = epath.Path('gs://bucket/run')
  assert not isinstance(workdir, pathlib.Path)
  config = _config(model_run, 'pmap', 2)
  state = inference.load_state(config, model_run)
  bank = features.split_features(config, state, workdir, 'train')
  local = bucket / 'run' / 'features' / f'fc7_train_{features.params_digest(state.params)}'
  np.testing.assert_array_equal(bank.features, np.load(local / 'features.npy')[:40])
  np.testing.assert_array_equal(bank.positions, np.arange(40))
  image = np.zeros((8, 8, 3), np.uint8)
  plots.plot_filters(np.ones((3, 3, 3, 4), np.float32), workdir / 'filters.png')
  plots.plot_neighbours([image], ['q'], [[image]], [['n']], workdir / 'neighbours.png')
  plots.plot_predictions([image], ['q'], np.ones((1, 5)) / 5, list('abcde'),
                         workdir / 'predictions.png')
  plots.plot_learning_curves([{'kind': 'train', 'step': 1, 'loss': 1.0, 'top1': 0.5,
                               'top5': 0.9}], workdir / 'curves.png')
  for name in ('filters', 'neighbours', 'predictions', 'curves'):
    assert (bucket / 'run' / f'{name}.png').read_bytes()[:4] == b'\x89PNG', name
