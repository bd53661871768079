r"""Per-layer profile of the train step: each conv and pool, forward + backward, three ways.

For every convolution and max-pool of the chosen variant at its shapes (batch, image size),
times the forward and the gradients a train step needs (weights, and the input except for
conv1) with XLA's own ops (`lax.conv_general_dilated` with `feature_group_count`, `nn.max_pool`),
with this project's `fast_ops` (what the model uses), and with PyTorch (`F.conv2d` with groups,
`F.max_pool2d`), and prints the medians as a Markdown table. This is where the CPU step's time
goes; docs/benchmarks.md quotes it.

    python -m benchmarks.layers --variant=paper --batch=64 --image_size=224

JAX and PyTorch run in fresh processes of their own (`--pairs` each, alternating; PyTorch's
never imports JAX); inside the JAX ones XLA's ops and fast_ops alternate round by round within
each layer, both with XLA:CPU's Eigen convolutions (as the commands run them; `--convolutions=
ynnpack`: XLA's default kernels). Each layer's figure is the median over processes of each
process's median round.
"""

import json
import os
import statistics
import sys
import time
from collections.abc import Callable

from absl import app
from absl import flags
import numpy as np

from benchmarks import timing

# models.VARIANTS, written out: the PyTorch children must not import the JAX model code.
_VARIANT = flags.DEFINE_enum('variant', 'paper', ('paper', 'torchvision', 'd2l'),
                             'AlexNet variant.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Image side in pixels.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds per implementation and process.')
_PAIRS = flags.DEFINE_integer('pairs', 2, 'Fresh processes per framework, alternating.')
_CHILD = flags.DEFINE_enum('child', None, ('jax', 'torch'),
                           'Internal: time one framework in this process and print the result.')
_LAYERS = flags.DEFINE_string('layers', None, 'Internal: the layers to time, as JSON.')
_CONVOLUTIONS = flags.DEFINE_enum(
    'convolutions', 'eigen', ('eigen', 'ynnpack'),
    "XLA:CPU's convolution kernels in the JAX processes, both columns: eigen "
    "(cpu_convolutions.XLA_FLAG, what the commands set) or ynnpack (XLA's default).")

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Per framework, the implementations it times.
_IMPLEMENTATIONS = {'jax': ('lax', 'fast_ops'), 'torch': ('torch',)}

def layer_list(variant: str, batch: int, image_size: int) -> list[dict]:
  """Every conv and max-pool of `variant`: name, input shape NHWC, and a conv's geometry."""
  from alexnet_jax import models  # pylint: disable=g-import-not-at-top (children get JSON)
  layers, channels, size = [], 3, image_size
  for i, stage in enumerate(models._STAGES[variant]):  # pylint: disable=protected-access
    layers.append({'name': stage.name, 'shape': (batch, size, size, channels),
                   'kernel': stage.kernel, 'stride': stage.stride, 'padding': stage.padding,
                   'groups': stage.groups, 'features': stage.features,
                   'input_grad': i > 0})  # conv1's input needs no gradient.
    size = (size + 2 * stage.padding - stage.kernel) // stage.stride + 1
    channels = stage.features
    if stage.pool:
      layers.append({'name': f'pool{i + 1}', 'shape': (batch, size, size, channels)})
      size = (size - 3) // 2 + 1
  return layers


def _inputs(layer: dict) -> tuple[np.ndarray, np.ndarray | None]:
  """Random input [N, H, W, C] (ReLU'd for a pool) and HWIO kernel (None for a pool)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(layer['shape'], np.float32)
  if 'kernel' not in layer:
    return np.maximum(x, 0), None
  k = layer['kernel']
  w = 0.01 * rng.standard_normal((k, k, layer['shape'][-1] // layer['groups'],
                                  layer['features']), np.float32)
  return x, w


def jax_runners(layer: dict, x, w) -> dict[str, Callable[[int], None]]:
  """XLA's op and fast_ops' for one layer: forward + the gradients a train step needs."""
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax import lax
  from alexnet_jax import fast_ops
  # pylint: enable=g-import-not-at-top

  def block(fn, *args):
    def run(n: int) -> None:
      for _ in range(n):
        jax.block_until_ready(fn(*args))
    return run

  if w is None:
    pools = {'lax': lambda v: nn.max_pool(v, (3, 3), (2, 2), 'VALID'),
             'fast_ops': lambda v: fast_ops.max_pool(v, 3, 2)}
    return {name: block(jax.jit(jax.grad(lambda v, p=pool: jnp.sum(p(v) ** 2))), x)
            for name, pool in pools.items()}

  def conv_grad(conv):
    def loss(x, w):
      y = conv(x, w, (layer['stride'],) * 2, [(layer['padding'],) * 2] * 2,
               dimension_numbers=_NHWC, feature_group_count=layer['groups'])
      return jnp.sum(y * y)
    return jax.jit(jax.grad(loss, argnums=(1, 0) if layer['input_grad'] else 1))
  return {'lax': block(conv_grad(lax.conv_general_dilated), x, w),
          'fast_ops': block(conv_grad(fast_ops.conv_general_dilated), x, w)}


def torch_runners(layer: dict, x, w) -> dict[str, Callable[[int], None]]:
  """PyTorch's `F.conv2d` (with groups) or `F.max_pool2d`, forward + backward."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())  # XLA's CPU pool uses every core too.
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(
      layer.get('input_grad', True))
  if w is None:
    def run(n: int) -> None:
      for _ in range(n):
        (torch.nn.functional.max_pool2d(tx, 3, 2) ** 2).sum().backward()
    return {'torch': run}
  tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True)

  def run(n: int) -> None:
    for _ in range(n):
      y = torch.nn.functional.conv2d(tx, tw, stride=layer['stride'], padding=layer['padding'],
                                     groups=layer['groups'])
      (y * y).sum().backward()
  return {'torch': run}


