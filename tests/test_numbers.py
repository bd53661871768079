"""The numbers a run prints: top-k on ties/NaN/inf, multi-crop averaging, the plateau rule,
and the optimizer settings of a resumed run. References are numpy and trajectories by hand."""

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf

from alexnet_jax import checkpointing
from alexnet_jax import config_checks
from alexnet_jax import evaluation
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import preprocessing
from alexnet_jax import steps
from alexnet_jax import train
from test_train import tiny_config


def numpy_topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """lax.top_k's order by numpy: descending, ties to the lower index (a stable sort of -x);
  a row holding NaN or inf counts as wrong."""
  order = np.argsort(-scores, axis=-1, kind='stable')[:, :k]
  hit = (order == labels[:, None]).any(-1)
  return (hit & np.isfinite(scores).all(-1)).astype(np.float32)


def _scores(kind: str, rng) -> np.ndarray:
  scores = rng.normal(size=(64, 10)).astype(np.float32)
  if kind == 'tied':  # Few distinct values: ties everywhere, around every label.
    scores = np.round(scores).astype(np.float32) + 0.0  # + 0: no -0.0, which top_k puts below 0.
  elif kind == 'constant':
    scores = np.zeros_like(scores)
  elif kind == 'nan':
    scores[rng.random(scores.shape) < 0.1] = np.nan
  elif kind == 'inf':
    scores[rng.random(scores.shape) < 0.1] = np.inf
    scores[rng.random(scores.shape) < 0.05] = -np.inf
  return scores


@pytest.mark.parametrize('kind', ['random', 'tied', 'constant', 'nan', 'inf'])
@pytest.mark.parametrize('k', [1, 5])
def test_topk_correct_follows_top_k_order_and_never_credits_nonfinite(kind, k):
  rng = np.random.default_rng(0)
  scores = _scores(kind, rng)
  labels = rng.integers(0, 10, 64).astype(np.int32)
  got = np.asarray(steps.topk_correct(scores, labels, k))
  np.testing.assert_array_equal(got, numpy_topk_correct(scores, labels, k))
  # And the same as lax.top_k itself wherever the row is finite.
  _, top = jax.lax.top_k(scores, k)
  finite = np.isfinite(scores).all(-1)
  np.testing.assert_array_equal(got[finite], (np.asarray(top) == labels[:, None]).any(-1)[finite])


def test_constant_and_nan_logits_score_no_better_than_their_ties_allow():
  labels = np.array([0, 3, 7, 9], np.int32)
  np.testing.assert_array_equal(steps.topk_correct(np.zeros((4, 10)), labels, 1), [1, 0, 0, 0])
  np.testing.assert_array_equal(steps.topk_correct(np.full((4, 10), np.nan), labels, 5), 0)


def _eval_sums(state, batch):
  devices = parallel.select_devices(2)
  out = parallel.pmap(steps.eval_step, devices)(parallel.replicate(state, devices),
                                                parallel.shard(batch, 2))
  return parallel.unreplicate(out)


@pytest.mark.slow
def test_multi_crop_eval_averages_probabilities_as_numpy_does(small_real_batch):
  """Two different crops of each image, the image and its mirror: the step's loss and top-k
  are those of numpy's average of the two softmaxes."""
  config = tiny_config()
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  images, labels = small_real_batch['image'], small_real_batch['label']
  views = np.stack([images, images[:, :, ::-1]], axis=1)
  logits = np.asarray(state.apply_fn({'params': state.params},
                                     views.reshape((-1,) + images.shape[1:]), train=False),
                      np.float64).reshape(8, 2, -1)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).mean(1)
  out = _eval_sums(state, dict(small_real_batch, image=views, mask=np.ones(8, bool)))
  np.testing.assert_allclose(out['loss'], -np.log(probs[np.arange(8), labels]).sum(), rtol=1e-5)
  assert out['top1'] == numpy_topk_correct(probs, labels, 1).sum()
  assert out['top5'] == numpy_topk_correct(probs, labels, 5).sum()


