"""Evaluators against numpy: top-k and per-class accuracy from the model's logits, and a
brute-force k-NN on the same fc7 features; the loop's cadence and best metric; the command."""

import collections
import json
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from alexnet_jax import checkpointing
from alexnet_jax import evaluators
from alexnet_jax import features
from alexnet_jax import inference
from alexnet_jax import input_pipeline
from alexnet_jax import normalize
from alexnet_jax import parallel
from alexnet_jax import reporting
from alexnet_jax import train
from conftest import REPO

ALL = {'eval': {'kind': 'classification'}, 'per_class': {'kind': 'per_class'},
       'knn': {'kind': 'knn', 'k': 3}}


@pytest.fixture(scope='module')
def model(tiny_runs):
  """(config with ALL evaluators, host state) of the tiny trained run."""
  config = parallel.on_this_host(inference.load_config(None, tiny_runs['a']))
  config.evaluators = ml_collections.ConfigDict(ALL)
  return config, inference.load_state(config, tiny_runs['a'])


@pytest.fixture(scope='module')
def measured(model):
  return evaluators.evaluate_state(*model)


def _numpy_logits(config, state):
  """Logits [n, classes] and labels [n] of the eval split's centre crops, batch by batch."""
  normalization = normalize.for_config(config)
  logits, labels = [], []
  for batch in input_pipeline.create_eval_iterator(config, crops=1):
    mask = batch['mask']
    out = state.apply_fn({'params': state.params}, normalization(batch), train=False)
    logits.append(np.asarray(out, np.float64)[mask])
    labels.append(batch['label'][mask])
  return np.concatenate(logits), np.concatenate(labels)


def test_classification_and_per_class_match_numpy(model, measured):
  logits, labels = _numpy_logits(*model)
  ranked = np.argsort(-logits, axis=1)
  top1 = ranked[:, 0] == labels
  top5 = (ranked[:, :5] == labels[:, None]).any(axis=1)
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  loss = -log_probs[np.arange(len(labels)), labels].mean()
  eval_metrics = measured['eval']
  assert eval_metrics['count'] == len(labels) == 20
  np.testing.assert_allclose([eval_metrics['top1'], eval_metrics['top5']],
                             [top1.mean(), top5.mean()])
  np.testing.assert_allclose(eval_metrics['loss'], loss, rtol=1e-4)
  per_class = np.array([top1[labels == c].mean() for c in range(10)])
  np.testing.assert_allclose(measured['per_class']['per_class_top1'], per_class)
  np.testing.assert_allclose(measured['per_class']['mean_class_top1'], per_class.mean())
  np.testing.assert_allclose(measured['per_class']['worst_class_top1'], per_class.min())


def _numpy_knn_top1(bank, queries, k):
  """Brute force: every distance in float64, a stable sort, a counted vote whose ties go to
  the label met first."""
  x = np.asarray(bank.features, np.float64)
  q = np.asarray(queries.features, np.float64)
  distances = np.sqrt(((q[:, None, :] - x[None, :, :]) ** 2).sum(-1))
  predicted = []
  for row in np.argsort(distances, axis=1, kind='stable')[:, :k]:
    counts = collections.Counter(bank.labels[row].tolist())
    most = max(counts.values())
    predicted.append(next(label for label in bank.labels[row] if counts[label] == most))
  return float(np.mean(np.array(predicted) == queries.labels))


@pytest.fixture(scope='module')
def knn_reference(model, tmp_path_factory):
  config, state = model
  bank = features.compute_split(config, state, config.train_split,
                                tmp_path_factory.mktemp('train_bank'))
  queries = features.compute_split(config, state, config.eval_split,
                                   tmp_path_factory.mktemp('val_bank'))
  return _numpy_knn_top1(bank, queries, ALL['knn']['k'])


def test_knn_matches_a_numpy_knn_on_the_same_features(measured, knn_reference):
  assert measured['knn']['count'] == 20
  assert measured['knn']['top1'] == knn_reference
  assert measured['knn']['top1'] > 0.1  # Above chance, so the vote is not all one label.


def test_knn_vote_ties_go_to_the_nearest_label():
  labels = np.array([[2, 1, 1, 2, 0], [0, 3, 3, 0, 0], [4, 4, 4, 4, 4], [1, 2, 3, 4, 0]])
  np.testing.assert_array_equal(evaluators.knn_vote(labels, 5), [2, 0, 4, 1])
  rng = np.random.default_rng(0)
  drawn = rng.integers(0, 6, size=(200, 7))
  expected = []
  for row in drawn:
    counts = collections.Counter(row.tolist())
    most = max(counts.values())
    expected.append(next(label for label in row if counts[label] == most))
  np.testing.assert_array_equal(evaluators.knn_vote(drawn, 6), expected)


def _config(**evaluator_settings):
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config()
  config.evaluators = ml_collections.ConfigDict(evaluator_settings)
  return config


