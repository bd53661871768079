"""AlexNet in Flax against hand formulas, the paper's numbers and the PyTorch reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch

from alexnet_jax import convert
from alexnet_jax import models
from alexnet_jax import torch_reference

IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
# Layers whose bias the paper initialises to 1 (section 5).
BIAS_ONE = ('conv2', 'conv4', 'conv5', 'fc6', 'fc7')
LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8')


def abstract_init(model, height, width=None, capture_intermediates=False):
  """Shapes of model.init on one [1, height, width, 3] image; nothing is computed."""
  images = jax.ShapeDtypeStruct((1, height, width or height, 3), jnp.float32)
  init = functools.partial(model.init, train=False, capture_intermediates=capture_intermediates)
  return jax.eval_shape(init, jax.random.key(0), images)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def goldfish_224(imagenet_samples_dir):
  """One real photo the torchvision way: shorter side 256, centre 224 crop, mean subtracted.

  Returns float32 [1, 224, 224, 3].
  """
  image = Image.open(imagenet_samples_dir / 'n01443537_goldfish.JPEG').convert('RGB')
  scale = 256 / min(image.size)
  image = image.resize([round(side * scale) for side in image.size], Image.BILINEAR)
  left, top = (image.width - 224) // 2, (image.height - 224) // 2
  crop = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32)
  return (crop - IMAGENET_MEAN)[None]


@pytest.fixture(scope='module')
def small_he_params():
  """'he' params of the paper variant at 63 px (the minimum input): cheap to make and run."""
  model = models.AlexNet(init_scheme='he')
  return model.init(jax.random.key(0), jnp.zeros((1, 63, 63, 3)), train=False)


@pytest.mark.parametrize('variant, expected', [('paper', 60_965_224),
                                               ('torchvision', 61_100_840)])
def test_parameter_count_matches_the_paper_and_torchvision(variant, expected):
  params = abstract_init(models.AlexNet(variant=variant), 224)['params']
  assert count(params) == expected
  assert set(params) == set(LAYERS)
  torch_model = torch_reference.TorchAlexNet(variant)
  assert sum(p.numel() for p in torch_model.parameters()) == expected


@pytest.mark.parametrize('variant', models.VARIANTS)
@pytest.mark.parametrize('size', [224, 227, 67, (67, 100), 256])
@pytest.mark.parametrize('conv1_padding, channels', [(None, 3), (0, 3), (3, 1)])
def test_layer_table_agrees_with_the_module(variant, size, conv1_padding, channels):
  height, width = (size, size) if isinstance(size, int) else size
  model = models.AlexNet(num_classes=10, variant=variant, conv1_padding=conv1_padding,
                         input_channels=channels)
  logits, variables = jax.eval_shape(
      functools.partial(model.init_with_output, train=False, capture_intermediates=True),
      jax.random.key(0), jax.ShapeDtypeStruct((2, height, width, channels), jnp.float32))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  table = models.layer_table(variant, size, 10, conv1_padding, channels)
  assert sum(row.params for row in table) == count(variables['params'])
  outputs = {name: out['__call__'][0].shape[1:]
             for name, out in variables['intermediates'].items() if name in LAYERS}
  assert {row.name: row.shape for row in table if row.name in LAYERS} == outputs


@pytest.mark.parametrize('variant, first_dropout_width', [('paper', 4096),
                                                          ('torchvision', 9216),
                                                          ('d2l', 4096)])
def test_dropout_sits_after_fc6_and_fc7_in_the_paper_before_them_in_torchvision(
    variant, first_dropout_width):
  variables = abstract_init(models.AlexNet(variant=variant), 224, capture_intermediates=True)
  dropouts = {name: out['__call__'][0].shape for name, out in variables['intermediates'].items()
              if name.startswith('Dropout')}
  assert dropouts == {'Dropout_0': (1, first_dropout_width), 'Dropout_1': (1, 4096)}


def test_fc6_sees_6x6x256_at_224_and_227_in_paper_and_torchvision():
  for variant in ('paper', 'torchvision'):
    assert models.feature_shape(variant, 224) == (6, 6, 256)
    assert models.feature_shape(variant, 227) == (6, 6, 256)  # Caffe's crop, see models.py.
    assert models.feature_shape(variant, 227, conv1_padding=0) == (6, 6, 256)  # Caffe's conv1.
  assert models.feature_shape('paper', 256) == (7, 7, 256)
  assert models.feature_shape('torchvision', 256) == (6, 6, 256)
  # d2l pads conv1 by 1: (224 + 2 - 11) // 4 + 1 = 54, then pools to 26, 12 and 5.
  assert models.feature_shape('d2l', 224) == (5, 5, 256)


@pytest.mark.parametrize('variant, filters, expected_total', [('paper', 96, 724e6),
                                                              ('torchvision', 64, 714e6)])
def test_multiply_adds(variant, filters, expected_total):
  table = {row.name: row for row in models.layer_table(variant, 224)}
  # conv1: a 55x55 map of `filters` outputs, each a dot product over an 11x11x3 window.
  assert table['conv1'].macs == 55 * 55 * filters * 11 * 11 * 3
  assert table['fc6'].macs == 9216 * 4096
  total = sum(row.macs for row in table.values())
  assert abs(total - expected_total) / expected_total < 0.002


def test_summary_lists_every_layer_and_the_totals():
  text = models.summary(models.AlexNet(), 224)
  for name in LAYERS + ('lrn1', 'lrn2', 'pool1', 'pool2', 'pool5'):
    assert f'\n{name} ' in text
  assert '55x55x96' in text and '6x6x256' in text
  total = text.splitlines()[-1].split()
  assert total == ['total', '60,965,224', '724,406,816']


@pytest.mark.parametrize('variant', torch_reference.VARIANTS)
def test_minimum_input_size(variant):
  assert models.min_input_size(variant) == 63
  model = models.AlexNet(variant=variant)
  assert abstract_init(model, 63, 200)['params']['fc8']['kernel'].shape == (4096, 1000)
  for height, width in ((62, 62), (62, 300), (300, 62)):
    with pytest.raises(ValueError, match=f'at least 63x63 pixels.*got {height}x{width}'):
      abstract_init(model, height, width)
  # Independently, torch runs at 63 and fails at 62.
  torch_model = torch_reference.TorchAlexNet(variant, image_size=63).eval()
  with torch.no_grad():
    assert torch_model(torch.zeros(1, 3, 63, 63)).shape == (1, 1000)
    with pytest.raises(RuntimeError):
      torch_model.features(torch.zeros(1, 3, 62, 62))


def test_bad_arguments_raise_value_errors():
  with pytest.raises(ValueError,
                     match=r"variant 'alexnet'.*\('paper', 'torchvision', 'd2l'\)"):
    models.AlexNet(variant='alexnet')
  with pytest.raises(ValueError,
                     match=r"init_scheme 'glorot'.*\('paper', 'caffe', 'he', 'xavier'\)"):
    models.AlexNet(init_scheme='glorot')
  with pytest.raises(ValueError, match='conv1_padding must be None or a non-negative int'):
    models.AlexNet(conv1_padding=-1)
  with pytest.raises(ValueError, match='input_channels must be a positive int'):
    models.AlexNet(input_channels=0)
  with pytest.raises(ValueError, match='dropout_rate'):
    models.AlexNet(dropout_rate=1.0)
  with pytest.raises(ValueError, match=r'NHWC.*\(224, 224, 3\)'):
    jax.eval_shape(functools.partial(models.AlexNet().init, train=False), jax.random.key(0),
                   jax.ShapeDtypeStruct((224, 224, 3), jnp.float32))
  with pytest.raises(ValueError, match='choose one of'):
    models.min_input_size('vgg')


@pytest.mark.slow
@pytest.mark.parametrize('scheme', models.INIT_SCHEMES)
def test_initializers(scheme):
  params = models.AlexNet(init_scheme=scheme).init(
      jax.random.key(1), jnp.zeros((1, 63, 63, 3)), train=False)['params']
  params = jax.tree.map(np.asarray, params)
  for layer in LAYERS:
    kernel, bias = params[layer]['kernel'], params[layer]['bias']
    if scheme == 'xavier':
      # torch's xavier_uniform_ (d2l): U(+-sqrt(6 / (fan_in + fan_out))), variance
      # 2 / (fan_in + fan_out), with a conv's fans counting its window (fan_in its group's
      # share); biases keep torch's default U(+-1 / sqrt(fan_in)).
      receptive = np.prod(kernel.shape[:-2])
      fan_in, fan_out = receptive * kernel.shape[-2], receptive * kernel.shape[-1]
      assert kernel.std() == pytest.approx(np.sqrt(2 / (fan_in + fan_out)), rel=0.03), layer
      # Bounds in float32, as the draws are.
      assert np.abs(kernel).max() <= np.float32(np.sqrt(6 / (fan_in + fan_out))), layer
      assert np.abs(bias).max() <= np.float32(1 / np.sqrt(fan_in)), layer
      assert np.abs(bias).max() > 0.8 / np.sqrt(fan_in), layer
      if bias.size >= 1000:
        assert bias.std() == pytest.approx(1 / np.sqrt(3 * fan_in), rel=0.05), layer
      continue
    if scheme == 'he':
      # Kaiming normal over the inputs one filter sees (a group's share in grouped layers).
      std = 0.01 if layer == 'fc8' else np.sqrt(2.0 / np.prod(kernel.shape[:-1]))
      expected_bias = 0.0
    else:
      std = 0.005 if scheme == 'caffe' and layer in ('fc6', 'fc7') else 0.01
      expected_bias = {'paper': 1.0, 'caffe': 0.1}[scheme] if layer in BIAS_ONE else 0.0
    assert kernel.std() == pytest.approx(std, rel=0.03), layer
    assert abs(kernel.mean()) < 4 * std / np.sqrt(kernel.size), layer
    np.testing.assert_array_equal(bias, np.full_like(bias, expected_bias), err_msg=layer)
  # The grouped layers really are grouped: each conv4 filter sees 384 / 2 channels.
  assert params['conv4']['kernel'].shape == (3, 3, 192, 384)


def test_dropout_only_in_training(small_he_params):
  model = models.AlexNet(init_scheme='he')
  images = jax.random.normal(jax.random.key(2), (2, 63, 63, 3)) * 50
  apply = functools.partial(model.apply, small_he_params, images)
  key1, key2 = jax.random.key(3), jax.random.key(4)
  evaluated = apply(train=False, rngs={'dropout': key1})
  np.testing.assert_array_equal(evaluated, apply(train=False, rngs={'dropout': key2}))
  np.testing.assert_array_equal(evaluated, apply(train=False))
  trained1 = apply(train=True, rngs={'dropout': key1})
  np.testing.assert_array_equal(trained1, apply(train=True, rngs={'dropout': key1}))
  trained2 = apply(train=True, rngs={'dropout': key2})
  scale = np.abs(evaluated).max()
  assert np.abs(trained1 - trained2).max() > 0.05 * scale
  assert np.abs(trained1 - evaluated).max() > 0.05 * scale
  no_dropout = models.AlexNet(init_scheme='he', dropout_rate=0.0)
  np.testing.assert_array_equal(
      no_dropout.apply(small_he_params, images, train=True, rngs={'dropout': key1}), evaluated)


def test_bfloat16_compute_returns_float32_logits_close_to_float32(small_he_params,
                                                                  goldfish_224):
  images = jax.image.resize(goldfish_224, (1, 63, 63, 3), 'linear')
  logits32 = models.AlexNet().apply(small_he_params, images, train=False)
  model16 = models.AlexNet(dtype=jnp.bfloat16)
  logits16 = model16.apply(small_he_params, images, train=False)
  assert logits16.dtype == jnp.float32
  scale = np.abs(logits32).max()
  assert scale > 1.0
  # bfloat16 keeps 8 significant bits: a few percent of the logit scale after 8 layers.
  assert np.abs(logits16 - logits32).max() < 0.05 * scale
  assert np.abs(logits16 - logits32).max() > 0  # The compute really was bfloat16.
  params16 = model16.init(jax.random.key(0), images, train=False)['params']
  assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('in_size', [(13, 13), (6, 6), (7, 9), (1, 1), (5, 17), (20, 3)])
def test_adaptive_avg_pool_matches_torch(in_size):
  x = np.random.default_rng(0).standard_normal((2, *in_size, 4)).astype(np.float32)
  ours = models.adaptive_avg_pool(jnp.asarray(x), (6, 6))
  theirs = torch.nn.AdaptiveAvgPool2d((6, 6))(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('variant', torch_reference.VARIANTS)  # d2l: tests/test_d2l.py.
def test_forward_matches_torch_on_a_real_photo(variant, goldfish_224):
  torch.manual_seed(0)
  torch_model = torch_reference.TorchAlexNet(variant).eval()
  # Kaiming init keeps the activations at the input's scale, so the logits depend on the photo.
  for module in torch_model.modules():
    if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
      torch.nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
      torch.nn.init.normal_(module.bias, std=0.1)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(goldfish_224).permute(0, 3, 1, 2)).numpy()
  params = convert.torch_state_dict_to_flax(torch_model.state_dict(), variant)
  apply = jax.jit(functools.partial(models.AlexNet(variant=variant).apply, train=False))
  logits = np.asarray(apply({'params': params}, goldfish_224))
  scale = np.abs(expected).max()
  assert scale > 10.0 and expected.std() > 0.1 * scale
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * scale)
  # The same network on another photo gives other logits: the comparison is not vacuous.
  assert np.abs(np.asarray(apply({'params': params}, goldfish_224[:, ::-1])) - logits).max() \
      > 1e-2 * scale
