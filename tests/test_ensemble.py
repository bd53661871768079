"""Ensembles (the paper's section 7): `python -m alexnet_jax.evaluate --workdir=A --ensemble=B`.

On conftest's two tiny trained models. The reference is numpy: each model's logits from its own
forward pass on the eval batches, softmax, averaged over crops and models, ranked by argsort.
"""

import json
import re

import jax
import numpy as np
import pytest

from alexnet_jax import ensemble
from alexnet_jax import evaluation
from alexnet_jax import inference
from alexnet_jax import input_pipeline
from alexnet_jax import normalize
from started import Started


@pytest.fixture(scope='module')
def commands(tiny_runs, tmp_path_factory, env):
  """The ensemble of a and b with 10 crops, and one with a model of another image size (its
  workdir: a's config at 64 px, nothing trained), started together (see `Started`)."""
  other = tmp_path_factory.mktemp('other_size')
  config = json.loads((tiny_runs['a'] / 'config.json').read_text())
  config['image_size'] = 64
  (other / 'config.json').write_text(json.dumps(config))
  return Started({
      'pair': ('alexnet_jax.evaluate', [f"--workdir={tiny_runs['a']}",
                                        f"--ensemble={tiny_runs['b']}", '--crops=10']),
      'other_size': ('alexnet_jax.evaluate', [f"--workdir={tiny_runs['a']}",
                                              f'--ensemble={other}']),
  }, env)


def _load(workdir):
  config = inference.load_config(None, workdir)
  return config, inference.load_state(config, workdir)


def _numpy_probabilities(config, states, crops: int):
  """Per model: softmax of its logits averaged over the crops, [models, examples, classes],
  and the labels of the real (unpadded) examples."""
  forward = jax.jit(lambda params, images: states[0].apply_fn({'params': params}, images,
                                                              train=False))
  probs, labels = [[] for _ in states], []
  for batch in input_pipeline.create_eval_iterator(config, crops=crops):
    mask = batch['mask']
    images = normalize.for_config(config)({'image': batch['image'][mask]})
    labels.append(batch['label'][mask])
    for model, state in enumerate(states):
      logits = np.asarray(forward(state.params, images.reshape((-1,) + images.shape[-3:])),
                          np.float64).reshape(len(images), crops, -1)
      p = np.exp(logits - logits.max(axis=-1, keepdims=True))
      probs[model].append((p / p.sum(axis=-1, keepdims=True)).mean(axis=1))
  return np.array([np.concatenate(p) for p in probs]), np.concatenate(labels)


def _numpy_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """top-1, top-5 (ties to the lower class, as argsort) and loss of probs [examples, classes]."""
  ranked = np.argsort(-probs, axis=-1, kind='stable')
  return {'top1': float(np.mean(ranked[:, 0] == labels)),
          'top5': float(np.mean(np.any(ranked[:, :5] == labels[:, None], axis=-1))),
          'loss': float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))}


@pytest.mark.slow
@pytest.mark.usefixtures('commands')  # Started first: they run while this test does.
def test_an_ensemble_of_one_model_is_that_models_evaluation(tiny_runs):
  config, state = _load(tiny_runs['a'])
  alone = evaluation.evaluate_state(config, state, 1)
  combined = evaluation.evaluate_state(config, ensemble.combine([state]), 1)
  assert combined['count'] == alone['count'] == 20
  for key in ('top1', 'top5', 'per_class_top1', 'per_class_count', 'crops'):
    assert combined[key] == alone[key], key
  # The ensemble's log-probabilities pass through log_softmax once more: float32 rounding.
  assert combined['loss'] == pytest.approx(alone['loss'], rel=1e-6)


@pytest.mark.slow
def test_an_ensemble_of_two_is_their_averaged_softmax(tiny_runs, commands):
  status, stdout, stderr = commands['pair']
  assert status == 0, stderr[-3000:]
  report = json.loads((tiny_runs['a'] / 'eval_ensemble2_10crop.json').read_text())
  config = inference.load_config(None, tiny_runs['a'])
  states = [_load(tiny_runs[name])[1] for name in ('a', 'b')]
  probs, labels = _numpy_probabilities(config, states, 10)
  expected = _numpy_metrics(probs.mean(axis=0), labels)
  members = [_numpy_metrics(p, labels) for p in probs]
  assert report['crops'] == 10 and report['count'] == 20
  assert [m['weights'] for m in report['members']] == [
      f"step 2 of {tiny_runs['a']}", f"step 1 of {tiny_runs['b']}"]
  for got, want in zip([report, *report['members']], [expected, *members]):
    assert got['top1'] == pytest.approx(want['top1'], abs=1e-9)
    assert got['top5'] == pytest.approx(want['top5'], abs=1e-9)
    assert got['loss'] == pytest.approx(want['loss'], rel=1e-5)
  # Two models one SGD step apart: the ensemble is neither.
  for member in members:
    assert abs(expected['loss'] - member['loss']) > 1e-3
  table = stdout[stdout.index('Side by side:'):]
  assert f"{report['top1']:6.4f}  {report['top5']:6.4f}" in table.splitlines()[-2]
  assert 'ensemble of 2 (softmax averaged)' in table


def test_models_of_another_image_size_are_one_clear_error(commands):
  status, _, stderr = commands['other_size']
  assert status == 1
  errors = [line for line in stderr.splitlines() if line.startswith('E')]
  assert len(errors) == 1, stderr[-3000:]
  assert 'must share their classes, image size and evaluation preprocessing' in errors[0]
  assert 'image_size=64 where the first has 63' in errors[0]
  assert 'Traceback' not in stderr


@pytest.mark.parametrize('change,message', [
    ({'num_classes': 9}, 'num_classes=9 where the first has 10'),
    ({'divide_by_std': False}, 'std (another array)'),
    ({'resize_size': 70}, 'resize_size=70 where the first has 66'),
])
def test_members_must_share_classes_and_evaluation_input(tiny_runs, tmp_path, change, message):
  config = json.loads((tiny_runs['a'] / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**config, **change}))
  with pytest.raises(ValueError, match=rf'{tmp_path} differs from .*: {re.escape(message)}'):
    ensemble.load_members([tiny_runs['a'], tmp_path])


def test_a_workdir_named_twice_is_an_error(tiny_runs):
  with pytest.raises(ValueError, match='names a workdir twice'):
    ensemble.load_members([tiny_runs['a'], f"{tiny_runs['a']}/"])


def test_members_may_train_differently_but_mirrored_crops_need_mirrors(tiny_runs, tmp_path):
  """A member trained without flips joins centre-crop and 5-crop ensembles; 10 crops (mirrors)
  are refused, naming it and the field."""
  config = json.loads((tiny_runs['a'] / 'config.json').read_text())
  changed = {**config, 'pca_lighting_std': 0.0, 'random_flip': False, 'learning_rate': 0.5}
  (tmp_path / 'config.json').write_text(json.dumps(changed))
  workdirs = [tiny_runs['a'], tmp_path]
  configs = [inference.load_config(None, w) for w in workdirs]
  assert configs[0].random_flip
  ensemble.check_compatible(configs, workdirs)
  for crops in (1, 5):
    ensemble.check_crops(configs, workdirs, crops)
  with pytest.raises(ValueError, match=rf'^{tmp_path} was trained without mirrors '
                     r'\(random_flip=False\), and the 10 crops'):
    ensemble.check_crops(configs, workdirs, 10)
  # The first member unmirrored: its 10 crops are the 5 unmirrored ones, which all members saw.
  ensemble.check_crops(configs[::-1], workdirs[::-1], 10)