@pytest.mark.parametrize('settings, best, message', [
    ({'eval': {'kind': 'linear_probe'}}, 'eval/top1', "kind='linear_probe' is not one of"),
    ({'eval': {'kind': 'knn', 'crops': 10}}, 'eval/top1', r"has \['crops'\], which a 'knn'"),
    ({'eval': {'kind': 'knn', 'k': 0}}, 'eval/top1', 'must be positive'),
    ({'eval': {'kind': 'classification', 'crops': 3}}, 'eval/top1', 'crops=3 is not one of'),
    ({'eval': {'kind': 'classification'}}, 'knn/top1', "best_metric='knn/top1' must be"),
    ({'eval': {'kind': 'classification'}}, 'eval/loss', "best_metric='eval/loss' must be"),
    ({'eval': {'kind': 'knn'}}, 'eval/top1', "its kind must be 'classification'"),
    ({'eval': {'kind': 'classification'}, 'train': {'kind': 'per_class'}}, 'eval/top1',
     'may not be named'),
    ({'eval': {'kind': 'classification'}, 'a/b': {'kind': 'per_class'}}, 'eval/top1',
     'may not be named'),
])
def test_bad_evaluator_settings_are_named(settings, best, message):
  config = _config(**settings)
  config.best_metric = best
  with pytest.raises(ValueError, match=message):
    evaluators.check(config)


def test_a_knn_evaluator_in_a_multi_process_job_is_refused(monkeypatch):
  # The search spans every process's devices while each feeds it the same rows.
  monkeypatch.setattr(evaluators.jax, 'process_count', lambda: 2)
  config = _config(eval={'kind': 'classification'}, knn={'kind': 'knn'})
  with pytest.raises(ValueError, match='runs in one process; this job has 2'):
    evaluators.check(config)
  evaluators.check(_config(eval={'kind': 'classification'}))  # Without k-NN it runs.


def test_due_follows_each_cadence_and_all_run_last():
  config = _config(eval={'kind': 'classification'},
                   knn={'kind': 'knn', 'every_epochs': 2.0})
  config.eval_every_epochs = 0.5
  chosen = evaluators.create(config, None, None)
  assert [evaluators.due(chosen, step, 10, 45) for step in (5, 10, 20, 45)] == [
      ['eval'], ['eval'], ['eval', 'knn'], ['eval', 'knn']]
  with pytest.raises(ValueError, match=r"No evaluator named \['knm'\]"):
    evaluators.create(config, None, None, ['knm'])


@pytest.mark.slow
def test_the_loop_runs_each_evaluator_at_its_cadence_and_keeps_the_best_by_best_metric(
    tmp_path, tiny_imagenette):
  from configs import imagenette  # pylint: disable=g-import-not-at-top
  config = imagenette.get_config()
  config.data_dir = str(tiny_imagenette)
  config.image_size, config.resize_size = 63, 66
  config.batch_size, config.eval_batch_size = 20, 16  # 2 steps an epoch.
  config.num_train_steps, config.warmup_epochs = 4, 0.0
  config.log_every_steps = config.checkpoint_every_steps = 1
  config.eval_every_epochs = 0.5
  config.evaluators = ml_collections.ConfigDict(
      {'eval': {'kind': 'classification'}, 'knn': {'kind': 'knn', 'k': 3, 'every_epochs': 1.0}})
  config.best_metric = 'knn/top1'
  # Nothing counts as a gain: each evaluation of best_metric divides the learning rate.
  config.lr_schedule, config.plateau_patience, config.plateau_min_delta = 'plateau', 1, 2.0
  _, final = train.train_and_evaluate(config, tmp_path)
  history = reporting.read_history(tmp_path)
  steps_of = lambda kind: [r['step'] for r in history if r['kind'] == kind]
  assert steps_of('eval') == [1, 2, 3, 4] and steps_of('knn') == [2, 4]
  assert steps_of('lr_drop') == [2, 4]  # The plateau rule reads knn/top1, not eval's.
  knn = [(r['top1'], r['step']) for r in history if r['kind'] == 'knn']
  assert final['best_metric'] == 'knn/top1'
  assert final['best_metric_value'] == max(knn)[0]
  assert set(final['evaluators']) == {'eval', 'knn'}
  manager = checkpointing.create_manager(tmp_path / checkpointing.DIRECTORY, 3, read_only=True)
  try:
    assert checkpointing.best_step(manager) == max(knn)[1]
    # Only the steps where knn ran carry a metric to rank by.
    assert [s for s in manager.all_steps() if manager.metrics(s)] == [2, 4]
  finally:
    manager.close()


@pytest.mark.slow
def test_the_evaluate_command_runs_the_configs_evaluators(tiny_runs, tmp_path, env,
                                                          knn_reference):
  workdir = tmp_path / 'run'  # A copy: the report is written into the workdir.
  shutil.copytree(tiny_runs['a'], workdir)
  saved = json.loads((workdir / 'config.json').read_text())
  config_file = tmp_path / 'with_evaluators.py'
  config_file.write_text(
      'import json\nimport ml_collections\n\n\ndef get_config():\n'
      f'  config = ml_collections.ConfigDict(json.loads({json.dumps(saved)!r}))\n'
      f'  config.evaluators = ml_collections.ConfigDict({ALL!r})\n'
      '  return config\n')
  result = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.evaluate', f'--workdir={workdir}',
       f'--config={config_file}', '--evaluators=knn,per_class'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / 'eval_step2_1crop.json').read_text())
  assert set(report['evaluators']) == {'knn', 'per_class'}
  assert report['evaluators']['knn']['top1'] == knn_reference
  assert f"knn: top1 {knn_reference:.4f}" in result.stdout
