"""The paper's model parallelism (`config.parallelism='model'`) on 2 and 2x2 fake CPU devices.

Split over the 'model' axis, the network computes what it computes on one device, to float32
rounding: XLA sums the halves of conv3's and the fully connected layers' inputs (and the
gradients flowing back) in another order. Tolerances: rtol 1e-5 with an atol of 1e-5 of the
array's largest magnitude (measured: below 1e-6 of it).
"""

import functools
import re

import jax
from jax import lax
import numpy as np
import pytest

from alexnet_jax import checkpointing
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import steps
from alexnet_jax import train
from alexnet_jax import train_state
from test_train import tiny_config

# Devices, split by model_parallel_size=MODEL: the paper's two GPUs, and two of them side by side.
MODEL = 2
DEVICES = [2, 4]


def _config(parallelism: str, dropout_rate: float = 0.0):
  return tiny_config(parallelism=parallelism, model=dict(tiny_config().model,
                                                         dropout_rate=dropout_rate))


def _close(actual, expected) -> None:
  """Equal to float32 rounding, leaf by leaf (see the module docstring)."""
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def _grads_and_logits(state, batch):
  """(batch-mean gradients of the cross-entropy, logits of the global batch), no dropout."""
  def loss_fn(params):
    logits = state.apply_fn({'params': params}, batch['image'], train=False)
    return steps.cross_entropy(logits, batch['label'], 0.0).mean(), logits
  (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return (parallel.mean_over_devices(grads),
          lax.all_gather(logits, parallel.AXIS_NAME, tiled=True))


def _run(kind: str, num_devices: int, fn, config, batch, state=None):
  """fn(state, batch) under `kind` on `num_devices` devices (model_parallel_size MODEL).

  Returns:
    The host results, the `DataParallel` and the mapped fn (to run again without compiling).
  """
  data_parallel = parallel.create(kind, parallel.select_devices(num_devices), MODEL)
  if state is None:
    state = train.create_train_state(config, jax.random.PRNGKey(0))
  mapped = data_parallel.map(fn)
  out = mapped(data_parallel.put_state(state), data_parallel.put_batch(batch))
  return data_parallel.get(out), data_parallel, mapped


@pytest.fixture(scope='module')
def single_device_grads(small_real_batch):
  return _run('mesh', 1, _grads_and_logits, _config('mesh'), small_real_batch)[0]


@pytest.mark.slow
def test_only_conv3_the_fully_connected_layers_and_the_lrn_halo_communicate(small_real_batch):
  """The paper's split on 1x2: the layers whose forward or backward moves data between the
  halves, read from the compiled program's collectives (their jax op names). The grouped
  convolutions (conv2, conv4, conv5) move nothing: with ops='cpu' they all-gather and
  all-to-all (measured), which is why 'model' picks the partitionable form."""
  config = _config('model')
  data_parallel = parallel.create('model', parallel.select_devices(2), MODEL)
  state = data_parallel.put_state(train.create_train_state(config, jax.random.PRNGKey(0)))
  text = data_parallel.map(_grads_and_logits).lower(
      state, data_parallel.put_batch(small_real_batch)).compile().as_text()
  moved = set(re.findall(r' (all-gather|all-to-all|all-reduce|collective-permute)(?:-start)?\('
                         r'.*op_name="[^"]*AlexNet\)+/(\w+)/', text))
  assert {layer for _, layer in moved} == {'conv3', 'fc6', 'fc7', 'fc8', 'LocalResponseNorm_0',
                                          'LocalResponseNorm_1'}, moved
  assert 'all-to-all' not in {kind for kind, _ in moved}


@pytest.mark.slow
@pytest.mark.parametrize('num_devices', DEVICES)
def test_logits_and_gradients_equal_a_single_devices(small_real_batch, single_device_grads,
                                                     num_devices):
  (grads, logits), _, _ = _run('model', num_devices, _grads_and_logits, _config('model'),
                            small_real_batch)
  _close(logits, single_device_grads[1])
  _close(grads, single_device_grads[0])


def _train_step(config):
  return functools.partial(steps.train_step,
                           learning_rate_fn=optim.create_learning_rate_fn(config, 10))


def _device_bytes(tree) -> dict[jax.Device, int]:
  """Bytes of `tree`'s arrays that each device holds."""
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def test_each_device_holds_half_of_every_layer():
  state = train_state.zeros_state(_config('model'))  # Shapes are what matter; nothing compiles.
  data_parallel = parallel.create('model', parallel.select_devices(4), MODEL)
  on_devices = data_parallel.put_state(state)
  assert dict(data_parallel.mesh.shape) == {'batch': 2, 'model': 2}
  for layer in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8'):
    kernel = on_devices.params[layer]['kernel']
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(*[None] * (kernel.ndim - 1),
                                                             'model'), layer
    assert {s.data.shape[-1] for s in kernel.addressable_shards} == {kernel.shape[-1] // 2}
  (trace,) = [s.trace for s in on_devices.opt_state.inner_state if hasattr(s, 'trace')]
  total = sum(x.nbytes for x in jax.tree.leaves(state.params))
  for tree in (on_devices.params, trace):  # The momentum is split as its parameters are.
    assert set(_device_bytes(tree).values()) == {total // 2}
  assert on_devices.step.sharding.is_fully_replicated
  np.testing.assert_array_equal(data_parallel.get(on_devices.params['fc6']['kernel']),
                                state.params['fc6']['kernel'])


@pytest.mark.slow
def test_train_step_equals_data_parallels_and_resumes_under_pmap(small_real_batch, tmp_path):
  """On 2x2, one step with dropout equals 'mesh' on the 2 devices of the data axis alone (the
  same masks: keyed by the index along 'batch'); its checkpoint resumes under pmap and the
  next step agrees again. (The 2-device mesh is covered by the logits and gradients test: a
  step compiles three times, 60 s on 2 shared cores.)"""
  num_devices = DEVICES[1]
  config = _config('model', dropout_rate=0.5)
  step = _train_step(config)
  data_devices = num_devices // MODEL
  (state, metrics), data_parallel, mapped = _run('model', num_devices, step, config,
                                                 small_real_batch)
  (expected, expected_metrics), _, _ = _run('mesh', data_devices, step, _config('mesh', 0.5),
                                         small_real_batch)
  _close(state, expected)
  np.testing.assert_allclose(metrics['loss'], expected_metrics['loss'], rtol=1e-5)
  assert int(state.step) == 1

  manager = checkpointing.create_manager(tmp_path, keep=1, async_save=False)
  config_dict = checkpointing.config_to_dict(config)
  checkpointing.save(manager, state, {'config': config_dict})
  restored, _ = checkpointing.restore_latest(manager, train_state.zeros_state(config), config_dict)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)
  manager.close()
  (resumed, _), _, _ = _run('pmap', data_devices, step, _config('pmap', 0.5), small_real_batch,
                    restored)
  on_devices = data_parallel.put_state(state)
  continued, _ = mapped(on_devices, data_parallel.put_batch(small_real_batch))
  assert set(_device_bytes(continued.params).values()) == {
      sum(x.nbytes for x in jax.tree.leaves(state.params)) // 2}  # Still split after a step.
  _close(resumed, data_parallel.get(continued))
  assert int(resumed.step) == 2


def test_bad_model_parallel_sizes_are_clear_errors():
  with pytest.raises(ValueError, match=r'model_parallel_size=3 must be a positive divisor of '
                                       r'the 4 devices'):
    parallel.create('model', parallel.select_devices(4), 3)
  data_parallel = parallel.create('model', parallel.select_devices(4), 4)
  with pytest.raises(ValueError, match=r"does not divide the 10 output features of "
                                       r"\['fc8'\]\['kernel'\]"):
    data_parallel.put_state({'fc8': {'kernel': np.zeros((8, 10), np.float32)}})
