"""Weight conversion between torch state_dicts and Flax params, both ways, both variants."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alexnet_jax import convert
from alexnet_jax import models
from alexnet_jax import torch_reference

# torchvision.models.alexnet().state_dict(), written out from torchvision's source.
TORCHVISION_SHAPES = {
    'features.0.weight': (64, 3, 11, 11), 'features.0.bias': (64,),
    'features.3.weight': (192, 64, 5, 5), 'features.3.bias': (192,),
    'features.6.weight': (384, 192, 3, 3), 'features.6.bias': (384,),
    'features.8.weight': (256, 384, 3, 3), 'features.8.bias': (256,),
    'features.10.weight': (256, 256, 3, 3), 'features.10.bias': (256,),
    'classifier.1.weight': (4096, 9216), 'classifier.1.bias': (4096,),
    'classifier.4.weight': (4096, 4096), 'classifier.4.bias': (4096,),
    'classifier.6.weight': (1000, 4096), 'classifier.6.bias': (1000,),
}
# The paper variant at 96 px: pool5 is 2x2x256, so fc6's permutation is not trivial, and small.
PAPER_SIZE = 96


def numpy_state_dict(torch_model):
  return {name: tensor.numpy().copy() for name, tensor in torch_model.state_dict().items()}


@pytest.fixture(scope='module')
def state_dicts():
  """Randomly initialised torch state_dicts as numpy: {'paper': ..., 'torchvision': ...}."""
  torch.manual_seed(0)
  return {'paper': numpy_state_dict(torch_reference.TorchAlexNet('paper', 10, PAPER_SIZE)),
          'torchvision': numpy_state_dict(torch_reference.TorchAlexNet('torchvision'))}


def image_size(variant):
  return PAPER_SIZE if variant == 'paper' else 224


def test_torch_reference_has_torchvision_names_and_shapes(state_dicts):
  shapes = {name: array.shape for name, array in state_dicts['torchvision'].items()}
  assert shapes == TORCHVISION_SHAPES
  assert set(convert.torch_names('torchvision').values()) == set(TORCHVISION_SHAPES)
  assert set(convert.torch_names('paper').values()) == set(state_dicts['paper'])
  assert state_dicts['paper']['features.4.weight'].shape == (256, 48, 5, 5)  # 2 groups.


@pytest.mark.slow
@pytest.mark.parametrize('variant', torch_reference.VARIANTS)  # d2l: tests/test_d2l.py.
def test_round_trips_are_exact(variant, state_dicts):
  state_dict = state_dicts[variant]
  params = convert.torch_state_dict_to_flax(state_dict, variant, image_size(variant))
  model = models.AlexNet(num_classes=state_dict['classifier.6.bias'].size, variant=variant)
  expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, image_size(variant), image_size(variant), 3)))
  assert jax.tree.map(lambda leaf: leaf.shape, params) == jax.tree.map(
      lambda leaf: leaf.shape, expected['params'])

  back = convert.flax_to_torch_state_dict(params, variant, image_size(variant))
  assert set(back) == set(state_dict)
  for name, array in state_dict.items():
    np.testing.assert_array_equal(back[name], array, err_msg=name)
  again = convert.torch_state_dict_to_flax(back, variant, image_size(variant))
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_fc6_follows_the_flatten_orders(state_dicts):
  state_dict = state_dicts['paper']
  params = convert.torch_state_dict_to_flax(state_dict, 'paper', PAPER_SIZE)
  pool5 = np.random.default_rng(0).standard_normal((256, 2, 2)).astype(np.float32)  # (c, h, w)
  torch_fc6 = state_dict['classifier.0.weight'] @ pool5.reshape(-1)  # torch.flatten: c, h, w.
  flax_fc6 = pool5.transpose(1, 2, 0).reshape(-1) @ params['fc6']['kernel']  # NHWC: h, w, c.
  np.testing.assert_allclose(flax_fc6, torch_fc6, rtol=1e-5, atol=1e-5)


def test_converted_weights_load_into_torch(state_dicts):
  params = convert.torch_state_dict_to_flax(state_dicts['paper'], 'paper', PAPER_SIZE)
  torch_model = torch_reference.TorchAlexNet('paper', 10, PAPER_SIZE)
  state_dict = convert.flax_to_torch_state_dict(params, 'paper', PAPER_SIZE)
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  np.testing.assert_array_equal(torch_model.features[4].weight.detach().numpy(),
                                state_dicts['paper']['features.4.weight'])


def test_reads_pth_files_with_torch_tensors(tmp_path, state_dicts):
  path = tmp_path / 'alexnet.pth'
  torch.save({k: torch.from_numpy(v) for k, v in state_dicts['paper'].items()}, path)
  from_file = convert.torch_state_dict_to_flax(path, 'paper', PAPER_SIZE)
  from_dict = convert.torch_state_dict_to_flax(state_dicts['paper'], 'paper', PAPER_SIZE)
  jax.tree.map(np.testing.assert_array_equal, from_file, from_dict)


def test_numpy_dicts_need_no_torch(monkeypatch, state_dicts, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError.
  params = convert.torch_state_dict_to_flax(state_dicts['paper'], 'paper', PAPER_SIZE)
  assert params['conv2']['kernel'].shape == (5, 5, 48, 256)
  with pytest.raises(ImportError, match='needs PyTorch.*numpy'):
    convert.torch_state_dict_to_flax(tmp_path / 'x.pth', 'paper')


def test_npz_and_command_line(tmp_path, state_dicts, capsys):
  pth, npz = tmp_path / 'in.pth', tmp_path / 'out.npz'
  torch.save({k: torch.from_numpy(v) for k, v in state_dicts['paper'].items()}, pth)
  convert.main([f'--torch={pth}', f'--out={npz}', '--variant=paper',
                f'--image_size={PAPER_SIZE}'])
  assert "parameters of the 'paper' AlexNet" in capsys.readouterr().out
  loaded = convert.load_npz(npz)
  expected = convert.torch_state_dict_to_flax(state_dicts['paper'], 'paper', PAPER_SIZE)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def test_wrong_keys_are_listed(state_dicts):
  state_dict = dict(state_dicts['torchvision'])
  del state_dict['features.6.bias']
  state_dict['features.7.bias'] = np.zeros(384, np.float32)
  with pytest.raises(ValueError, match=r"missing \['features.6.bias'\], "
                                       r"unexpected \['features.7.bias'\]"):
    convert.torch_state_dict_to_flax(state_dict, 'torchvision')
  with pytest.raises(ValueError, match=r"'torchvision' AlexNet.*missing.*features.4.weight"):
    convert.torch_state_dict_to_flax(state_dicts['paper'], 'torchvision')
  with pytest.raises(ValueError, match='choose one of'):
    convert.torch_state_dict_to_flax(state_dicts['paper'], 'caffenet')


def test_wrong_shapes_are_listed(state_dicts):
  state_dict = dict(state_dicts['torchvision'])
  state_dict['features.0.weight'] = np.zeros((96, 3, 11, 11), np.float32)
  with pytest.raises(ValueError, match=r'features.0.weight: got \(96, 3, 11, 11\), '
                                       r'expected \(64, 3, 11, 11\)'):
    convert.torch_state_dict_to_flax(state_dict, 'torchvision')
  # A paper net built for 96 px read as if it were for 224 px: fc6 is too narrow.
  with pytest.raises(ValueError, match=r'classifier.0.weight: got \(4096, 1024\), '
                                       r'expected \(4096, 9216\).*image_size'):
    convert.torch_state_dict_to_flax(state_dicts['paper'], 'paper', 224)


def test_flax_side_errors(state_dicts):
  params = convert.torch_state_dict_to_flax(state_dicts['paper'], 'paper', PAPER_SIZE)
  with pytest.raises(ValueError, match=r"variables\['params'\].*unexpected \['params/conv1/"):
    convert.flax_to_torch_state_dict({'params': params}, 'paper', PAPER_SIZE)
  partial = {name: layer for name, layer in params.items() if name != 'conv3'}
  with pytest.raises(ValueError, match=r"missing \['conv3/bias', 'conv3/kernel'\]"):
    convert.flax_to_torch_state_dict(partial, 'paper', PAPER_SIZE)
  with pytest.raises(ValueError, match=r'fc6/kernel: got \(1024, 4096\), expected \(9216, 4096\)'):
    convert.flax_to_torch_state_dict(params, 'paper', 224)