def test_eval_loss_is_exact_where_softmax_underflows(small_real_batch):
  """Logits 200 apart: the label's probability underflows float32 (e^-200), the old clipped
  log(max(p, 1e-30)) said 69.1; the log-space loss is the exact 200."""
  config = tiny_config()
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  # fc8 bias: class 1 200 above the rest; kernel zero, so every image gives these logits.
  params = jax.tree.map(np.asarray, state.params)
  params['fc8']['kernel'] = np.zeros_like(params['fc8']['kernel'])
  params['fc8']['bias'] = np.eye(10, dtype=np.float32)[1] * 200
  state = state.replace(params=params)
  batch = dict(small_real_batch, label=np.zeros(8, np.int32), mask=np.ones(8, bool))
  out = _eval_sums(state, batch)
  np.testing.assert_allclose(out['loss'] / 8, 200.0, rtol=1e-5)
  assert out['top1'] == 0 and out['top5'] == 8  # Class 0 wins the tie of the other nine.


@pytest.mark.parametrize('crops,mirrors', [(5, False), (10, True)])
def test_multi_crops_are_the_corners_and_centre_and_mirrors_only_for_ten(crops, mirrors):
  image = tf.reshape(tf.range(6 * 8 * 3, dtype=tf.float32), [6, 8, 3])
  got, offsets, flips = (x.numpy() for x in preprocessing.multi_crops(image, 4, crops))
  array = image.numpy()
  five = [array[:4, :4], array[:4, 4:], array[2:, :4], array[2:, 4:], array[1:5, 2:6]]
  expected = five + ([view[:, ::-1] for view in five] if mirrors else [])
  np.testing.assert_array_equal(got, np.stack(expected))
  corners = [(0, 0), (0, 4), (2, 0), (2, 4), (1, 2)]
  np.testing.assert_array_equal(offsets, corners * (2 if mirrors else 1))
  np.testing.assert_array_equal(flips, [False] * 5 + [True] * (5 if mirrors else 0))


@pytest.mark.parametrize('random_flip,asked,used', [
    (True, 10, 10), (False, 10, 5), (False, 5, 5), (True, 1, 1), (False, 1, 1)])
def test_multi_crop_evaluation_follows_the_training_data(random_flip, asked, used):
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  assert input_pipeline.eval_crops(tiny_config(random_flip=random_flip), asked) == used


# ------------------------------------------------------------------------------ plateau


def _trajectory(config, top1s, plateau=None):
  plateau = plateau or optim.PlateauState.create()
  drops = []
  for top1 in top1s:
    plateau, dropped = optim.update_plateau(plateau, top1, config)
    drops.append(dropped)
  return plateau, drops


def test_plateau_keeps_the_rate_while_the_model_slowly_improves():
  """+0.09% per evaluation with min_delta 0.1%: every second evaluation is a significant gain
  over the last significant one, so three evaluations never pass without one."""
  config = tiny_config(lr_schedule='plateau', plateau_patience=3, plateau_min_delta=1e-3)
  top1s = [0.5 + 0.0009 * i for i in range(20)]
  plateau, drops = _trajectory(config, top1s)
  assert not any(drops)
  # By hand: best moves at 0.5, 0.5018, 0.5036, ...: to the last even evaluation.
  assert float(plateau.best) == pytest.approx(top1s[18], abs=1e-7)
  assert int(plateau.bad_evals) == 1


def test_plateau_drops_after_exactly_patience_evaluations_and_stops_at_max_drops():
  config = tiny_config(lr_schedule='plateau', plateau_patience=2, plateau_max_drops=2,
                       plateau_min_delta=1e-3)
  # Gains of 0.0005 are below min_delta: they do not reset the count.
  top1s = [0.5, 0.5005, 0.501, 0.6, 0.6, 0.6004, 0.6, 0.6, 0.6, 0.6]
  plateau, drops = _trajectory(config, top1s)
  assert drops == [False, False, True, False, False, True, False, False, False, False]
  assert float(plateau.scale) == pytest.approx(0.01)
  assert int(plateau.num_drops) == 2 and float(plateau.best) == pytest.approx(0.6)


def test_plateau_relative_threshold_as_pytorch_rel_mode():
  config = tiny_config(lr_schedule='plateau', plateau_patience=1, plateau_min_delta=0.1,
                       plateau_threshold_mode='rel')
  # 0.5 -> 0.54 is +8% (< 10%): no improvement, drop; 0.5 -> 0.56 is +12%.
  assert _trajectory(config, [0.5, 0.54])[1] == [False, True]
  assert _trajectory(config, [0.5, 0.56])[1] == [False, False]


