r"""Per-layer profile of the train step: each conv and pool, forward + backward, three ways.

For every convolution and max-pool of the chosen variant at its shapes (batch, image size),
times the forward and the gradients a train step needs (weights, and the input except for
conv1) with XLA's own ops (`lax.conv_general_dilated` with `feature_group_count`, `nn.max_pool`),
with this project's `fast_ops` (what the model uses), and with PyTorch (`F.conv2d` with groups,
`F.max_pool2d`), interleaved, and prints the medians as a Markdown table. This is where the CPU
step's time goes; docs/benchmarks.md quotes it.

    python -m benchmarks.layers --variant=paper --batch=64 --image_size=224
"""

import statistics
from collections.abc import Callable

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import torch

from alexnet_jax import fast_ops
from alexnet_jax import models
from benchmarks.timing import time_interleaved

_VARIANT = flags.DEFINE_enum('variant', 'paper', models.VARIANTS, 'AlexNet variant.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Image side in pixels.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds per implementation.')

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _jax_conv(conv, stage, needs_input_grad: bool) -> Callable[..., jax.Array]:
  """jitted fwd + bwd of one conv: returns (dW, dX) or dW for the first layer."""
  def loss(x, w):
    y = conv(x, w, (stage.stride,) * 2, [(stage.padding,) * 2] * 2, dimension_numbers=_NHWC,
             feature_group_count=stage.groups)
    return jnp.sum(y * y)
  return jax.jit(jax.grad(loss, argnums=(1, 0) if needs_input_grad else 1))


def _torch_conv(stage, x, w, needs_input_grad: bool) -> Callable[[int], None]:
  tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(
      needs_input_grad)
  tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).requires_grad_(True)
  def run(n: int) -> None:
    for _ in range(n):
      y = torch.nn.functional.conv2d(tx, tw, stride=stage.stride, padding=stage.padding,
                                     groups=stage.groups)
      (y * y).sum().backward()
  return run


def _jax_pool(pool) -> Callable[..., jax.Array]:
  return jax.jit(jax.grad(lambda x: jnp.sum(pool(x) ** 2)))


def _torch_pool(x) -> Callable[[int], None]:
  tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  def run(n: int) -> None:
    for _ in range(n):
      (torch.nn.functional.max_pool2d(tx, 3, 2) ** 2).sum().backward()
  return run


def _time(runners: dict[str, Callable[[int], None]], rounds: int) -> dict[str, float]:
  """Median seconds per call of each runner, warmed up once, timed in alternating order."""
  for run in runners.values():
    run(1)
  return {name: statistics.median(seconds)
          for name, seconds in time_interleaved(runners, rounds, 1).items()}


def _block(fn, *args) -> Callable[[int], None]:
  def run(n: int) -> None:
    for _ in range(n):
      jax.block_until_ready(fn(*args))
  return run


def profile(variant: str, batch: int, image_size: int, rounds: int) -> list[tuple[str, dict]]:
  """[(layer name, {'lax': s, 'fast_ops': s, 'torch': s})] for every conv and pool."""
  rows = []
  key = jax.random.PRNGKey(0)
  channels, size = 3, image_size
  stages = models._STAGES[variant]  # pylint: disable=protected-access
  for i, stage in enumerate(stages):
    x = jax.random.normal(key, (batch, size, size, channels))
    w = jax.random.normal(key, (stage.kernel, stage.kernel, channels // stage.groups,
                                stage.features)) * 0.01
    needs_input_grad = i > 0
    runners = {
        'lax': _block(_jax_conv(lax.conv_general_dilated, stage, needs_input_grad), x, w),
        'fast_ops': _block(_jax_conv(fast_ops.conv_general_dilated, stage, needs_input_grad),
                           x, w),
        'torch': _torch_conv(stage, x, w, needs_input_grad)}
    rows.append((stage.name, _time(runners, rounds)))
    size = (size + 2 * stage.padding - stage.kernel) // stage.stride + 1
    channels = stage.features
    if stage.pool:
      x = jax.nn.relu(jax.random.normal(key, (batch, size, size, channels)))
      runners = {
          'lax': _block(_jax_pool(lambda v: nn.max_pool(v, (3, 3), (2, 2), 'VALID')), x),
          'fast_ops': _block(_jax_pool(lambda v: fast_ops.max_pool(v, 3, 2)), x),
          'torch': _torch_pool(x)}
      rows.append((f'pool{i + 1}', _time(runners, rounds)))
      size = (size - 3) // 2 + 1
  return rows


def main(argv):
  del argv
  rows = profile(_VARIANT.value, _BATCH.value, _IMAGE_SIZE.value, _ROUNDS.value)
  print(f'{_VARIANT.value}, batch {_BATCH.value}, {_IMAGE_SIZE.value} px, forward + backward, '
        f'median ms of {_ROUNDS.value} rounds (jax {jax.__version__}, torch {torch.__version__})')
  print('| layer | XLA ops | fast_ops | PyTorch | fast_ops/PyTorch time |')
  print('|---|---|---|---|---|')
  totals = dict.fromkeys(('lax', 'fast_ops', 'torch'), 0.0)
  for name, t in rows:
    for k in totals:
      totals[k] += t[k]
    print(f"| {name} | {t['lax'] * 1e3:.0f} | {t['fast_ops'] * 1e3:.0f} | "
          f"{t['torch'] * 1e3:.0f} | {t['fast_ops'] / t['torch']:.2f} |")
  print(f"| total | {totals['lax'] * 1e3:.0f} | {totals['fast_ops'] * 1e3:.0f} | "
        f"{totals['torch'] * 1e3:.0f} | {totals['fast_ops'] / totals['torch']:.2f} |")


if __name__ == '__main__':
  app.run(main)
