"""`python -m alexnet_jax.predict` on real photos, and the class names it prints.

The workdir is made here as an Imagenette run leaves it (config.json and a checkpoint), with
random weights: what is checked is the command, not the model. It runs as a subprocess with the
JAX compilation cache of test_main.py's `env`.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from alexnet_jax import checkpointing
from alexnet_jax import config_checks
from alexnet_jax import labels
from alexnet_jax import train_state
from configs import default
from configs import imagenet
from configs import imagenette
from test_main import REPO


def _small_imagenette():
  config = imagenette.get_config()
  config.image_size = 63  # The paper network's smallest input.
  config.resize_size = 66
  return config


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> pathlib.Path:
  """An Imagenette workdir: config.json and a step-0 checkpoint of He-random weights."""
  config = _small_imagenette()
  workdir = tmp_path_factory.mktemp('run')
  rng = np.random.default_rng(0)
  state = train_state.zeros_state(config)
  state = state.replace(params={
      layer: {'kernel': rng.normal(0, np.sqrt(2 / np.prod(p['kernel'].shape[:-1])),
                                   p['kernel'].shape).astype(np.float32),
              'bias': p['bias']}
      for layer, p in state.params.items()})
  manager = checkpointing.create_manager(workdir / checkpointing.DIRECTORY, keep=1)
  checkpointing.save(manager, state, {'config': checkpointing.config_to_dict(config)})
  checkpointing.wait(manager)
  manager.close()
  config_checks.write_config(config, workdir)
  return workdir


@pytest.mark.slow
def test_prints_top5_names_of_real_photos_and_survives_a_broken_file(
    workdir, imagenet_samples_dir, tmp_path, env):
  photos = sorted(imagenet_samples_dir.glob('*.JPEG'))[:4]
  folder = tmp_path / 'photos'
  folder.mkdir()
  for photo in photos[:3]:
    (folder / photo.name).symlink_to(photo)
  (folder / 'broken.jpg').write_bytes(os.urandom(3000))
  picture = tmp_path / 'predictions.png'
  result = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.predict', f'--workdir={workdir}', str(folder),
       str(photos[3]), f'--picture={picture}'], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=600, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('E')]
  assert len(errors) == 1, result.stderr[-3000:]
  assert 'broken.jpg: cannot classify: Unknown image file format' in errors[0]
  assert 'Traceback' not in result.stderr
  names = labels.class_names(_small_imagenette())
  assert result.stdout.endswith(f'Wrote {picture}\n')
  with Image.open(picture) as image:
    # The 4 classified photos in a row of cells 240 x 320 pixels (the broken file has none).
    assert image.size == (4 * 240, 320)
    assert np.asarray(image.convert('L')).std() > 10
  blocks = re.split(r'^(?=\S)', result.stdout.removesuffix(f'Wrote {picture}\n'),
                    flags=re.M)[1:]
  assert [block.splitlines()[0] for block in blocks] == (
      [str(folder / photo.name) for photo in photos[:3]] + [str(photos[3])])
  for block in blocks:
    rows = [re.fullmatch(r'\s+(\d+\.\d\d)%  (.+)', line).groups()
            for line in block.splitlines()[1:]]
    probabilities = [float(p) for p, _ in rows]
    assert len(rows) == 5 and probabilities == sorted(probabilities, reverse=True)
    assert {name for _, name in rows} <= set(names)


def test_imagenet_names_follow_the_tfds_label_order(imagenet_samples_dir):
  names = labels.class_names(imagenet.get_config())
  assert len(names) == len(set(names)) == 1000
  # The sample photos are named WNID_name with Keras' names.
  wnids = [name.split(' ', 1)[0] for name in names]
  for photo in imagenet_samples_dir.glob('*.JPEG'):
    wnid, name = photo.stem.split('_', 1)
    assert names[wnids.index(wnid)] == f"{wnid} {name.replace('_', ' ')}"


def test_folder_and_digit_names():
  assert labels.class_names(_small_imagenette())[:2] == ['n01440764 tench',
                                                         'n02102040 English springer']
  assert labels.class_names(default.get_config()) == [str(c) for c in range(10)]


def test_unknown_class_count_is_a_clear_error():
  config = default.get_config()
  config.num_classes = 7
  with pytest.raises(ValueError, match='config.num_classes=7 but digits has 10 classes'):
    labels.class_names(config)