def test_plateau_state_survives_a_checkpoint_mid_trajectory(tmp_path):
  config = tiny_config(lr_schedule='plateau', plateau_patience=2, plateau_max_drops=3)
  top1s = [0.5, 0.5005, 0.501, 0.52, 0.5201, 0.5203, 0.6, 0.6]
  whole, drops = _trajectory(config, top1s)
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  first, first_drops = _trajectory(config, top1s[:4])
  manager = checkpointing.create_manager(tmp_path, keep=2)
  checkpointing.save(manager, state.replace(plateau=first), {'config': {}})
  checkpointing.wait(manager)
  restored, _ = checkpointing.restore_latest(manager, state, {})
  manager.close()
  rest, rest_drops = _trajectory(config, top1s[4:], restored.plateau)
  assert first_drops + rest_drops == drops == [False, False, True, False, False, True, False,
                                               False]
  for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------- resume


def _one_update(opt_state, tx, params, grads):
  updates, _ = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates)


def test_resumed_optimizer_state_takes_momentum_and_weight_decay_from_the_config():
  """A state made with momentum 0.9 / decay 5e-4, resumed under 0.5 / 0.1: the next update is
  the paper's formula with the new values, by hand."""
  params = {'w': np.array([2.0], np.float32)}
  old = tiny_config(optimizer='paper_momentum', momentum=0.9, weight_decay=5e-4)
  tx = optim.create_optimizer(old, params)
  opt_state = tx.init(params)
  new = tiny_config(optimizer='paper_momentum', momentum=0.5, weight_decay=0.1)
  opt_state = optim.with_config_hyperparams(opt_state, new)
  opt_state = optim.with_learning_rate(opt_state, np.float32(0.1))
  # v = 0.5 * 0 - 0.1 * (1.0 + 0.1 * 2.0) = -0.12; w = 2 - 0.12.
  got = _one_update(opt_state, tx, params, {'w': np.array([1.0], np.float32)})
  np.testing.assert_allclose(got['w'], [2.0 - 0.12], rtol=1e-6)


@pytest.mark.parametrize('schedule', ['cosine', 'linear'])
def test_changing_the_horizon_of_a_decaying_schedule_on_resume_is_refused_naming_it(
    schedule, tmp_path):
  config = tiny_config(lr_schedule=schedule, num_train_steps=20)
  config_checks.check_workdir(config, tmp_path)
  config_checks.write_config(config, tmp_path)
  longer = tiny_config(lr_schedule=schedule, num_train_steps=40)
  with pytest.raises(ValueError, match=rf'num_train_steps: workdir 20, now 40.*{schedule}'):
    config_checks.check_workdir(longer, tmp_path)
  # The constant schedule does not depend on the horizon: extending it is free.
  constant = tiny_config(lr_schedule='constant', num_train_steps=20)
  config_checks.write_config(constant, tmp_path)
  config_checks.check_workdir(tiny_config(lr_schedule='constant', num_train_steps=40), tmp_path)


def test_evaluation_with_no_decodable_image_names_the_split_and_the_failures(tmp_path):
  """Every eval image broken: one ValueError saying so (it used to divide by zero)."""
  for split in ('train', 'val'):
    for name in ('a', 'b'):
      (tmp_path / split / name).mkdir(parents=True)
      for i in range(2):
        (tmp_path / split / name / f'{i}.JPEG').write_text('not an image')
  config = tiny_config(dataset='folder', data_dir=str(tmp_path), train_split='train',
                       eval_split='val', num_classes=2, image_size=63, resize_size=66,
                       eval_batch_size=4, cache=False)
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  data_parallel = parallel.create('pmap', parallel.select_devices(1))
  with pytest.raises(ValueError, match=r"No image of the 'val' split of 'folder' could be "
                                       r'evaluated: 4 files failed to decode'):
    evaluation.evaluate(data_parallel.map(steps.eval_step), data_parallel.put_state(state),
                        config, data_parallel)
