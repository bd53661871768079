"""pmap and jit-over-a-mesh run the same steps: the same numbers, on 1, 2 and 4 devices."""

import functools

import jax
import numpy as np
import pytest

from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import steps
from alexnet_jax import train
from test_train import tiny_config


def _train_steps(kind: str, num_devices: int, batch, num_steps: int = 3):
  """(host state, host metrics of the last step) after `num_steps` train steps under `kind`."""
  config = tiny_config(model=dict(tiny_config().model, dropout_rate=0.5))
  data_parallel = parallel.create(kind, parallel.select_devices(num_devices))
  step = data_parallel.map(functools.partial(
      steps.train_step, learning_rate_fn=optim.create_learning_rate_fn(config, 10)),
                           donate_state=True)
  state = data_parallel.put_state(train.create_train_state(config, jax.random.PRNGKey(0)))
  for _ in range(num_steps):
    state, metrics = step(state, data_parallel.put_batch(batch))
  return data_parallel.get(state), data_parallel.get(metrics)


@pytest.mark.slow
@pytest.mark.parametrize('num_devices', [1, 2, 4])
def test_mesh_train_steps_are_bit_identical_to_pmap(small_real_batch, num_devices):
  """With dropout on: both key each device's masks by its index along the same axis."""
  pmap_state, pmap_metrics = _train_steps('pmap', num_devices, small_real_batch)
  mesh_state, mesh_metrics = _train_steps('mesh', num_devices, small_real_batch)
  for a, b in zip(jax.tree.leaves(pmap_state), jax.tree.leaves(mesh_state)):
    np.testing.assert_array_equal(a, b)
  for key in ('loss', 'top1', 'top5', 'learning_rate'):
    assert pmap_metrics[key] == mesh_metrics[key], key
  assert int(mesh_state.step) == 3


def test_mesh_state_is_global_replicated_and_the_batch_split(small_real_batch):
  data_parallel = parallel.create('mesh', parallel.select_devices(4))
  state = data_parallel.put_state({'w': np.arange(6.0).reshape(2, 3)})
  assert state['w'].shape == (2, 3) and state['w'].sharding.is_fully_replicated
  batch = data_parallel.put_batch(small_real_batch)
  assert batch['image'].shape == (8, 64, 64, 3)
  shards = sorted(batch['image'].addressable_shards, key=lambda s: s.index[0].start)
  assert [s.data.shape[0] for s in shards] == [2, 2, 2, 2]
  np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards]),
                                small_real_batch['image'])


@pytest.mark.slow
def test_mesh_eval_step_sums_equal_pmaps(small_real_batch):
  config = tiny_config()
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  batch = dict(small_real_batch, mask=np.array([True] * 6 + [False] * 2))
  sums = {}
  for kind in ('pmap', 'mesh'):
    data_parallel = parallel.create(kind, parallel.select_devices(2))
    sums[kind] = data_parallel.get(data_parallel.map(steps.eval_step)(
        data_parallel.put_state(state), data_parallel.put_batch(batch)))
  for key in sums['pmap']:
    np.testing.assert_array_equal(sums['pmap'][key], sums['mesh'][key], err_msg=key)
  assert sums['mesh']['count'] == 6


def test_unknown_parallelism_is_a_clear_error():
  with pytest.raises(ValueError, match=r"config.parallelism='gspmd'; choose one of"):
    parallel.create('gspmd', parallel.select_devices(1))