def profile(framework: str, layers: list[dict], rounds: int) -> dict[str, dict[str, float]]:
  """{layer: {implementation: median seconds}} of one framework's implementations."""
  make = jax_runners if framework == 'jax' else torch_runners
  result = {}
  for layer in layers:
    runners = make(layer, *_inputs(layer))
    for run in runners.values():
      run(1)  # Compiles.
    result[layer['name']] = {impl: statistics.median(seconds) for impl, seconds in
                    timing.time_interleaved(runners, rounds, 1).items()}
  return result


def main(argv):
  del argv
  if _CHILD.value:
    if _CHILD.value == 'jax':
      from alexnet_jax import cpu_convolutions  # pylint: disable=g-import-not-at-top
      # Before JAX starts (importing alexnet_jax alone would take Eigen's either way).
      cpu_convolutions.choose_convolutions('auto' if _CONVOLUTIONS.value == 'eigen' else 'xla')
    timing.print_result(profile(_CHILD.value, json.loads(_LAYERS.value), _ROUNDS.value))
    return
  if 'xla_cpu_experimental_ynn_fusion_type' in os.environ.get('XLA_FLAGS', ''):
    raise app.UsageError('XLA_FLAGS already chooses YNNPACK fusions; --convolutions does that '
                         'here: unset that flag.')
  load_before = os.getloadavg()[0]
  layers_json = json.dumps(layer_list(_VARIANT.value, _BATCH.value, _IMAGE_SIZE.value))
  commands = {f: ['-m', 'benchmarks.layers', *sys.argv[1:], f'--child={f}',
                  f'--layers={layers_json}'] for f in _IMPLEMENTATIONS}
  results = timing.run_alternating(
      commands, _PAIRS.value,
      lambda name, r: f'{sum(sum(t.values()) for t in r.values()):.1f} s in all')
  layers = list(results['jax'][0])
  median = {(layer, impl): statistics.median(r[layer][impl] for r in results[framework])
            for framework, impls in _IMPLEMENTATIONS.items() for impl in impls
            for layer in layers}
  print(f'{_VARIANT.value}, batch {_BATCH.value}, {_IMAGE_SIZE.value} px, forward + backward, '
        f'JAX convolutions in {_CONVOLUTIONS.value}, ms: median over {_PAIRS.value} fresh '
        f'processes per framework of each one\'s median of {_ROUNDS.value} rounds; '
        f'{timing.cpu_name()}; {timing.versions()}; '
        f'{time.strftime("%Y-%m-%d %H:%M")}, 1-min load {load_before:.1f} before, '
        f'{os.getloadavg()[0]:.1f} after')
  print('| layer | XLA ops | fast_ops | PyTorch | fast_ops/PyTorch time |')
  print('|---|---|---|---|---|')
  impls = [impl for names in _IMPLEMENTATIONS.values() for impl in names]
  rows = [(layer, {impl: median[layer, impl] for impl in impls}) for layer in layers]
  rows.append(('total', {impl: sum(t[impl] for _, t in rows) for impl in impls}))
  for name, t in rows:
    print(f"| {name} | {t['lax'] * 1e3:.0f} | {t['fast_ops'] * 1e3:.0f} | "
          f"{t['torch'] * 1e3:.0f} | {t['fast_ops'] / t['torch']:.2f} |")


if __name__ == '__main__':
  app.run(main)
