"""Starting from given weights (config.init_from), exporting a run's weights, and its plots.

One short digits run, fine-tuned from a 1000-class .npz and then resumed, is the trained workdir
of every test here; its runs share a JAX compilation cache as in test_main.py.
"""

import json
import logging
import re
import subprocess
import sys

from flax import traverse_util
import jax
import numpy as np
from PIL import Image
import pytest
import torch

from alexnet_jax import convert
from alexnet_jax import torch_reference
from alexnet_jax import train
from configs import default as default_config
# `env` is test_main's fixture (a compilation cache shared by this module's runs).
from test_main import REPO, TINY, final_params, run_main

IMAGE_SIZE = 63  # TINY's: pool5 is 1x1x256, so fc6 is [256, 4096].
assert f'--config.image_size={IMAGE_SIZE}' in TINY


def torch_state_dict(variant: str, num_classes: int, image_size: int = IMAGE_SIZE, seed: int = 0):
  """A randomly initialised torch AlexNet's state_dict: weights from outside this codebase."""
  torch.manual_seed(seed)
  return torch_reference.TorchAlexNet(variant, num_classes, image_size).state_dict()


def paper_params(num_classes: int, image_size: int = IMAGE_SIZE) -> convert.Params:
  return convert.torch_state_dict_to_flax(torch_state_dict('paper', num_classes, image_size),
                                          'paper', image_size)


@pytest.fixture(scope='module')
def imagenet_npz(tmp_path_factory):
  """An .npz of a paper AlexNet with ImageNet's 1000 classes."""
  path = tmp_path_factory.mktemp('weights') / 'imagenet.npz'
  convert.save_npz(paper_params(1000), path)
  return path


@pytest.fixture(scope='module')
def runs(tmp_path_factory, env, imagenet_npz):
  """Two steps fine-tuned from `imagenet_npz`, then one more resumed: (workdir, logs)."""
  workdir = tmp_path_factory.mktemp('finetuned')
  logs = []
  for steps in (2, 3):
    # A constant schedule: under cosine the horizon (num_train_steps) may not change.
    result = run_main(workdir, f'--config.num_train_steps={steps}', '--config.lr_schedule=constant',
                      f'--config.init_from={imagenet_npz}', env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    logs.append(result.stderr)
  return workdir, logs


def digits_config():
  config = default_config.get_config()
  config.image_size = IMAGE_SIZE
  return config


@pytest.mark.slow
def test_fine_tuning_starts_with_a_new_fc8_and_resuming_ignores_init_from(runs, imagenet_npz):
  _, (first, resumed) = runs
  assert 'init_from: fc8 has 1000 classes, config has 10: fc8 re-initialised.' in first
  assert f'init_from: starting from the weights in {imagenet_npz}' in first
  assert '[2] eval' in first
  assert 'Resuming from the checkpoint at step 2' in resumed
  assert 'init_from:' not in resumed


@pytest.mark.slow
def test_step_zero_holds_the_loaded_weights_but_a_new_fc8(imagenet_npz, caplog):
  with caplog.at_level(logging.INFO):
    state = train.create_train_state(digits_config(), jax.random.PRNGKey(0), str(imagenet_npz))
  assert 'fc8 has 1000 classes, config has 10: fc8 re-initialised' in caplog.text
  assert int(state.step) == 0
  params = traverse_util.flatten_dict(state.params, sep='/')
  loaded = traverse_util.flatten_dict(convert.load_npz(imagenet_npz), sep='/')
  assert params.keys() == loaded.keys()
  for key in params.keys() - {'fc8/kernel', 'fc8/bias'}:
    np.testing.assert_array_equal(params[key], loaded[key], err_msg=key)
  assert params['fc8/kernel'].shape == (4096, 10) and np.isfinite(params['fc8/kernel']).all()


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['paper', 'torchvision'])
def test_torch_state_dict_gives_the_converted_params(tmp_path, variant):
  state_dict = torch_state_dict(variant, 1000, seed=1)
  torch.save(state_dict, tmp_path / 'alexnet.pth')
  fresh = convert.torch_state_dict_to_flax(torch_state_dict(variant, 10, seed=2), variant,
                                           IMAGE_SIZE)
  params = convert.initial_params(tmp_path / 'alexnet.pth', fresh, variant, IMAGE_SIZE)
  expected = convert.torch_state_dict_to_flax(state_dict, variant, IMAGE_SIZE)
  expected['fc8'] = fresh['fc8']  # 1000 classes to 10: fc8 stays the run's own.
  jax.tree.map(np.testing.assert_array_equal, params, expected)


