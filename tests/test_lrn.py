"""Tests for alexnet_jax.lrn against TensorFlow, PyTorch and a plain formula."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import torch

from alexnet_jax import lrn

# (depth_radius, channels): the paper's window, narrow and wide windows, a window wider than the
# channel axis (C=3 with r=5) and the identity-like r=0.
SHAPE_CASES = [(2, 96), (1, 16), (5, 32), (5, 3), (0, 8)]
PAPER = dict(bias=2.0, alpha=1e-4, beta=0.75)
OTHER = dict(bias=1.0, alpha=2e-3, beta=0.6)  # Takes the generic power path.


def reference_lrn(x, depth_radius, bias, alpha, beta):
  """The formula with the clipped window as a 0/1 band matrix, for autodiff: [..., C] -> same."""
  c = np.arange(x.shape[-1])
  window = (np.abs(c[:, None] - c[None, :]) <= depth_radius).astype(np.float32)
  sums = jnp.matmul(jnp.square(x), window, precision=jax.lax.Precision.HIGHEST)
  return x / (bias + alpha * sums) ** beta


def tf_lrn_and_grad(x, g, depth_radius, bias, alpha, beta):
  """TensorFlow's output and gradient of sum(y * g), NHWC numpy in and out."""
  xv = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xv)
    y = tf.nn.local_response_normalization(
        xv, depth_radius=depth_radius, bias=bias, alpha=alpha, beta=beta)
    loss = tf.reduce_sum(y * g)
  return y.numpy(), tape.gradient(loss, xv).numpy()


def torch_lrn_and_grad(x, g, depth_radius, bias, alpha, beta):
  """PyTorch's output and gradient; torch divides alpha by the window size, so scale it up."""
  size = 2 * depth_radius + 1
  layer = torch.nn.LocalResponseNorm(size, alpha=alpha * size, beta=beta, k=bias)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  y = layer(xt)
  y.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
  return (y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1))


def jax_lrn_and_grad(x, g, fn, **kwargs):
  """fn's output and gradient of sum(y * g), jitted: one compile beats eager op-by-op dispatch."""

  @jax.jit
  def run(x, g):
    y, vjp = jax.vjp(lambda v: fn(v, **kwargs), x)
    return y, vjp(g)[0]

  y, dx = run(x, g)
  return np.asarray(y), np.asarray(dx)


def assert_close(actual, expected, rtol=1e-5):
  """Each element within rtol of the reference, measured against the reference's scale."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def random_activations(shape, seed=0, scale=60.0):
  """ReLU'd Gaussians; at scale 60 the square sum outweighs the bias, so LRN is far from linear."""
  rng = np.random.default_rng(seed)
  x = np.maximum(rng.normal(scale=scale, size=shape), 0.0).astype(np.float32)
  g = rng.normal(size=shape).astype(np.float32)
  return x, g


