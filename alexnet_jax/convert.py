"""AlexNet weights between PyTorch state_dicts and Flax params of `models.AlexNet`.

Torch names: torchvision's `alexnet` for the 'torchvision' variant, `torch_reference.TorchAlexNet`
for both. Layouts: a torch conv weight [O, I/groups, kh, kw] is a Flax kernel [kh, kw, I/groups, O]
and a torch Linear weight [out, in] a Flax kernel [in, out]. fc6 also reorders its inputs: torch
flattens the last feature map as (c, h, w), Flax's NHWC as (h, w, c). Seen as a convolution whose
window is the whole map, fc6 takes the same permutation as the convs.

PyTorch is needed only to read a `.pth` file; dicts of numpy arrays convert without it.

    python -m alexnet_jax.convert --torch=alexnet.pth --out=params.npz [--variant=paper]
"""

import argparse
from collections.abc import Mapping
import functools
import os
from typing import Any

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import models

# Each Flax layer's index in the torch `features` / `classifier` Sequentials.
_TORCH_LAYERS = {
    'paper': {'conv1': 'features.0', 'conv2': 'features.4', 'conv3': 'features.8',
              'conv4': 'features.10', 'conv5': 'features.12', 'fc6': 'classifier.0',
              'fc7': 'classifier.3', 'fc8': 'classifier.6'},
    'torchvision': {'conv1': 'features.0', 'conv2': 'features.3', 'conv3': 'features.6',
                    'conv4': 'features.8', 'conv5': 'features.10', 'fc6': 'classifier.1',
                    'fc7': 'classifier.4', 'fc8': 'classifier.6'},
}

Params = dict[str, dict[str, np.ndarray]]


def torch_names(variant: str) -> dict[str, str]:
  """{'conv1/kernel': 'features.0.weight', 'conv1/bias': 'features.0.bias', ...} of `variant`."""
  if variant not in _TORCH_LAYERS:
    raise ValueError(f'Unknown AlexNet variant {variant!r}; choose one of {models.VARIANTS}.')
  return {f'{layer}/{flax_name}': f'{torch_layer}.{torch_name}'
          for layer, torch_layer in _TORCH_LAYERS[variant].items()
          for flax_name, torch_name in (('kernel', 'weight'), ('bias', 'bias'))}


def _flax_shapes(variant: str, num_classes: int, image_size: int) -> dict[str, tuple[int, ...]]:
  """{'conv1/kernel': shape, ...} of models.AlexNet, from an abstract init (nothing computed)."""
  model = models.AlexNet(num_classes=num_classes, variant=variant)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  return {path: leaf.shape for path, leaf in flat.items()}


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], *flax_shape[:2])
  return flax_shape[::-1]


def _to_flax(path: str, weight: np.ndarray, fc6_map: tuple[int, int, int]) -> np.ndarray:
  """The Flax array at `path` from its torch counterpart; fc6_map is fc6's input (h, w, c)."""
  if path.endswith('bias'):
    return np.array(weight)  # A copy: never share memory with the caller's arrays.
  if path == 'fc6/kernel':
    height, width, channels = fc6_map
    weight = weight.reshape(weight.shape[0], channels, height, width)
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).reshape(-1, weight.shape[0])
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T)


def _to_torch(path: str, leaf: np.ndarray, fc6_map: tuple[int, int, int]) -> np.ndarray:
  """The inverse of `_to_flax`."""
  if path.endswith('bias'):
    return np.array(leaf)
  if path == 'fc6/kernel':
    leaf = leaf.reshape(*fc6_map, leaf.shape[-1])
    return np.ascontiguousarray(leaf.transpose(3, 2, 0, 1)).reshape(leaf.shape[-1], -1)
  return np.ascontiguousarray(leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf.T)


def _check_keys(found: set[str], expected: set[str], what: str) -> None:
  missing, unexpected = sorted(expected - found), sorted(found - expected)
  if missing or unexpected:
    variants = ' or '.join(map(repr, models.VARIANTS))
    raise ValueError(f'{what} has the wrong keys: missing {missing}, unexpected {unexpected}. '
                     f'Check that `variant` ({variants}) matches the weights.')


