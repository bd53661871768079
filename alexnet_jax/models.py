"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) in Flax: the paper's net, torchvision's or d2l's.

Variants:
  'paper': 96-256-384-384-256 filters; conv2, conv4 and conv5 in 2 groups (the paper's two GPUs,
    each filter sees half of the previous layer's maps); ReLU, LRN and an overlapping 3x3/2
    max-pool after conv1 and conv2; max-pool after conv5; dropout after fc6 and fc7. No adaptive
    pool, so fc6's input size follows the image size.
  'torchvision': torchvision's `alexnet` ("one weird trick"): 64-192-384-256-256 filters, no
    groups, no LRN, adaptive average pool to 6x6, dropout before fc6 and fc7.
  'd2l': the AlexNet of "Dive into Deep Learning" (its chapter on AlexNet): the paper's widths
    without groups or LRN, conv1 padded by 1, max-pools and dropout placed as in the paper, for
    1-channel Fashion-MNIST at 224 px and 10 classes: maps 54, 26, 12, 5 and 5x5x256 = 6400
    inputs to fc6.

conv1 is 11x11 stride 4, padded by 2 in 'paper' and 'torchvision' and by 1 in 'd2l' unless
`conv1_padding` says otherwise. The paper says 224 px, but (224 - 11) / 4 + 1 is not whole;
Caffe crops 227 with no padding, torchvision crops 224 and pads by 2. Both give 55x55. By default
we pad by 2 like torchvision, so 224 gives 55x55 exactly; a 227 image then gives 56x56 after
conv1, but pool1 floors (56 - 3) / 2 + 1 to 27 just as Caffe's 55 does, so from pool1 on every
shape (and fc6's 6x6x256 input) is the same as at 224 or in Caffe. `conv1_padding=0` at 227 is
Caffe's (and CS231n's) geometry exactly: 55x55x96 after conv1.

Images are NHWC with `input_channels` channels (3: RGB; 1: grey, as d2l's Fashion-MNIST); the
activations are flattened in (h, w, c) order before fc6, where torch flattens (c, h, w):
`convert.py` permutes fc6's weight between the two.
"""

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import fast_ops
from alexnet_jax import lrn

VARIANTS = ('paper', 'torchvision', 'd2l')
INIT_SCHEMES = ('paper', 'caffe', 'he', 'xavier')

_POOL_WINDOW, _POOL_STRIDE = 3, 2  # Overlapping pooling, section 3.4.


def _xla_max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  return nn.max_pool(x, (window, window), (stride, stride), 'VALID')


# `AlexNet.ops` -> (conv_general_dilated for nn.Conv, max_pool(x, window, stride)).
_OPS = {'xla': (jax.lax.conv_general_dilated, _xla_max_pool),
        'cpu': (fast_ops.conv_general_dilated, fast_ops.max_pool),
        'partitionable': (fast_ops.partitionable_conv_general_dilated, _xla_max_pool)}
OPS = tuple(_OPS)
_TORCHVISION_POOL_SIZE = 6  # torchvision's AdaptiveAvgPool2d((6, 6)).
_FC_WIDTH = 4096
# The layers the paper starts with bias 1 ("accelerates the early stages of learning").
_BIAS_ONE_LAYERS = ('conv2', 'conv4', 'conv5', 'fc6', 'fc7')


class _ConvStage(NamedTuple):
  """A convolution, its ReLU, then optionally LRN and a max-pool."""
  name: str
  features: int
  kernel: int
  stride: int
  padding: int
  groups: int = 1
  lrn: bool = False
  pool: bool = False


_PAPER_STAGES = (
    _ConvStage('conv1', 96, 11, 4, 2, lrn=True, pool=True),
    _ConvStage('conv2', 256, 5, 1, 2, groups=2, lrn=True, pool=True),
    _ConvStage('conv3', 384, 3, 1, 1),
    _ConvStage('conv4', 384, 3, 1, 1, groups=2),
    _ConvStage('conv5', 256, 3, 1, 1, groups=2, pool=True),
)
_STAGES = {
    'paper': _PAPER_STAGES,
    'torchvision': (
        _ConvStage('conv1', 64, 11, 4, 2, pool=True),
        _ConvStage('conv2', 192, 5, 1, 2, pool=True),
        _ConvStage('conv3', 384, 3, 1, 1),
        _ConvStage('conv4', 256, 3, 1, 1),
        _ConvStage('conv5', 256, 3, 1, 1, pool=True),
    ),
    # The paper's without groups or LRN, conv1 padded by 1: d2l's nn.Sequential(nn.Conv2d(1, 96,
    # kernel_size=11, stride=4, padding=1), ...).
    'd2l': tuple(stage._replace(groups=1, lrn=False,
                                padding=1 if stage.name == 'conv1' else stage.padding)
                 for stage in _PAPER_STAGES),
}


class Layer(NamedTuple):
  """One row of the hand-computed layer table (per image)."""
  name: str
  shape: tuple[int, ...]  # Output shape, (H, W, C) or (features,).
  params: int
  macs: int  # Multiply-adds.


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f'Unknown AlexNet variant {variant!r}; choose one of {VARIANTS}.')


def _stages(variant: str, conv1_padding: int | None) -> tuple[_ConvStage, ...]:
  """The conv stages of `variant`, conv1 padded by `conv1_padding` (None: the variant's own)."""
  _check_variant(variant)
  stages = _STAGES[variant]
  if conv1_padding is None:
    return stages
  if not isinstance(conv1_padding, int) or conv1_padding < 0:
    raise ValueError(f'conv1_padding must be None or a non-negative int, got {conv1_padding!r}.')
  return (stages[0]._replace(padding=conv1_padding),) + stages[1:]


def _conv1_padding_of(variant: str, conv1_padding: int | None = None) -> int:
  """conv1's padding in pixels: `conv1_padding`, or the variant's own when it is None."""
  return _stages(variant, conv1_padding)[0].padding


def _pair(image_size: int | tuple[int, int]) -> tuple[int, int]:
  return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _out_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
  """Output length of a convolution or pooling window (floor, as XLA and torch do)."""
  return (size + 2 * padding - kernel) // stride + 1


def min_input_size(variant: str, conv1_padding: int | None = None) -> int:
  """Smallest image side (pixels) for which every layer of `variant` has a non-empty output.

  63 for 'paper' and 'torchvision' (conv1 padded by 2), 65 for 'd2l' (by 1), 67 unpadded.
  """
  windows = []
  for stage in _stages(variant, conv1_padding):
    windows.append((stage.kernel, stage.stride, stage.padding))
    if stage.pool:
      windows.append((_POOL_WINDOW, _POOL_STRIDE, 0))
  # Invert _out_size from a 1-pixel output back to the input.
  size = 1
  for kernel, stride, padding in reversed(windows):
    size = max(1, (size - 1) * stride + kernel - 2 * padding)
  return size


def _check_image_size(variant: str, conv1_padding: int | None, height: int, width: int) -> None:
  minimum = min_input_size(variant, conv1_padding)
  if min(height, width) < minimum:
    raise ValueError(
        f'AlexNet variant {variant!r} with conv1 padded by '
        f'{_conv1_padding_of(variant, conv1_padding)} needs images of at least '
        f'{minimum}x{minimum} pixels (smaller ones leave an empty feature map); got '
        f'{height}x{width}. Resize or crop to >= {minimum} px.')


def _feature_layers(variant: str, image_size: int | tuple[int, int], conv1_padding: int | None,
                    input_channels: int) -> list[Layer]:
  """Rows of the convolutional part, up to the map that is flattened into fc6."""
  height, width = _pair(image_size)
  _check_image_size(variant, conv1_padding, height, width)
  channels, rows = input_channels, []
  for i, stage in enumerate(_stages(variant, conv1_padding), start=1):
    height = _out_size(height, stage.kernel, stage.stride, stage.padding)
    width = _out_size(width, stage.kernel, stage.stride, stage.padding)
    fan_in = stage.kernel**2 * channels // stage.groups
    rows.append(Layer(stage.name, (height, width, stage.features),
                      params=fan_in * stage.features + stage.features,
                      macs=height * width * stage.features * fan_in))
    channels = stage.features
    if stage.lrn:
      rows.append(Layer(f'lrn{i}', (height, width, channels), 0, 0))
    if stage.pool:
      height = _out_size(height, _POOL_WINDOW, _POOL_STRIDE)
      width = _out_size(width, _POOL_WINDOW, _POOL_STRIDE)
      rows.append(Layer(f'pool{i}', (height, width, channels), 0, 0))
  if variant == 'torchvision':
    height = width = _TORCHVISION_POOL_SIZE
    rows.append(Layer('avgpool', (height, width, channels), 0, 0))
  return rows


def feature_shape(variant: str, image_size: int | tuple[int, int],
                  conv1_padding: int | None = None) -> tuple[int, int, int]:
  """(H, W, C) of the map flattened into fc6: (6, 6, 256) at 224 px ('paper', 'torchvision'),
  (5, 5, 256) for 'd2l'."""
  return _feature_layers(variant, image_size, conv1_padding, 3)[-1].shape


def layer_table(variant: str, image_size: int | tuple[int, int] = 224, num_classes: int = 1000,
                conv1_padding: int | None = None, input_channels: int = 3) -> list[Layer]:
  """Per-layer output shape, parameter count and multiply-adds, computed by hand from the shapes.

  Args:
    variant: 'paper', 'torchvision' or 'd2l'.
    image_size: side of a square image, or (height, width).
    num_classes: width of fc8.
    conv1_padding: conv1's padding; None: the variant's own (2, or 1 for 'd2l').
    input_channels: channels of the input images (3: RGB, 1: grey).

  Returns:
    One `Layer` per conv, LRN, pool and fully connected layer, in order.
  """
  rows = _feature_layers(variant, image_size, conv1_padding, input_channels)
  widths = (int(np.prod(rows[-1].shape)), _FC_WIDTH, _FC_WIDTH, num_classes)
  for name, fan_in, fan_out in zip(('fc6', 'fc7', 'fc8'), widths[:-1], widths[1:]):
    rows.append(Layer(name, (fan_out,), fan_in * fan_out + fan_out, fan_in * fan_out))
  return rows


def summary(model: 'AlexNet', image_size: int | tuple[int, int] = 224) -> str:
  """A printable table of `model` on one image: output shape, parameters, multiply-adds per layer.

  FLOPs are about 2x the multiply-adds (ReLU, LRN and pooling are not counted).
  """
  rows = layer_table(model.variant, image_size, model.num_classes, model.conv1_padding,
                     model.input_channels)
  height, width = _pair(image_size)
  padding = _conv1_padding_of(model.variant, model.conv1_padding)
  lines = [f'AlexNet ({model.variant!r}, conv1 padded by {padding}) on '
           f'{height}x{width}x{model.input_channels} images',
           f'{"layer":<8}{"output (per image)":>20}{"params":>14}{"mult-adds":>16}']
  for row in rows:
    shape = 'x'.join(map(str, row.shape))
    lines.append(f'{row.name:<8}{shape:>20}{row.params:>14,}{row.macs:>16,}')
  lines.append(f'{"total":<28}{sum(r.params for r in rows):>14,}'
               f'{sum(r.macs for r in rows):>16,}')
  return '\n'.join(lines)


def _pool_matrix(size: int, out: int) -> np.ndarray:
  """[out, size] matrix whose row i averages [floor(i size / out), ceil((i + 1) size / out))."""
  matrix = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = (i * size) // out, -(-(i + 1) * size // out)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d on channels-last input (bins may overlap, or repeat to upsample).

  Args:
    x: [N, H, W, C].
    output_size: (h, w).

  Returns:
    [N, h, w, C], x's dtype (averaged in float32).
  """
  rows = _pool_matrix(x.shape[1], output_size[0])
  cols = _pool_matrix(x.shape[2], output_size[1])
  pooled = jnp.einsum('nhwc,ih,jw->nijc', x.astype(jnp.float32), rows, cols,
                      precision=jax.lax.Precision.HIGHEST)
  return pooled.astype(x.dtype)


def _torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
  """torch's default bias of Conv2d and Linear: uniform on [-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                  -bound, bound)


def _initializers(scheme: str, layer: str, fan_in: int) -> dict[str, nn.initializers.Initializer]:
  """kernel_init and bias_init for `layer` under `scheme`; fan_in: inputs one output sees."""
  if scheme == 'xavier':
    # d2l's init_cnn: nn.init.xavier_uniform_ on every conv and linear weight (fc8 too); it
    # leaves the biases at torch's default.
    return dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=_torch_default_bias(fan_in))
  if scheme == 'he':
    if layer == 'fc8':  # No ReLU follows; small logits start the softmax near uniform.
      return dict(kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)
    # Kaiming normal (fan_in, ReLU gain); fan_in counts only the group a filter sees.
    return dict(kernel_init=nn.initializers.variance_scaling(2.0, 'fan_in', 'normal'),
                bias_init=nn.initializers.zeros)
  std = 0.005 if scheme == 'caffe' and layer in ('fc6', 'fc7') else 0.01
  # Caffe found bias 1 gave a flat loss at the start and used 0.1 (bvlc_alexnet).
  bias = {'paper': 1.0, 'caffe': 0.1}[scheme] if layer in _BIAS_ONE_LAYERS else 0.0
  return dict(kernel_init=nn.initializers.normal(std),
              bias_init=nn.initializers.constant(bias))


class AlexNet(nn.Module):
  """AlexNet classifier; see the module docstring for the variants.

  Attributes:
    num_classes: width of fc8.
    variant: 'paper', 'torchvision' or 'd2l'.
    dropout_rate: dropout probability before (torchvision) or after (paper, d2l) fc6 and fc7.
    dtype: compute dtype (e.g. jnp.bfloat16); logits are always returned in float32.
    param_dtype: dtype of the parameters.
    init_scheme: 'paper' (N(0, 0.01), bias 1 in conv2/4/5 and fc6/7), 'caffe' (bvlc_alexnet:
      fc6/7 std 0.005, those biases 0.1), 'he' (Kaiming normal, zero biases, fc8 N(0, 0.01))
      or 'xavier' (d2l: Xavier-uniform weights, torch's default U(+-1/sqrt(fan_in)) biases).
    lrn_depth_radius, lrn_bias, lrn_alpha, lrn_beta: LRN constants in TensorFlow's convention
      (paper variant only).
    conv1_padding: conv1's padding in pixels; None: the variant's own (2, 1 for 'd2l'). 0 at
      227 px is Caffe's geometry.
    input_channels: channels C of the images (3: RGB, 1: grey); conv1's kernel sees C.
    ops: the convolution and max-pool programs, the same numbers to float rounding (`OPS`):
      'xla' XLA's own (`lax.conv_general_dilated`, `nn.max_pool`: the network as written);
      'cpu' `fast_ops`' forms for XLA:CPU (split groups, routed max-pool gradient; Eigen's
      convolutions where `cpu_convolutions.XLA_FLAG` was set); 'partitionable' grouped convolutions
      that split over devices by group (`fast_ops.partitionable_conv_general_dilated`, for
      `config.parallelism='model'`), slower on one device.
  """
  num_classes: int = 1000
  variant: str = 'paper'
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Not `init`: a field of that name would hide nn.Module.init.
  init_scheme: str = 'paper'
  lrn_depth_radius: int = 2
  lrn_bias: float = 2.0
  lrn_alpha: float = 1e-4
  lrn_beta: float = 0.75
  conv1_padding: int | None = None
  input_channels: int = 3
  ops: str = 'xla'

  def __post_init__(self):
    _stages(self.variant, self.conv1_padding)  # Checks both.
    if self.init_scheme not in INIT_SCHEMES:
      raise ValueError(f'Unknown init_scheme {self.init_scheme!r}; choose one of {INIT_SCHEMES}.')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {self.dropout_rate!r}.')
    if self.ops not in OPS:
      raise ValueError(f'Unknown ops {self.ops!r}; choose one of {OPS}.')
    if not isinstance(self.input_channels, int) or self.input_channels < 1:
      raise ValueError(f'input_channels must be a positive int, got {self.input_channels!r}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """Maps images [N, H, W, input_channels] (H, W >= min_input_size) to float32 logits
    [N, num_classes].

    With train=True, dropout draws from the 'dropout' rng collection.
    """
    if images.ndim != 4:
      raise ValueError(f'AlexNet expects NHWC images [N, H, W, C], got shape {images.shape}.')
    if images.shape[-1] != self.input_channels:
      raise ValueError(f'AlexNet with input_channels={self.input_channels} got images of '
                       f'{images.shape[-1]} channels (shape {images.shape}).')
    _check_image_size(self.variant, self.conv1_padding, images.shape[1], images.shape[2])
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    dropout = functools.partial(nn.Dropout, self.dropout_rate, deterministic=not train)
    dropout_before_fc = self.variant == 'torchvision'
    conv_general_dilated, max_pool = _OPS[self.ops]

    x = images
    for stage in _stages(self.variant, self.conv1_padding):
      fan_in = stage.kernel**2 * x.shape[-1] // stage.groups
      x = nn.Conv(stage.features, (stage.kernel, stage.kernel), strides=stage.stride,
                  padding=[(stage.padding, stage.padding)] * 2,
                  feature_group_count=stage.groups, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=stage.name,
                  conv_general_dilated=conv_general_dilated,
                  **_initializers(self.init_scheme, stage.name, fan_in))(x)
      x = nn.relu(x)
      if stage.lrn:
        x = lrn.LocalResponseNorm(depth_radius=self.lrn_depth_radius, bias=self.lrn_bias,
                                  alpha=self.lrn_alpha, beta=self.lrn_beta)(x)
      if stage.pool:
        x = max_pool(x, _POOL_WINDOW, _POOL_STRIDE)
    if self.variant == 'torchvision':
      x = adaptive_avg_pool(x, (_TORCHVISION_POOL_SIZE,) * 2)
    x = x.reshape((x.shape[0], -1))  # (h, w, c) order; convert.py permutes torch's fc6.

    for name in ('fc6', 'fc7'):
      if dropout_before_fc:
        x = dropout()(x)
      x = nn.relu(dense(_FC_WIDTH, name=name,
                        **_initializers(self.init_scheme, name, x.shape[-1]))(x))
      if not dropout_before_fc:
        x = dropout()(x)
    x = dense(self.num_classes, name='fc8',
              **_initializers(self.init_scheme, 'fc8', x.shape[-1]))(x)
    return x.astype(jnp.float32)
