"""`python -m alexnet_jax.evaluate`: agrees with training, runs 10 crops, refuses bad input.

One tiny run on real Imagenette photos is trained for the whole module. The evaluate commands
only read its workdir, so they all start together once it is trained (their start-ups overlap)
and share the JAX compilation cache of test_main.py's `env`.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from alexnet_jax import checkpointing
from alexnet_jax import convert
from alexnet_jax import inference
from alexnet_jax import reporting
from test_main import REPO

STEPS = 4
# Imagenette (../shared/data, relative to REPO) at the smallest input of the paper network;
# one eval batch of 16 real photos.
NETTE = ['--config=configs/imagenette.py', '--config.batch_size=16',
         '--config.eval_batch_size=16', '--config.image_size=63', '--config.resize_size=66',
         '--config.steps_per_eval=1', '--config.log_every_steps=4',
         '--config.checkpoint_every_steps=4', '--config.eval_every_epochs=100',
         '--config.num_devices=2', f'--config.num_train_steps={STEPS}']
# Each command's flags after --workdir.
COMMANDS = {
    # The run's config on 1 device where training used 2: the same examples, the same numbers.
    'latest': ['--checkpoint=latest', *NETTE, '--config.num_devices=1'],
    # The config the run saved in its workdir.
    'ten_crops': ['--crops=10'],
    'bad_name': ['--checkpoint=newest'],
    'unknown_step': [f'--checkpoint={STEPS + 1}'],
}


def _start(module: str, *flags: str, env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', module, *flags], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of a started command."""
  stdout, stderr = process.communicate(timeout=600)
  return process.returncode, stdout, stderr


@pytest.fixture(scope='module')
def trained(tmp_path_factory, env):
  """An Imagenette workdir trained for STEPS steps, evaluated (and checkpointed) at the last."""
  workdir = tmp_path_factory.mktemp('trained')
  status, _, stderr = _finish(_start('alexnet_jax.main', f'--workdir={workdir}', *NETTE, env=env))
  assert status == 0, stderr[-3000:]
  return workdir


@pytest.fixture(scope='module')
def results(trained, env):
  """{name: (exit status, stdout, stderr)} of each of COMMANDS on the trained workdir."""
  processes = {name: _start('alexnet_jax.evaluate', f'--workdir={trained}', *flags, env=env)
               for name, flags in COMMANDS.items()}
  return {name: _finish(process) for name, process in processes.items()}


def _logged_eval(workdir) -> dict[str, float]:
  (record,) = [r for r in reporting.read_history(workdir)
               if r['kind'] == 'eval' and r['step'] == STEPS]
  return record


@pytest.mark.slow
def test_latest_on_one_device_equals_the_training_eval(trained, results):
  status, stdout, stderr = results['latest']
  assert status == 0, stderr[-3000:]
  logged = _logged_eval(trained)
  report = json.loads((trained / f'eval_step{STEPS}_1crop.json').read_text())
  assert report['step'] == STEPS and report['crops'] == 1 and report['count'] == 16
  assert report['top1'] == logged['top1'] and report['top5'] == logged['top5']
  assert report['loss'] == pytest.approx(logged['loss'], rel=1e-5)
  assert report['top1_error'] == pytest.approx(1 - logged['top1'])
  assert report['per_class'][0]['name'] == 'n01440764 tench'
  assert sum(row['count'] for row in report['per_class']) == 16
  assert f"top-1 accuracy {logged['top1']:.4f}" in stdout
  assert 'n01440764 tench' in stdout


@pytest.mark.slow
def test_ten_crops_of_real_photos_run_and_differ_from_the_centre_crop(trained, results):
  status, _, stderr = results['ten_crops']
  assert status == 0, stderr[-3000:]
  report = json.loads((trained / f'eval_step{STEPS}_10crop.json').read_text())
  assert report['crops'] == 10 and report['count'] == 16
  assert report['loss'] != pytest.approx(_logged_eval(trained)['loss'], rel=1e-4)


