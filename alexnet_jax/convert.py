"""AlexNet weights in and out: torch state_dicts, portable .npz files, this project's checkpoints.

    python -m alexnet_jax.convert --torch=alexnet.pth --out=params.npz [--variant=paper]
    python -m alexnet_jax.convert --workdir=DIR --out=params.npz [--checkpoint=best]

The first converts a torch AlexNet; the second exports a training run's params with its config.
Training starts from any of these files with `--config.init_from` (see `initial_params`).

Torch names: torchvision's `alexnet` for the 'torchvision' variant, `torch_reference.TorchAlexNet`
for 'paper' and 'torchvision', and d2l's `nn.Sequential` (its `net`, indices '0' to '20') for
'd2l'. Layouts: a torch conv weight [O, I/groups, kh, kw] is a Flax kernel [kh, kw, I/groups, O]
and a torch Linear weight [out, in] a Flax kernel [in, out]. fc6 also reorders its inputs: torch
flattens the last feature map as (c, h, w), Flax's NHWC as (h, w, c). Seen as a convolution whose
window is the whole map, fc6 takes the same permutation as the convs.

PyTorch is needed only to read a `.pth` file; dicts of numpy arrays convert without it.

The portable .npz (`save_npz`) reads with plain `numpy.load`: no pickle, no code of this project.
Its keys are 'LAYER/kernel' and 'LAYER/bias' for LAYER in conv1..conv5, fc6, fc7, fc8, float32:
  convN/kernel  [kh, kw, in / groups, out]: HWIO, for NHWC images. conv2, conv4 and conv5 of the
                paper variant have 2 groups: outputs [0, out/2) see inputs [0, in/2), outputs
                [out/2, out) inputs [in/2, in), as in TensorFlow and torch.
  fc6/kernel    [h * w * c, 4096], [in, out] like every fc kernel; [h, w, c] is the last pooled
                map, flattened NHWC: row (i * w + j) * c + k is map k at (i, j). torch flattens
                (c, h, w); `flax_to_torch_state_dict` permutes.
  fc7/kernel    [4096, 4096]; fc8/kernel [4096, num_classes]; LAYER/bias [out].
  config        only when exported from a workdir: the run's config as a JSON string,
                `json.loads(str(npz['config']))`. It gives model.variant,
                model.conv1_padding, num_classes, image_size, input_channels, the LRN
                constants and the input scaling the weights expect (pixels on 0-255, then
                `mean_subtraction`, then `divide_by_std` or `divide_by_255`).
Paper variant: conv1..5 [11, 11, 3, 96], [5, 5, 48, 256], [3, 3, 256, 384], [3, 3, 192, 384],
[3, 3, 192, 256]; fc6 [9216, 4096] at 224 px (6x6x256), [256, 4096] at 63 px (1x1x256).
torchvision variant: [11, 11, 3, 64], [5, 5, 64, 192], [3, 3, 192, 384], [3, 3, 384, 256],
[3, 3, 256, 256]; fc6 [9216, 4096] at any size (6x6 adaptive average pool first).
d2l variant: [11, 11, C, 96] (C = 1 for Fashion-MNIST), [5, 5, 96, 256], [3, 3, 256, 384],
[3, 3, 384, 384], [3, 3, 384, 256]; fc6 [6400, 4096] at 224 px (5x5x256). Between the layers:
conv1 stride 4, conv padding 2 (1 in d2l; the run's `model.conv1_padding` if set), 2, 1, 1, 1;
ReLU after all but fc8; the paper's LRN after conv1's and conv2's ReLU; 3x3 stride-2 max-pools
after conv1, conv2 and conv5.
"""

import argparse
from collections.abc import Mapping
import functools
import json
import os
import pathlib
from typing import Any

from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import checkpointing
from alexnet_jax import models

# Each Flax layer's index in the torch `features` / `classifier` Sequentials.
_TORCH_LAYERS = {
    'paper': {'conv1': 'features.0', 'conv2': 'features.4', 'conv3': 'features.8',
              'conv4': 'features.10', 'conv5': 'features.12', 'fc6': 'classifier.0',
              'fc7': 'classifier.3', 'fc8': 'classifier.6'},
    'torchvision': {'conv1': 'features.0', 'conv2': 'features.3', 'conv3': 'features.6',
                    'conv4': 'features.8', 'conv5': 'features.10', 'fc6': 'classifier.1',
                    'fc7': 'classifier.4', 'fc8': 'classifier.6'},
    # d2l's flat nn.Sequential (Conv2d, ReLU, MaxPool2d, ..., Flatten, Linear, ReLU, Dropout, ...).
    'd2l': {'conv1': '0', 'conv2': '3', 'conv3': '6', 'conv4': '8', 'conv5': '10', 'fc6': '14',
            'fc7': '17', 'fc8': '20'},
}

