"""fast_ops' CPU forms give lax's and PyTorch's values and gradients; the commands take
XLA:CPU's Eigen convolutions."""

import json
import logging
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from alexnet_jax import cpu_convolutions
from alexnet_jax import fast_ops
from conftest import REPO

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _lax_conv(x, w, stride, pad, groups):
  return lax.conv_general_dilated(x, w, (stride,) * 2, [(pad, pad)] * 2,
                                  dimension_numbers=_NHWC, feature_group_count=groups,
                                  precision=lax.Precision.HIGHEST)


def _fast_conv(x, w, stride, pad, groups):
  return fast_ops.conv_general_dilated(x, w, (stride,) * 2, [(pad, pad)] * 2,
                                       dimension_numbers=_NHWC, feature_group_count=groups,
                                       precision=lax.Precision.HIGHEST)


def _torch_conv_grads(x, w, stride, pad, groups, cotangent):
  """PyTorch's (y, dL/dx, dL/dw) in NHWC/HWIO for L = sum(y * cotangent)."""
  tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True, dtype=torch.float64)
  tw = torch.tensor(np.asarray(w).transpose(3, 2, 0, 1), requires_grad=True, dtype=torch.float64)
  y = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad, groups=groups)
  y.backward(torch.tensor(np.asarray(cotangent).transpose(0, 3, 1, 2), dtype=torch.float64))
  return (y.detach().numpy().transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1),
          tw.grad.numpy().transpose(2, 3, 1, 0))


# (size, c_in, c_out, kernel, stride, pad, groups): conv1, conv2 and conv4 of the paper, small;
# then other strides (2; and 4 with rows that no window reads, 30).
_CONVS = [(23, 3, 8, 11, 4, 2, 1), (9, 6, 8, 5, 1, 2, 2), (7, 8, 6, 3, 1, 1, 2),
          (7, 4, 5, 3, 1, 1, 1), (15, 3, 4, 5, 2, 1, 1), (30, 2, 3, 3, 4, 0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize('size,c_in,c_out,kernel,stride,pad,groups', _CONVS)
def test_conv_matches_lax_and_torch(size, c_in, c_out, kernel, stride, pad, groups):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(size + kernel), 3)
  x = jax.random.normal(kx, (2, size, size, c_in))
  w = jax.random.normal(kw, (kernel, kernel, c_in // groups, c_out))
  y_lax, vjp_lax = jax.vjp(lambda x, w: _lax_conv(x, w, stride, pad, groups), x, w)
  cotangent = jax.random.normal(kg, y_lax.shape)
  y_fast, vjp_fast = jax.vjp(lambda x, w: _fast_conv(x, w, stride, pad, groups), x, w)
  y_torch, dx_torch, dw_torch = _torch_conv_grads(x, w, stride, pad, groups, cotangent)
  for ours, lax_value, torch_value in zip((y_fast, *vjp_fast(cotangent)),
                                          (y_lax, *vjp_lax(cotangent)),
                                          (y_torch, dx_torch, dw_torch)):
    scale = np.max(np.abs(torch_value))
    np.testing.assert_allclose(ours, lax_value, atol=1e-5 * scale)
    np.testing.assert_allclose(ours, torch_value, atol=1e-5 * scale)


def test_conv_passes_other_layouts_to_lax():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8, 8))  # NCHW, lax's default.
  w = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 3, 3))  # OIHW.
  np.testing.assert_array_equal(fast_ops.conv_general_dilated(x, w, (1, 1), 'SAME'),
                                lax.conv_general_dilated(x, w, (1, 1), 'SAME'))


def _tied_activations(shape, seed):
  """Post-ReLU values on a coarse grid: many windows hold ties, many are all zero."""
  x = jax.random.normal(jax.random.PRNGKey(seed), shape)
  return jnp.round(jax.nn.relu(x) * 2) / 2