@pytest.mark.parametrize('name,message', [
    ('bad_name', "No checkpoint is called 'newest': name a step number, 'best' or 'latest'."),
    ('unknown_step', f'No checkpoint of step {STEPS + 1} in '),
])
@pytest.mark.slow
def test_bad_checkpoint_is_one_clear_line_and_nonzero_exit(results, name, message):
  status, _, stderr = results[name]
  assert status == 1
  errors = [line for line in stderr.splitlines() if line.startswith('E')]
  assert len(errors) == 1 and message in errors[0], stderr[-3000:]
  assert 'Traceback' not in stderr


# The in-process checks read conftest's tiny run (checkpoints at steps 1 and 2, evaluated at
# 2), which the fast tier trains anyway, rather than `trained`, a fresh process of its own.
TINY_STEPS = 2


def test_best_step_and_weights_file_give_the_evaluated_params(tiny_runs, tmp_path):
  trained = tiny_runs['a']
  config = inference.load_config(None, trained)
  states = {which: inference.load_state(config, trained, which)
            for which in ('latest', 'best', TINY_STEPS)}
  convert.save_npz(states['latest'].params, tmp_path / 'params.npz')
  states['npz'] = inference.load_state(config, trained, init_from=tmp_path / 'params.npz')
  for state in states.values():
    for a, b in zip(jax.tree.leaves(states['latest'].params), jax.tree.leaves(state.params)):
      np.testing.assert_array_equal(a, b)
  assert int(states['best'].step) == TINY_STEPS


@pytest.mark.parametrize('call,error,message', [
    (lambda config, workdir: inference.load_state(config, workdir, TINY_STEPS + 1),
     checkpointing.CheckpointError, f'No checkpoint of step {TINY_STEPS + 1} in .*its steps '
                                    r'are \[1, 2\]'),
    (lambda config, workdir: inference.load_state(config, workdir / 'none'),
     checkpointing.CheckpointError, 'No checkpoints in'),
    (lambda config, workdir: inference.load_config(None, workdir / 'none'),
     FileNotFoundError, 'config.json does not exist'),
    (lambda config, workdir: inference.load_state(config, workdir,
                                                  init_from=workdir / 'metrics.jsonl'),
     ValueError, 'is neither an .npz'),
])
def test_user_errors_say_what_is_wrong(tiny_runs, call, error, message):
  with pytest.raises(error, match=message):
    call(inference.load_config(None, tiny_runs['a']), tiny_runs['a'])


def test_damaged_weights_file_is_a_clear_error(tiny_runs, tmp_path):
  trained = tiny_runs['a']
  (tmp_path / 'broken.npz').write_bytes(b'not a zip file')
  with pytest.raises(ValueError, match=r"Cannot use init_from='.*broken.npz': "):
    inference.load_state(inference.load_config(None, trained), trained,
                         init_from=tmp_path / 'broken.npz')


def test_config_saved_before_newer_fields_still_loads_and_validates(tmp_path):
  """A config.json written before parallelism, plateau_threshold_mode, input_channels,
  divide_by_255, model_parallel_size, model.conv1_padding and model.ops existed gets their old
  behaviour."""
  from alexnet_jax import config_checks  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  saved = json.loads(default.get_config().to_json_best_effort())
  for name in ('parallelism', 'plateau_threshold_mode', 'input_channels', 'divide_by_255',
               'model_parallel_size'):
    del saved[name]
  del saved['model']['conv1_padding'], saved['model']['ops']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = inference.load_config(None, tmp_path)
  config_checks.validate(config)
  assert (config.parallelism, config.plateau_threshold_mode, config.input_channels,
          config.divide_by_255, config.model_parallel_size, config.model.conv1_padding,
          config.model.ops) == ('pmap', 'abs', 3, False, 2, None, 'auto')