Params = dict[str, dict[str, np.ndarray]]
# The key of the config (JSON) in an exported .npz; never a parameter path, which has a '/'.
_CONFIG_KEY = 'config'


def torch_names(variant: str) -> dict[str, str]:
  """{'conv1/kernel': 'features.0.weight', 'conv1/bias': 'features.0.bias', ...} of `variant`."""
  if variant not in _TORCH_LAYERS:
    raise ValueError(f'Unknown AlexNet variant {variant!r}; choose one of {models.VARIANTS}.')
  return {f'{layer}/{flax_name}': f'{torch_layer}.{torch_name}'
          for layer, torch_layer in _TORCH_LAYERS[variant].items()
          for flax_name, torch_name in (('kernel', 'weight'), ('bias', 'bias'))}


def _flax_shapes(variant: str, num_classes: int, image_size: int, conv1_padding: int | None,
                 input_channels: int) -> dict[str, tuple[int, ...]]:
  """{'conv1/kernel': shape, ...} of models.AlexNet, from an abstract init (nothing computed)."""
  model = models.AlexNet(num_classes=num_classes, variant=variant, conv1_padding=conv1_padding,
                         input_channels=input_channels)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, input_channels), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  return {path: leaf.shape for path, leaf in flat.items()}


def _input_channels(conv1_shape: tuple[int, ...], axis: int) -> int:
  """The input channels conv1's weight holds (axis 1 in torch, 2 in Flax): 1 for grey images,
  3 for RGB. 3 where the weight is not 4-D, so that the shape check names it."""
  return int(conv1_shape[axis]) if len(conv1_shape) == 4 and conv1_shape[axis] > 0 else 3


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
    raise ValueError(f'{what} has mis-shaped arrays: {"; ".join(wrong)}. Check `variant`, '
                     f"`input_channels` (conv1's), and `image_size` and `conv1_padding` for "
                     f"the paper and d2l variants (fc6's width follows them).")


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
                             variant: str = 'torchvision', image_size: int = 224,
                             conv1_padding: int | None = None) -> Params:
  """Flax params of `models.AlexNet(variant=variant)` from a torch AlexNet's weights.

  Args:
    state_dict: name -> tensor or array of torchvision's alexnet ('torchvision'), of
      `torch_reference.TorchAlexNet` or of d2l's nn.Sequential ('d2l'), or the path of a `.pth`
      holding one.
    variant: 'paper', 'torchvision' or 'd2l'.
    image_size: the square input side the paper or d2l variant was built for (sets fc6's
      width).
    conv1_padding: conv1's padding the weights were trained with; None: the variant's own.

  Returns:
    {'conv1': {'kernel': [11, 11, C, C1], 'bias': [C1]}, ..., 'fc8': {...}} of numpy arrays;
    num_classes is read from fc8, the input channels C from conv1.
  """
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = _load_pth(state_dict)
  names = torch_names(variant)
  what = f'The torch state_dict for the {variant!r} AlexNet'
  _check_keys(set(state_dict), set(names.values()), what)
  arrays = {name: _numpy(state_dict[name]) for name in names.values()}
  expected = _flax_shapes(variant, arrays[names['fc8/bias']].size, image_size, conv1_padding,
                          _input_channels(arrays[names['conv1/kernel']].shape, 1))
  _check_shapes({name: arrays[name].shape for name in arrays},
                {names[path]: _torch_shape(shape) for path, shape in expected.items()}, what)
  fc6_map = models.feature_shape(variant, image_size, conv1_padding)
  flat = {path: _to_flax(path, arrays[name], fc6_map) for path, name in names.items()}
  return traverse_util.unflatten_dict(flat, sep='/')