@pytest.mark.slow
def test_a_damaged_init_from_file_stops_main_with_one_line(tmp_path, env, imagenet_npz):
  damaged = tmp_path / 'damaged.npz'
  damaged.write_bytes(imagenet_npz.read_bytes()[:4096])  # A download cut short.
  result = run_main(tmp_path / 'run', f'--config.init_from={damaged}', env=env, timeout=300)
  assert result.returncode == 1
  assert f"Cannot use init_from='{damaged}'" in result.stderr
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not any(
      (tmp_path / 'run' / 'checkpoints').iterdir())


@pytest.mark.parametrize('mismatch,message', [
    ('built for 96 px',  # pool5 is then 2x2x256.
     r"init_from='.*npz' has mis-shaped arrays: fc6/kernel: got \(1024, 4096\), expected "
     r'\(256, 4096\)'),
    ('conv1 only', r"missing \['conv2/bias', 'conv2/kernel'"),
])
def test_other_mismatches_are_errors_naming_the_layers(tmp_path, mismatch, message):
  fresh = paper_params(10)
  params = paper_params(10, 96) if mismatch == 'built for 96 px' else {'conv1': fresh['conv1']}
  convert.save_npz(params, tmp_path / 'weights.npz')
  with pytest.raises(ValueError, match=message):
    convert.initial_params(tmp_path / 'weights.npz', fresh, 'paper', IMAGE_SIZE)


def test_export_round_trip_with_config(runs, tmp_path, capsys):
  workdir, _ = runs
  out = tmp_path / 'exported.npz'
  convert.main([f'--workdir={workdir}', f'--out={out}'])
  assert "of the 'paper' AlexNet (step 3, the latest checkpoint) and its config" in (
      capsys.readouterr().out)
  checkpoint = final_params(workdir)
  with np.load(out) as npz:  # As anyone would read it: numpy alone.
    assert set(npz.files) == {key.removeprefix('/params/') for key in checkpoint
                              if key.startswith('/params/')} | {'config'}
    for key in set(npz.files) - {'config'}:
      np.testing.assert_array_equal(npz[key], checkpoint[f'/params/{key}'], err_msg=key)
    config = json.loads(str(npz['config']))
  assert config == json.loads((workdir / 'config.json').read_text())
  assert (config['num_classes'], config['model']['variant']) == (10, 'paper')


def test_export_of_the_best_checkpoint(runs, tmp_path, capsys):
  workdir, _ = runs
  evals = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  best = max((r['top1'], r['step']) for r in evals if r['kind'] == 'eval')[1]
  convert.main([f'--workdir={workdir}', f'--out={tmp_path / "best.npz"}', '--checkpoint=best'])
  assert f'(step {best}, the best checkpoint)' in capsys.readouterr().out
  checkpoint = final_params(workdir, best)
  exported = convert.load_npz(tmp_path / 'best.npz')
  for key, array in traverse_util.flatten_dict(exported, sep='/').items():
    np.testing.assert_array_equal(array, checkpoint[f'/params/{key}'], err_msg=key)


def test_plots_command_draws_curves_and_filters(runs):
  workdir, _ = runs
  for name in ('curves.png', 'filters.png'):
    (workdir / name).unlink(missing_ok=True)
  result = subprocess.run([sys.executable, '-m', 'alexnet_jax.plots', f'--workdir={workdir}'],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  # The paper variant's two groups of conv1 kernels (conv2's halves), each with its number.
  assert re.search(r'^  kernels 0-47 \(group 1 of 2\): mean colour share 0\.\d{4}\n'
                   r'  kernels 48-95 \(group 2 of 2\): mean colour share 0\.\d{4}$',
                   result.stdout, flags=re.M), result.stdout
  # (width, height). curves: 12 x 4.5 inches at 100 dpi. filters: conv1's 96 11x11 kernels in
  # 2 groups of 4 rows of 12, 1 px apart and around, each pixel drawn 4x4, each group under a
  # caption of 18 px: (12 * 12 + 1) * 4 wide and 2 * ((4 * 12 + 1) * 4 + 18) high.
  for name, size in (('curves.png', (1200, 450)), ('filters.png', (580, 428))):
    with Image.open(workdir / name) as image:
      assert image.size == size, name
      assert np.asarray(image.convert('L')).std() > 10, f'{name} is blank'