@pytest.fixture(scope='module')
def conv1_activations(imagenet_samples_dir):
  """A real photo at 224 px through a fixed random 11x11/4 conv and ReLU: [1, 54, 54, 96]."""
  path = imagenet_samples_dir / 'n01443537_goldfish.JPEG'
  image = Image.open(path).convert('RGB').resize((224, 224), Image.BILINEAR)
  pixels = np.asarray(image, np.float32)
  pixels = pixels - pixels.mean(axis=(0, 1))
  kernel = np.random.default_rng(1).normal(scale=0.05, size=(11, 11, 3, 96)).astype(np.float32)
  out = jax.lax.conv_general_dilated(
      pixels[None], kernel, window_strides=(4, 4), padding='VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
  return np.asarray(jax.nn.relu(out))


def test_conv1_activations_are_in_the_nonlinear_regime(conv1_activations):
  x = conv1_activations
  assert x.shape == (1, 54, 54, 96)
  assert 0.2 < np.mean(x > 0) < 0.8
  # Where alpha * window sum dominates bias, the output is far from x * bias ** -beta.
  y = np.asarray(lrn.local_response_norm(x))
  linear = x * 2.0 ** -0.75
  assert np.abs(y - linear).max() > 0.3 * np.abs(linear).max()


@pytest.mark.parametrize('depth_radius,channels', SHAPE_CASES)
@pytest.mark.parametrize('params', [PAPER, OTHER], ids=['paper', 'other'])
def test_matches_tf_torch_and_reference(depth_radius, channels, params):
  x, g = random_activations((2, 5, 4, channels))
  kwargs = dict(depth_radius=depth_radius, **params)
  y, dx = jax_lrn_and_grad(x, g, lrn.local_response_norm, **kwargs)
  for ref_y, ref_dx in (tf_lrn_and_grad(x, g, **kwargs), torch_lrn_and_grad(x, g, **kwargs),
                        jax_lrn_and_grad(x, g, reference_lrn, **kwargs)):
    assert_close(y, ref_y)
    assert_close(dx, ref_dx)


@pytest.mark.parametrize('depth_radius', [1, 2, 5])
def test_matches_tf_and_torch_on_real_activations(conv1_activations, depth_radius):
  x = conv1_activations
  g = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
  kwargs = dict(depth_radius=depth_radius, **PAPER)
  y, dx = jax_lrn_and_grad(x, g, lrn.local_response_norm, **kwargs)
  for ref_y, ref_dx in (tf_lrn_and_grad(x, g, **kwargs), torch_lrn_and_grad(x, g, **kwargs)):
    assert_close(y, ref_y)
    assert_close(dx, ref_dx)


@pytest.mark.parametrize('params', [PAPER, OTHER], ids=['paper', 'other'])
def test_check_grads_first_and_second_order(params):
  x, _ = random_activations((2, 3, 3, 7), scale=20.0)
  x += 1.0  # Away from ReLU's zeros, where finite differences are fine but uninformative.
  with jax.enable_x64(True):
    f = jax.jit(lambda v: lrn.local_response_norm(v, depth_radius=2, **params))
    jtu.check_grads(f, (jnp.asarray(x, jnp.float64),), order=2, modes=['rev'])


def test_grad_of_grad_matches_reference():
  x, w = random_activations((2, 3, 3, 10))
  v = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def hvp(fn, x):
    loss = lambda u: jnp.sum(jnp.tanh(fn(u, depth_radius=2, **PAPER)) * w)
    return jax.grad(lambda u: jnp.vdot(jax.grad(loss)(u), v))(x)

  assert_close(hvp(lrn.local_response_norm, x), hvp(reference_lrn, x), rtol=1e-4)


def test_forward_mode_is_refused():
  x, _ = random_activations((1, 2, 2, 4))
  with pytest.raises(TypeError, match='forward-mode'):
    jax.jvp(lrn.local_response_norm, (jnp.asarray(x),), (jnp.ones_like(x),))


def test_bfloat16_matches_float32_and_keeps_dtype():
  x, g = random_activations((2, 5, 4, 32))
  x16, g16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
  y16, dx16 = jax_lrn_and_grad(x16, g16, lrn.local_response_norm, depth_radius=2, **PAPER)
  assert y16.dtype == jnp.bfloat16 and dx16.dtype == jnp.bfloat16
  # Against float32 on the same (rounded) inputs: only the final rounding may differ.
  x32, g32 = np.asarray(x16, np.float32), np.asarray(g16, np.float32)
  y32, dx32 = jax_lrn_and_grad(x32, g32, lrn.local_response_norm, depth_radius=2, **PAPER)
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  np.testing.assert_allclose(y16.astype(np.float32), y32, rtol=eps, atol=0)
  assert_close(dx16.astype(np.float32), dx32, rtol=eps)


def test_eager_jit_vmap_and_pmap_agree():
  devices = jax.local_device_count()
  assert devices == 4, 'tests/conftest.py should give 4 fake CPU devices'
  x, g = random_activations((devices, 2, 3, 3, 12))

  def y_and_dx(v, c):
    y, vjp = jax.vjp(lambda u: lrn.local_response_norm(u, depth_radius=2, **PAPER), v)
    return y, vjp(c)[0]

  per_device = [jax.jit(y_and_dx)(v, c) for v, c in zip(x, g)]
  expected = [np.stack(arrays) for arrays in zip(*per_device)]
  for actual, want in zip(y_and_dx(x[0], g[0]), per_device[0]):
    assert_close(actual, want, rtol=1e-6)
  for transform in (jax.vmap, jax.pmap):
    for actual, want in zip(transform(y_and_dx)(x, g), expected):
      assert_close(actual, want, rtol=1e-6)


def test_flax_module_has_no_params_and_matches_function():
  x, _ = random_activations((2, 4, 4, 16))

  class ConvLrn(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(16, (3, 3))(x)
      return lrn.LocalResponseNorm(depth_radius=1, bias=1.0, alpha=1e-3, beta=0.5)(x)

  layer = lrn.LocalResponseNorm(depth_radius=1, bias=1.0, alpha=1e-3, beta=0.5)
  assert layer.init(jax.random.key(0), x) == {}
  expected = lrn.local_response_norm(x, depth_radius=1, bias=1.0, alpha=1e-3, beta=0.5)
  assert_close(layer.apply({}, x), expected, rtol=1e-7)

  variables = ConvLrn().init(jax.random.key(0), x)
  assert list(variables['params']) == ['Conv_0']
  conv_out = nn.Conv(16, (3, 3)).apply({'params': variables['params']['Conv_0']}, x)
  assert_close(ConvLrn().apply(variables, x),
               reference_lrn(conv_out, depth_radius=1, bias=1.0, alpha=1e-3, beta=0.5))


@pytest.mark.parametrize('kwargs,message', [
    (dict(depth_radius=-1), 'depth_radius must be a non-negative int'),
    (dict(depth_radius=2.0), 'depth_radius must be a non-negative int'),
    (dict(bias=0.0), 'bias must be > 0'),
    (dict(alpha=-1e-4), 'alpha must be >= 0'),
    (dict(beta=float('nan')), 'beta must be a finite real number'),
    (dict(beta='0.75'), 'beta must be a finite real number'),
])
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    lrn.local_response_norm(jnp.ones((1, 2, 2, 4)), **kwargs)


@pytest.mark.parametrize('x,message', [
    (jnp.ones((1, 2, 2, 4), jnp.int32), 'x must be a floating-point array'),
    (jnp.float32(1.0), 'x must have a channel axis'),
])
def test_bad_inputs_raise(x, message):
  with pytest.raises(ValueError, match=message):
    lrn.local_response_norm(x)
