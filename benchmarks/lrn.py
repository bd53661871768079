"""Times LRN forward + backward: this project's op, JAX autodiff of the formula, and PyTorch.

Each step computes y = LRN(x) and dL/dx for a random cotangent, on conv1-sized
[B, 55, 55, 96] and conv2-sized [B, 27, 27, 256] float32 ReLU activations with the paper's
constants. Contenders run interleaved (A B C D A B C D ...) after a warm-up so that load on a
shared machine hits them alike; the script prints medians and ratios.

    python -m benchmarks.lrn --batch=32 --rounds=10  # from the repository root

Contenders:
  custom_vjp          alexnet_jax.lrn.local_response_norm (hand-written VJP), jitted.
  autodiff_slices     jax.vjp of x / (k + alpha * window_sum(x^2)) ** beta, the window sum as
                      2r + 1 shifted slices of a padded array (the op's own forward), jitted.
  autodiff_reduce_win the same formula with lax.reduce_window for the window sum, jitted.
  torch               torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2) on NCHW.
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from alexnet_jax import lrn

RADIUS, BIAS, ALPHA, BETA = 2, 2.0, 1e-4, 0.75


def slices_window_sum(v):
  """[..., C] -> [..., C]: sums over channel windows of 2r + 1 via shifted slices."""
  channels = v.shape[-1]
  padded = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(RADIUS, RADIUS)])
  return sum(padded[..., i:i + channels] for i in range(2 * RADIUS + 1))


def reduce_window_sum(v):
  """[..., C] -> [..., C]: the same window sum as one lax.reduce_window."""
  ones = (1,) * (v.ndim - 1)
  return jax.lax.reduce_window(v, 0.0, jax.lax.add, ones + (2 * RADIUS + 1,), ones + (1,),
                               [(0, 0)] * (v.ndim - 1) + [(RADIUS, RADIUS)])


def plain_lrn(window_sum):
  return lambda x: x / (BIAS + ALPHA * window_sum(jnp.square(x))) ** BETA


def custom_lrn(x):
  return lrn.local_response_norm(x, depth_radius=RADIUS, bias=BIAS, alpha=ALPHA, beta=BETA)


def jax_step(fn):
  """Jitted (x, g) -> (y, dL/dx) with L = sum(y * g)."""

  @jax.jit
  def step(x, g):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(g)[0]

  return step


def residual_mib(fn, x):
  """MiB of arrays that jax.vjp keeps alive for the backward pass (shapes only, no compute)."""
  vjp_shapes = jax.eval_shape(lambda v: jax.vjp(fn, v)[1], x)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp_shapes)) / 2**20


def torch_step(x, g):
  """(x, g) NCHW tensors -> a no-argument closure computing y and dL/dx with torch autograd."""
  layer = torch.nn.LocalResponseNorm(2 * RADIUS + 1, alpha=ALPHA * (2 * RADIUS + 1), beta=BETA,
                                     k=BIAS)
  x = x.requires_grad_(True)

  def step():
    x.grad = None
    y = layer(x)
    y.backward(g)
    return y, x.grad

  return step


def time_interleaved(steps, rounds, warmup):
  """Runs each step once per round in turn; returns {name: [seconds per round]}."""
  times = {name: [] for name in steps}
  for round_index in range(warmup + rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      if round_index >= warmup:
        times[name].append(time.perf_counter() - start)
  return times


def benchmark_shape(shape, rounds, warmup):
  """Times all contenders on one NHWC shape and prints medians and ratios."""
  rng = np.random.default_rng(0)
  x_np = np.maximum(rng.normal(scale=60.0, size=shape), 0.0).astype(np.float32)
  g_np = rng.normal(size=shape).astype(np.float32)
  x, g = jnp.asarray(x_np), jnp.asarray(g_np)
  x_torch = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
  g_torch = torch.from_numpy(np.ascontiguousarray(g_np.transpose(0, 3, 1, 2)))

  fns = {'custom_vjp': custom_lrn, 'autodiff_slices': plain_lrn(slices_window_sum),
         'autodiff_reduce_win': plain_lrn(reduce_window_sum)}
  jax_steps = {name: jax_step(fn) for name, fn in fns.items()}
  steps = {name: (lambda s=s: jax.block_until_ready(s(x, g))) for name, s in jax_steps.items()}
  steps['torch'] = torch_step(x_torch, g_torch)

  # All contenders must compute the same thing before their times mean anything.
  y_ref, dx_ref = (t.detach().numpy().transpose(0, 2, 3, 1) for t in steps['torch']())
  for name, step in jax_steps.items():
    y, dx = step(x, g)
    y_err = np.abs(np.asarray(y) - y_ref).max() / np.abs(y_ref).max()
    dx_err = np.abs(np.asarray(dx) - dx_ref).max() / np.abs(dx_ref).max()
    if max(y_err, dx_err) > 1e-5:
      raise RuntimeError(f'{name} disagrees with torch: rel. error y {y_err:.1e}, dx {dx_err:.1e}')

  medians = {name: 1e3 * statistics.median(t)
             for name, t in time_interleaved(steps, rounds, warmup).items()}
  print(f'\nshape {list(shape)} (NHWC; torch NCHW), {rounds} rounds after {warmup} warm-up')
  print(f'  {"contender":<22}{"median ms":>10}{"vs custom_vjp":>15}{"residual MiB":>14}')
  for name, ms in medians.items():
    mib = f'{residual_mib(fns[name], x):.0f}' if name in fns else '-'
    print(f'  {name:<22}{ms:>10.1f}{ms / medians["custom_vjp"]:>14.2f}x{mib:>14}')


def cpu_name():
  """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often empty)."""
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown CPU'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32,
                      help='batch size (the paper: 128; 32 keeps a 2-core run near a minute)')
  parser.add_argument('--rounds', type=int, default=10, help='timed rounds per contender')
  parser.add_argument('--warmup', type=int, default=2, help='untimed rounds (compiles first)')
  args = parser.parse_args()
  if min(args.batch, args.rounds) < 1 or args.warmup < 0:
    parser.error('--batch and --rounds must be >= 1 and --warmup >= 0')

  print(f'machine: {platform.machine()} {cpu_name()}, {os.cpu_count()} CPUs, '
        f'{platform.system()} {platform.release()}')
  print(f'python {platform.python_version()}, jax {jax.__version__} '
        f'({jax.default_backend()}, {jax.device_count()} devices), numpy {np.__version__}, '
        f'torch {torch.__version__} ({torch.get_num_threads()} threads)')
  for spatial, channels in ((55, 96), (27, 256)):
    benchmark_shape((args.batch, spatial, spatial, channels), args.rounds, args.warmup)


if __name__ == '__main__':
  main()