def flax_to_torch_state_dict(params: Mapping[str, Any], variant: str, image_size: int = 224,
                             conv1_padding: int | None = None) -> dict[str, np.ndarray]:
  """A torch state_dict (of numpy arrays) from Flax params of `models.AlexNet(variant=variant)`.

  Load it with `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})` into
  torchvision's alexnet ('torchvision'), `torch_reference.TorchAlexNet(variant, ...)` or d2l's
  nn.Sequential ('d2l').

  Args:
    params: variables['params'] of the Flax model.
    variant: 'paper', 'torchvision' or 'd2l'.
    image_size: the square input side the paper or d2l variant is used at (sets fc6's width).
    conv1_padding: the model's conv1 padding; None: the variant's own.

  Returns:
    {'features.0.weight': [C1, C, 11, 11], ...} of numpy arrays (C input channels).
  """
  names = torch_names(variant)
  flat = {path: np.asarray(leaf)
          for path, leaf in traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/').items()}
  what = f"The Flax params (variables['params']) for the {variant!r} AlexNet"
  _check_keys(set(flat), set(names), what)
  _check_shapes({path: leaf.shape for path, leaf in flat.items()},
                _flax_shapes(variant, flat['fc8/bias'].size, image_size, conv1_padding,
                             _input_channels(flat['conv1/kernel'].shape, 2)), what)
  fc6_map = models.feature_shape(variant, image_size, conv1_padding)
  return {name: _to_torch(path, flat[path], fc6_map) for path, name in names.items()}


def save_npz(params: Mapping[str, Any], path: str | os.PathLike[str],
             config: Mapping[str, Any] | None = None) -> None:
  """Writes params to an .npz laid out as the module docstring says.

  Args:
    params: variables['params'] of the model: {'conv1': {'kernel': [11, 11, 3, C1], ...}, ...}.
    path: the .npz to write.
    config: if given, stored as a JSON string under 'config'.
  """
  arrays = traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  if config is not None:
    arrays[_CONFIG_KEY] = np.array(json.dumps(config))
  np.savez(path, **arrays)


def load_npz(path: str | os.PathLike[str]) -> Params:
  """Reads the params written by `save_npz` (without the config)."""
  with np.load(path) as data:
    return traverse_util.unflatten_dict(
        {key: data[key] for key in data.files if key != _CONFIG_KEY}, sep='/')


def _read_weights(path: pathlib.Path, variant: str, image_size: int,
                  conv1_padding: int | None) -> Params:
  """Params from an .npz, a torch .pth/.pt state_dict, or a workdir or checkpoint directory.

  Raises:
    FileNotFoundError: there is no such file.
    ValueError: the file is of none of these kinds or cannot be read; the message names it.
    checkpointing.CheckpointError: a directory without a usable checkpoint.
  """
  if not path.exists():
    raise FileNotFoundError(f'init_from={str(path)!r} does not exist.')
  if not path.is_dir() and path.suffix not in ('.npz', '.pth', '.pt'):
    raise ValueError(f'init_from={str(path)!r} is neither an .npz, a .pth/.pt state_dict nor '
                     f'a training workdir or checkpoint directory.')
  try:
    if path.is_dir():
      return checkpointing.read_params(path)[1]
    if path.suffix == '.npz':
      return load_npz(path)
    return torch_state_dict_to_flax(path, variant, image_size, conv1_padding)
  except checkpointing.CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # A damaged or foreign file fails deep in numpy, torch or Orbax, often without its name.
    raise ValueError(f'Cannot use init_from={str(path)!r}: {type(e).__name__}: {e}') from e


def initial_params(path: str | os.PathLike[str], fresh: Mapping[str, Any], variant: str,
                   image_size: int, conv1_padding: int | None = None) -> dict[str, Any]:
  """The weights at `path` to start training from (`config.init_from`), fitted to `fresh`.

  Args:
    path: an .npz of `save_npz`, a torch .pth/.pt state_dict of `variant`, or a training
      workdir (or its checkpoints/, or one step in it) of this project: its params only.
    fresh: newly initialised params of the run's model; fc8's kernel is [4096, num_classes].
    variant: the run's model variant ('paper', 'torchvision' or 'd2l').
    image_size: the run's input side (reads the paper and d2l variants' fc6 from torch).
    conv1_padding: the run's `model.conv1_padding` (None: the variant's own).
  Returns:
    The loaded params as arrays of `fresh`'s dtypes. Where fc8's class count differs (a new
    label set), fc8 stays `fresh`'s, and one line says so.
  Raises:
    ValueError: any other parameter is missing, unexpected or mis-shaped; the message names it.
  """
  path = pathlib.Path(path)
  loaded = traverse_util.flatten_dict(
      flax.core.unfreeze(_read_weights(path, variant, image_size, conv1_padding)), sep='/')
  expected = traverse_util.flatten_dict(flax.core.unfreeze(fresh), sep='/')
  what = f'init_from={str(path)!r}'
  _check_keys(set(loaded), set(expected), what)
  classes, loaded_classes = expected['fc8/bias'].shape[0], loaded['fc8/bias'].shape[0]
  if loaded_classes != classes:
    logging.info('init_from: fc8 has %d classes, config has %d: fc8 re-initialised.',
                 loaded_classes, classes)
    loaded.update({key: expected[key] for key in ('fc8/kernel', 'fc8/bias')})
  _check_shapes({key: leaf.shape for key, leaf in loaded.items()},
                {key: leaf.shape for key, leaf in expected.items()}, what)
  logging.info('init_from: starting from the weights in %s.', path)
  return traverse_util.unflatten_dict(
      {key: jnp.asarray(leaf, expected[key].dtype) for key, leaf in loaded.items()}, sep='/')


def _read_source(args: argparse.Namespace) -> tuple[Params, dict[str, Any] | None, str]:
  """(params, the config or None, what they are) from --workdir or --torch."""
  if args.workdir:
    step, params, meta = checkpointing.read_params(args.workdir, args.checkpoint == 'best')
    variant = meta['config']['model']['variant']
    return params, meta['config'], (f'{variant!r} AlexNet (step {step}, the {args.checkpoint} '
                                    f'checkpoint) and its config')
  params = torch_state_dict_to_flax(args.torch, args.variant, args.image_size,
                                    args.conv1_padding)
  return params, None, f'{args.variant!r} AlexNet'


def load_params(path: str | os.PathLike[str], variant: str, num_classes: int,
                image_size: int = 224, conv1_padding: int | None = None,
                input_channels: int = 3) -> Params:
  """The weights at `path` to evaluate or predict with: all of them must fit, fc8 included.

  Args:
    path: as for `initial_params`.
    variant: the model variant ('paper', 'torchvision' or 'd2l').
    num_classes: the model's classes (fc8's width).
    image_size: the model's input side (fc6's width in the paper and d2l variants).
    conv1_padding: the model's conv1 padding (None: the variant's own).
    input_channels: the model's input channels (conv1's kernel sees them).
  Returns:
    {'conv1': {'kernel': [11, 11, C, C1], 'bias': [C1]}, ..., 'fc8': {...}}.
  Raises:
    FileNotFoundError: there is no such file.
    ValueError: the file cannot be read, or a parameter is missing, unexpected or mis-shaped.
  """
  path = pathlib.Path(path)
  params = _read_weights(path, variant, image_size, conv1_padding)
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  expected = _flax_shapes(variant, num_classes, image_size, conv1_padding, input_channels)
  what = f'init_from={str(path)!r} for the {variant!r} AlexNet with {num_classes} classes'
  _check_keys(set(flat), set(expected), what)
  _check_shapes({key: leaf.shape for key, leaf in flat.items()}, expected, what)
  return params


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description='Writes AlexNet params to a portable .npz: converted from a torch .pth, or '
                  'exported from a training workdir with its config.')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--torch', help='.pth state_dict to convert.')
  source.add_argument('--workdir', help='Training workdir (or its checkpoints/, or one step '
                                        'in it) to export.')
  parser.add_argument('--out', required=True, help='.npz of Flax params to write.')
  parser.add_argument('--checkpoint', default='latest', choices=('latest', 'best'),
                      help='With --workdir: the latest, or the best by config.best_metric.')
  parser.add_argument('--variant', default='torchvision', choices=models.VARIANTS,
                      help='With --torch: the AlexNet the weights belong to.')
  parser.add_argument('--image_size', type=int, default=224,
                      help="With --torch: input side the paper or d2l variant was built for "
                           "(fc6's width).")
  parser.add_argument('--conv1_padding', type=int, default=None,
                      help="With --torch: conv1's padding, if not the variant's own (2; 1 for "
                           "d2l); 0 for Caffe's 227 px geometry. Sets fc6's width.")
  args = parser.parse_args(argv)
  try:
    params, config, what = _read_source(args)
  except (OSError, ValueError, checkpointing.CheckpointError) as e:
    raise SystemExit(f'{type(e).__name__}: {e}') from None
  save_npz(params, args.out, config)
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  print(f'Wrote {count:,} parameters of the {what} to {args.out}.')


if __name__ == '__main__':
  main()
