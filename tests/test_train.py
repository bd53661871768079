"""Train state, optimizer, pmap train/eval steps, the loop and config checks."""

import functools
import time

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alexnet_jax import config_checks
from alexnet_jax import input_pipeline
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import steps
from alexnet_jax import train
from configs import default as default_config
from configs import fake_data_benchmark
from configs import imagenet
from configs import imagenette


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The digits config at the smallest sizes that still exercise every layer."""
  config = default_config.get_config()
  config.image_size = 64
  config.model.dropout_rate = 0.0
  config.warmup_epochs = 0.0
  config.weight_decay = 5e-4
  config.update(overrides)
  return config


@pytest.mark.parametrize('get_config,params', [
    (imagenet.get_config, 60_965_224),
    (fake_data_benchmark.get_config, 60_965_224),
    (imagenette.get_config, 60_965_224 - 990 * 4097),
])
def test_create_train_state_param_count_and_optimizer_structure(get_config, params):
  config = get_config()
  state = jax.eval_shape(lambda: train.create_train_state(config, jax.random.PRNGKey(0)))
  assert sum(x.size for x in jax.tree.leaves(state.params)) == params
  # The momentum trace mirrors the params leaf for leaf.
  (trace,) = [s.trace for s in state.opt_state.inner_state if hasattr(s, 'trace')]
  assert jax.tree.structure(trace) == jax.tree.structure(state.params)
  assert state.opt_state.hyperparams['learning_rate'].shape == ()


def test_default_config_state_is_real():
  state = train.create_train_state(tiny_config(), jax.random.PRNGKey(0))
  assert int(state.step) == 0 and float(state.plateau.scale) == 1.0
  assert np.isfinite(state.params['fc8']['kernel']).all()


def _sgd_updates(tx, params, grads_per_step, lrs):
  opt_state = tx.init(params)
  out = []
  for g, lr in zip(grads_per_step, lrs):
    opt_state = optim.with_learning_rate(opt_state, jnp.float32(lr))
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out


def test_paper_momentum_matches_hand_formula_across_learning_rate_drop():
  config = tiny_config(optimizer='paper_momentum', momentum=0.9, weight_decay=5e-4,
                       weight_decay_on_biases=False)
  params = {'conv': {'kernel': jnp.array([1.0, -2.0]), 'bias': jnp.array([0.5])}}
  grads = [{'conv': {'kernel': jnp.array([0.3, 0.1]), 'bias': jnp.array([-0.2])}}] * 3
  lrs = [0.01, 0.01, 0.001]  # A drop before the third step.
  got = _sgd_updates(optim.create_optimizer(config, params), params, grads, lrs)
  # By hand: v <- 0.9 v - 5e-4 lr w - lr g; w <- w + v (bias: no decay).
  w, b = np.array([1.0, -2.0]), np.array([0.5])
  vw, vb = np.zeros(2), np.zeros(1)
  for step, lr in enumerate(lrs):
    vw = 0.9 * vw - 5e-4 * lr * w - lr * np.array([0.3, 0.1])
    vb = 0.9 * vb - lr * np.array([-0.2])
    w, b = w + vw, b + vb
    np.testing.assert_allclose(got[step]['conv']['kernel'], w, rtol=1e-6)
    np.testing.assert_allclose(got[step]['conv']['bias'], b, rtol=1e-6)


def test_sgd_option_rescales_velocity_at_the_drop_unlike_the_paper():
  config = tiny_config(optimizer='sgd', momentum=0.9, weight_decay=0.0)
  params = {'w': jnp.array([0.0])}
  grads = [{'w': jnp.array([1.0])}] * 2
  got = _sgd_updates(optim.create_optimizer(config, params), params, grads, [0.1, 0.01])
  # optax.sgd / PyTorch: v = 0.9 v + g; w -= lr v. Step 2: v = 1.9, w = -0.1 - 0.019.
  np.testing.assert_allclose(got[1]['w'], [-0.1 - 0.01 * 1.9], rtol=1e-6)
  paper = _sgd_updates(optim.create_optimizer(tiny_config(
      optimizer='paper_momentum', momentum=0.9, weight_decay=0.0),
                                              params), params, grads, [0.1, 0.01])
  np.testing.assert_allclose(paper[1]['w'], [-0.1 - (0.9 * 0.1 + 0.01)], rtol=1e-6)


def test_plateau_divides_by_ten_after_patience_and_at_most_max_drops():
  config = tiny_config(lr_schedule='plateau', plateau_patience=2, plateau_max_drops=1)
  plateau, drops = optim.PlateauState.create(), []
  for top1 in [0.5, 0.6, 0.6, 0.6, 0.6, 0.6]:
    plateau, dropped = optim.update_plateau(plateau, top1, config)
    drops.append(dropped)
  assert drops == [False, False, False, True, False, False]
  assert float(plateau.scale) == pytest.approx(0.1)
  assert int(plateau.num_drops) == 1 and float(plateau.best) == pytest.approx(0.6)


def _run_steps(config, batch, num_devices, num_steps):
  devices = parallel.select_devices(num_devices)
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  p_step = parallel.pmap(functools.partial(
      steps.train_step, learning_rate_fn=optim.create_learning_rate_fn(config, 10)), devices,
                         donate_state=True)
  replicated = parallel.replicate(state, devices)
  losses = []
  for _ in range(num_steps):
    replicated, metrics = p_step(replicated, parallel.shard(batch, num_devices))
    losses.append(float(metrics['loss'][0]))
  return parallel.unreplicate(replicated), losses


@pytest.mark.slow
def test_train_steps_on_two_devices_decrease_loss_on_real_batch(small_real_batch):
  config = tiny_config(learning_rate=0.002, optimizer='sgd', lr_schedule='constant')
  state, losses = _run_steps(config, small_real_batch, 2, 8)
  assert int(state.step) == 8
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_one_two_and_four_devices_give_the_same_parameters(small_real_batch):
  config = tiny_config(learning_rate=0.01, optimizer='paper_momentum', lr_schedule='constant')
  results = {n: _run_steps(config, small_real_batch, n, 3)[0].params for n in (1, 2, 4)}
  for n in (2, 4):
    for a, b in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[n])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nonfinite_step_is_not_applied(small_real_batch):
  config = tiny_config(lr_schedule='constant')
  batch = dict(small_real_batch, image=small_real_batch['image'].copy())
  batch['image'][0, 0, 0, 0] = np.nan
  state0 = train.create_train_state(config, jax.random.PRNGKey(0))
  state, _ = _run_steps(config, batch, 2, 1)
  assert int(state.step) == 1
  for a, b in zip(jax.tree.leaves(state0.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_eval_step_counts_only_unmasked_examples_and_averages_crops(small_real_batch):
  config = tiny_config()
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  devices = parallel.select_devices(2)
  images = small_real_batch['image']
  logits = state.apply_fn({'params': state.params}, images, train=False)
  mask = np.array([True] * 5 + [False] * 3)
  out = parallel.pmap(steps.eval_step, devices)(
      parallel.replicate(state, devices),
      parallel.shard(dict(small_real_batch, mask=mask), 2))
  out = parallel.unreplicate(out)
  labels = small_real_batch['label']
  probs = np.asarray(jax.nn.softmax(logits))
  expected_loss = -np.log(probs[np.arange(8), labels])[:5].sum()
  expected_top1 = (probs.argmax(-1) == labels)[:5].sum()
  assert out['count'] == 5
  np.testing.assert_allclose(out['loss'], expected_loss, rtol=1e-4)
  assert out['top1'] == expected_top1
  np.testing.assert_array_equal(out['class_count'], np.eye(10)[labels[:5]].sum(0))
  # Two identical crops average to the same probabilities.
  crops = dict(small_real_batch, mask=mask, image=np.stack([images, images], axis=1))
  out2 = parallel.unreplicate(parallel.pmap(steps.eval_step, devices)(
      parallel.replicate(state, devices), parallel.shard(crops, 2)))
  np.testing.assert_allclose(out2['loss'], out['loss'], rtol=1e-5)


@pytest.mark.parametrize('field,value,message', [
    ('dataset', 'mnist_but_wrong', 'dataset'),
    ('learning_rate', -0.1, 'config.learning_rate=-0.1 must be positive'),
    ('optimizer', 'adam', "config.optimizer='adam' is not one of"),
    ('image_size', 32, 'minimum is 63'),
    ('crop_area_min', 0.0, r'config.crop_area_min=0.0 is a share of the image: it must be in'),
])
def test_bad_config_values_give_one_clear_error(field, value, message):
  config = tiny_config()
  config[field] = value
  with pytest.raises(ValueError, match=message):
    config_checks.validate(config)
    from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    input_pipeline.get_dataset_info(config)


def test_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ValueError, match=r'config.batch_size=6 must be a positive multiple of the '
                     r'number of devices \(4'):
    parallel.per_device_batch_size(6, 4, 'batch_size')


def test_nonfinite_metrics_stop_the_run_naming_step_and_last_checkpoint():
  metrics = [{'finite': 1.0}, {'finite': 0.0}, {'finite': 0.0}]
  with pytest.raises(train.NonFiniteError, match=r'at step 12;.*Last good checkpoint: step 8'):
    train._check_finite(metrics, 11, tiny_config(on_nonfinite='stop'), 8)  # pylint: disable=protected-access
  assert train._check_finite(metrics, 11, tiny_config(on_nonfinite='skip'), 8) == 2  # pylint: disable=protected-access


def test_learning_rate_schedules_by_hand():
  config = tiny_config(learning_rate=0.1, warmup_epochs=1.0, num_epochs=4.0,
                       lr_schedule='step', step_epochs=(2, 3), plateau_factor=0.1)
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=10)
  np.testing.assert_allclose([lr(s) for s in (0, 5, 10, 19, 20, 29, 30)],
                             [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-5)
  config.lr_schedule = 'cosine'
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=10)
  # After warmup: 0.1 * (1 + cos(pi * t / 30)) / 2 over the remaining 30 steps.
  np.testing.assert_allclose(float(lr(25)), 0.1 * (1 + np.cos(np.pi * 15 / 30)) / 2, rtol=1e-5)
  config.lr_schedule = 'linear'
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=10)
  # After warmup: 0.1 * (1 - t / 30), zero at the last step and after it.
  np.testing.assert_allclose([lr(s) for s in (5, 10, 25, 40, 45)],
                             [0.05, 0.1, 0.1 * (1 - 15 / 30), 0.0, 0.0], rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_a_run_says_where_its_time_went(monkeypatch, tmp_path, caplog):
  """Every training batch comes 0.5 s late: the wait shows as input_wait, and the timed
  parts never overlap (what is left of the wall time, 'other', is not negative)."""
  delay, num_steps = 0.5, 6
  make_batches = input_pipeline.create_train_iterator

  def late_batches(*args, **kwargs):
    batches = make_batches(*args, **kwargs)
    return input_pipeline.BatchIterator(time.sleep(delay) or batch for batch in batches)

  monkeypatch.setattr(input_pipeline, 'create_train_iterator', late_batches)
  caplog.set_level('INFO')
  config = tiny_config(num_train_steps=num_steps, checkpoint_every_steps=3, prefetch_to_device=1,
                       num_devices=1, lr_schedule='constant')
  _, final = train.train_and_evaluate(config, tmp_path)
  spent = final['time_s']
  assert list(spent) == ['setup', 'first_step', 'train_steps', 'input_wait', 'evaluation',
                         'checkpoints', 'other']
  # One batch per step and the one prefetched ahead of the first, plus tf.data's start.
  assert num_steps * delay <= spent['input_wait'] < (num_steps + 1) * delay + 2.5, spent
  assert all(spent[part] > 0 for part in spent if part != 'other'), spent
  assert spent['other'] >= -0.01, spent  # Rounded to 10 ms.
  assert f"Where the {final['wall_time_s']:.0f} s went: setup" in caplog.text


@pytest.mark.slow
def test_a_run_reports_the_images_it_skipped(folder_with_bad_files, tmp_path, caplog):
  """8 files per split, 2 of them undecodable: one epoch of training and the evaluation each
  skip both, and the run's final metrics and log say how many."""
  config = tiny_config(dataset='folder', data_dir=str(folder_with_bad_files),
                       train_split='train', eval_split='val', num_classes=2, image_size=63,
                       resize_size=66, batch_size=4, eval_batch_size=8, num_train_steps=2,
                       prefetch_to_device=1, num_devices=1, cache=False)
  caplog.set_level('WARNING')
  # The workdir as an epath.Path, as a remote one (gs://...) would come: no pathlib on it.
  _, final = train.train_and_evaluate(config, epath.Path(tmp_path))
  # The 2 steps are the first epoch (prefetch_to_device=1 pulls no batch beyond the last).
  assert final['skipped_train_images'] == 2
  assert final['skipped_eval_images'] == 2
  assert 'Skipped 2 undecodable training images and 2' in caplog.text