@pytest.mark.slow
@pytest.mark.parametrize('size', [13, 14])
def test_max_pool_gradient_goes_to_first_maximum(size):
  x = _tied_activations((2, size, size, 3), size)
  out = (size - 3) // 2 + 1
  weights = jnp.arange(2 * out * out * 3, dtype=jnp.float32).reshape(2, out, out, 3)
  loss = lambda pool: lambda x: jnp.sum(pool(x) * weights)
  flax_pool = lambda x: nn.max_pool(x, (3, 3), (2, 2), 'VALID')
  fast_pool = lambda x: fast_ops.max_pool(x, 3, 2)
  np.testing.assert_array_equal(fast_pool(x), flax_pool(x))
  np.testing.assert_array_equal(jax.grad(loss(fast_pool))(x), jax.grad(loss(flax_pool))(x))
  tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
  y = torch.nn.functional.max_pool2d(tx, 3, 2)
  y.backward(torch.tensor(np.asarray(weights).transpose(0, 3, 1, 2)))
  np.testing.assert_array_equal(jax.grad(loss(fast_pool))(x),
                                tx.grad.numpy().transpose(0, 2, 3, 1))
  # Every output's gradient lands exactly once, ties or not.
  assert float(jnp.sum(jax.grad(loss(fast_pool))(x))) == float(jnp.sum(weights))


def test_model_convolutions_take_the_cpu_path():
  # nn.Conv passes ConvDimensionNumbers, not layout strings; the fast path must recognise them.
  x = jnp.zeros((1, 9, 9, 4))
  conv = nn.Conv(6, (3, 3), padding=[(1, 1)] * 2, feature_group_count=2,
                 conv_general_dilated=fast_ops.conv_general_dilated)
  params = conv.init(jax.random.PRNGKey(0), x)
  jaxpr = str(jax.make_jaxpr(conv.apply)(params, x))
  # The CPU branch: one ungrouped convolution per group.
  assert jaxpr.count('conv_general_dilated[') == 2
  assert 'feature_group_count=1' in jaxpr and 'feature_group_count=2' not in jaxpr