def _check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                  what: str) -> None:
  wrong = [f'{key}: got {found[key]}, expected {shape}'
           for key, shape in expected.items() if tuple(found[key]) != tuple(shape)]
  if wrong:
    raise ValueError(f'{what} has mis-shaped arrays: {"; ".join(wrong)}. Check `variant`, and '
                     f"`image_size` for the paper variant (fc6's width follows it).")


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # A torch.Tensor, read without importing torch.
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _load_pth(path: str | os.PathLike[str]) -> Mapping[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading {path} needs PyTorch; without it, pass a dict of numpy '
                      'arrays instead.') from e
  return torch.load(path, map_location='cpu', weights_only=True)


def torch_state_dict_to_flax(state_dict: Mapping[str, Any] | str | os.PathLike[str],
                             variant: str = 'torchvision', image_size: int = 224) -> Params:
  """Flax params of `models.AlexNet(variant=variant)` from a torch AlexNet's weights.

  Args:
    state_dict: name -> tensor or array of torchvision's alexnet ('torchvision') or of
      `torch_reference.TorchAlexNet`, or the path of a `.pth` holding one.
    variant: 'paper' or 'torchvision'.
    image_size: the square input side the paper variant was built for (sets fc6's width).

  Returns:
    {'conv1': {'kernel': [11, 11, 3, C1], 'bias': [C1]}, ..., 'fc8': {...}} of numpy arrays;
    num_classes is read from fc8.
  """
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = _load_pth(state_dict)
  names = torch_names(variant)
  what = f'The torch state_dict for the {variant!r} AlexNet'
  _check_keys(set(state_dict), set(names.values()), what)
  arrays = {name: _numpy(state_dict[name]) for name in names.values()}
  expected = _flax_shapes(variant, arrays[names['fc8/bias']].size, image_size)
  _check_shapes({name: arrays[name].shape for name in arrays},
                {names[path]: _torch_shape(shape) for path, shape in expected.items()}, what)
  fc6_map = models.feature_shape(variant, image_size)
  flat = {path: _to_flax(path, arrays[name], fc6_map) for path, name in names.items()}
  return traverse_util.unflatten_dict(flat, sep='/')


def flax_to_torch_state_dict(params: Mapping[str, Any], variant: str,
                             image_size: int = 224) -> dict[str, np.ndarray]:
  """A torch state_dict (of numpy arrays) from Flax params of `models.AlexNet(variant=variant)`.

  Load it with `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})` into
  torchvision's alexnet ('torchvision') or `torch_reference.TorchAlexNet(variant, ...)`.

  Args:
    params: variables['params'] of the Flax model.
    variant: 'paper' or 'torchvision'.
    image_size: the square input side the paper variant is used at (sets fc6's width).

  Returns:
    {'features.0.weight': [C1, 3, 11, 11], ...} of numpy arrays.
  """
  names = torch_names(variant)
  flat = {path: np.asarray(leaf)
          for path, leaf in traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/').items()}
  what = f"The Flax params (variables['params']) for the {variant!r} AlexNet"
  _check_keys(set(flat), set(names), what)
  _check_shapes({path: leaf.shape for path, leaf in flat.items()},
                _flax_shapes(variant, flat['fc8/bias'].size, image_size), what)
  fc6_map = models.feature_shape(variant, image_size)
  return {name: _to_torch(path, flat[path], fc6_map) for path, name in names.items()}


def save_npz(params: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
  """Writes params to an .npz whose keys are the flattened paths ('conv1/kernel', ...)."""
  np.savez(path, **traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/'))


def load_npz(path: str | os.PathLike[str]) -> Params:
  """Reads params written by `save_npz`."""
  with np.load(path) as data:
    return traverse_util.unflatten_dict({key: data[key] for key in data.files}, sep='/')


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description='Converts a torch AlexNet .pth to Flax params.')
  parser.add_argument('--torch', required=True, help='.pth state_dict to read.')
  parser.add_argument('--out', required=True, help='.npz of Flax params to write.')
  parser.add_argument('--variant', default='torchvision', choices=models.VARIANTS)
  parser.add_argument('--image_size', type=int, default=224,
                      help="Input side the paper variant was built for (fc6's width).")
  args = parser.parse_args(argv)
  params = torch_state_dict_to_flax(args.torch, args.variant, args.image_size)
  save_npz(params, args.out)
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  print(f'Wrote {count:,} parameters of the {args.variant!r} AlexNet to {args.out}.')


if __name__ == '__main__':
  main()