@pytest.mark.slow
def test_ops_xla_traces_no_cpu_form_and_agrees_with_the_cpu_forms():
  """config.model.ops switches fast_ops off: the 'xla' network is XLA's ops alone (what a GPU
  traces), with the 'cpu' network's logits and gradients to float rounding."""
  from alexnet_jax import models  # pylint: disable=g-import-not-at-top
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 63, 63, 3))
  params = models.AlexNet(num_classes=10, init_scheme='he').init(
      jax.random.PRNGKey(0), images, train=False)['params']

  def loss(ops):
    model = models.AlexNet(num_classes=10, init_scheme='he', ops=ops)
    return lambda p: jnp.sum(model.apply({'params': p}, images, train=False) ** 2)
  jaxprs = {ops: str(jax.make_jaxpr(jax.grad(loss(ops)))(params)) for ops in ('xla', 'cpu')}
  # The paper's grouped convolutions, which fast_ops splits; XLA's max-pool gradient is
  # select_and_scatter_add, which fast_ops routes instead.
  assert 'feature_group_count=2' in jaxprs['xla']
  assert 'feature_group_count=2' not in jaxprs['cpu']
  assert 'select_and_scatter_add' in jaxprs['xla']
  assert 'select_and_scatter_add' not in jaxprs['cpu']
  grads = {ops: jax.jit(jax.value_and_grad(loss(ops)))(params) for ops in ('xla', 'cpu')}
  for a, b in zip(jax.tree.leaves(grads['cpu']), jax.tree.leaves(grads['xla']), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_ops_auto_is_the_cpu_forms_on_cpu_only(monkeypatch):
  from alexnet_jax import train_state  # pylint: disable=g-import-not-at-top
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config()
  assert train_state.model_ops(config) == 'cpu'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert train_state.model_ops(config) == 'xla'
  config.parallelism = 'model'
  assert train_state.model_ops(config) == 'partitionable'
  config.model.ops = 'cpu'
  assert train_state.model_ops(config) == 'cpu'  # Said explicitly, it is kept.


@pytest.mark.slow
@pytest.mark.parametrize('groups,padding', [(2, ((1, 1), (1, 1))), (4, ((0, 2), (1, 0)))])
def test_partitionable_grouped_conv_matches_lax(groups, padding):
  """The batch-grouped form (model parallelism) gives lax's grouped convolution and gradients,
  with a non-square kernel, asymmetric padding and C_in / G != C_out / G."""
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, 7, 6, 4 * groups))
  w = jax.random.normal(kw, (3, 5, 4, 3 * groups))
  def conv(fn):
    return lambda x, w: fn(x, w, (1, 1), padding, dimension_numbers=_NHWC,
                           feature_group_count=groups, precision=lax.Precision.HIGHEST)
  reference = conv(lax.conv_general_dilated)
  mine = conv(fast_ops.partitionable_conv_general_dilated)
  y = reference(x, w)
  g = jax.random.normal(kg, y.shape)
  np.testing.assert_allclose(mine(x, w), y, rtol=1e-5, atol=1e-5)
  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w) * g)
  for a, b in zip(jax.grad(loss(mine), (0, 1))(x, w), jax.grad(loss(reference), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


# Prints XLA_FLAGS and whether a conv2-sized convolution compiles into a YNNPACK fusion (small
# ones stay in Eigen) after {start}, which runs before JAX starts.
_KERNELS = r'''
import json, os, sys
{start}
import jax, jax.numpy as jnp
from jax import lax
x, w = jnp.ones((8, 27, 27, 64)), jnp.ones((5, 5, 64, 192))
conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
print(json.dumps({{'flags': os.environ.get('XLA_FLAGS', ''),
                   'ynnpack': 'ynn_fusion' in conv.lower(x, w).compile().as_text(),
                   'centre': float(conv(x, w)[0, 13, 13, 0])}}))
'''
_COMMAND_START = """
from absl import flags
from ml_collections import config_flags
config_flags.DEFINE_config_file('config', None)
flags.FLAGS(sys.argv)  # config_flags finds its overrides in sys.argv itself.
from alexnet_jax import cli
cli.start()
"""


def _kernels(start: str, env, *args, xla_flags: str = '') -> dict:
  return json.loads(subprocess.run(
      [sys.executable, '-c', _KERNELS.format(start=start), *args], cwd=REPO,
      env={**env, 'XLA_FLAGS': xla_flags}, capture_output=True, text=True,
      check=True).stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize('ops', ['auto', 'xla'])
def test_the_commands_take_eigen_convolutions_unless_ops_is_xla(ops, env):
  """cli.start's choice, in a fresh process (XLA reads its flags once, at start): XLA:CPU's
  default (jaxlib 0.10.2, x86-64) puts a conv2-sized convolution in a YNNPACK fusion,
  `cpu_convolutions.XLA_FLAG` takes it out."""
  result = _kernels(_COMMAND_START, env, '--config=configs/default.py',
                    f'--config.model.ops={ops}')
  assert (cpu_convolutions.XLA_FLAG in result['flags']) == (ops != 'xla')
  assert result['ynnpack'] == (ops == 'xla')
  assert result['centre'] == 5 * 5 * 64  # All-ones 5x5x64 window, either kernel library.


@pytest.mark.parametrize('start, ynnpack', [
    ('import alexnet_jax', False),  # A Python user's import: Eigen's, with no call of theirs.
    ('import jax; jax.devices(); import alexnet_jax', True),  # JAX first: left as it started.
    ("from alexnet_jax import cpu_convolutions; cpu_convolutions.choose_convolutions('xla')",
     True),  # The way out to XLA's defaults, from Python.
])
def test_importing_the_package_before_jax_starts_takes_eigen_convolutions(start, ynnpack, env):
  result = _kernels(start, env)
  assert result['ynnpack'] == ynnpack
  assert (cpu_convolutions.XLA_FLAG in result['flags']) == (not ynnpack)


def test_importing_the_package_keeps_a_users_own_ynnpack_choice(env):
  mine = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'
  assert _kernels('import alexnet_jax', env, xla_flags=mine)['flags'] == mine


def test_cpu_ops_without_the_flag_warn_how_to_set_it(monkeypatch, caplog):
  from alexnet_jax import train_state  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.ops = 'cpu'
  with caplog.at_level(logging.WARNING):
    train_state.create_model(config)  # The conftest set the flag.
  assert 'YNNPACK' not in caplog.text
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  with caplog.at_level(logging.WARNING):
    train_state.create_model(config)
  assert cpu_convolutions.XLA_FLAG in caplog.text and 'YNNPACK' in caplog.text


def test_a_users_own_ynnpack_choice_is_kept(monkeypatch):
  mine = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'
  monkeypatch.setenv('XLA_FLAGS', mine)
  cpu_convolutions.use_eigen_convolutions()
  assert os.environ['XLA_FLAGS'] == mine
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  cpu_convolutions.choose_convolutions('xla')
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2'
  cpu_convolutions.choose_convolutions('cpu')
  assert os.environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=2',
                                             cpu_convolutions.XLA_FLAG]
