"""Times LRN forward + backward: this project's op, JAX autodiff of the formula, and PyTorch.

Each step computes y = LRN(x) and dL/dx for a random cotangent, on conv1-sized
[B, 55, 55, 96] and conv2-sized [B, 27, 27, 256] float32 ReLU activations with the paper's
constants. First all contenders are checked against torch on a small batch (one process);
then JAX and PyTorch are timed in fresh processes of their own (`--pairs` each, alternating A B,
B A, ...; the PyTorch ones never import JAX). Inside a JAX process its three contenders run
interleaved after a warm-up, so that load on a shared machine hits them alike. The script
prints, per contender, the median over processes of each process's median round, and ratios.

    python -m benchmarks.lrn --batch=32 --rounds=10  # from the repository root

Contenders:
  custom_vjp          alexnet_jax.lrn.local_response_norm (hand-written VJP), jitted.
  autodiff_slices     jax.vjp of x / (k + alpha * window_sum(x^2)) ** beta, the window sum as
                      2r + 1 shifted slices of a padded array (the op's own forward), jitted.
  autodiff_reduce_win the same formula with lax.reduce_window for the window sum, jitted.
  torch               torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2) on NCHW.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from benchmarks import timing

RADIUS, BIAS, ALPHA, BETA = 2, 2.0, 1e-4, 0.75


def slices_window_sum(v):
  """[..., C] -> [..., C]: sums over channel windows of 2r + 1 via shifted slices."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top (PyTorch's processes: no JAX)
  channels = v.shape[-1]
  padded = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(RADIUS, RADIUS)])
  return sum(padded[..., i:i + channels] for i in range(2 * RADIUS + 1))


def reduce_window_sum(v):
  """[..., C] -> [..., C]: the same window sum as one lax.reduce_window."""
  import jax  # pylint: disable=g-import-not-at-top
  ones = (1,) * (v.ndim - 1)
  return jax.lax.reduce_window(v, 0.0, jax.lax.add, ones + (2 * RADIUS + 1,), ones + (1,),
                               [(0, 0)] * (v.ndim - 1) + [(RADIUS, RADIUS)])


def plain_lrn(window_sum):
  return lambda x: x / (BIAS + ALPHA * window_sum(x * x)) ** BETA


def custom_lrn(x):
  from alexnet_jax import lrn  # pylint: disable=g-import-not-at-top
  return lrn.local_response_norm(x, depth_radius=RADIUS, bias=BIAS, alpha=ALPHA, beta=BETA)


# The JAX contenders: x [N, H, W, C] -> LRN(x).
JAX_CONTENDERS = {'custom_vjp': custom_lrn, 'autodiff_slices': plain_lrn(slices_window_sum),
                  'autodiff_reduce_win': plain_lrn(reduce_window_sum)}


def jax_step(fn):
  """Jitted (x, g) -> (y, dL/dx) with L = sum(y * g)."""
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def step(x, g):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(g)[0]

  return step


def residual_mib(fn, shape):
  """MiB of arrays that jax.vjp keeps alive for the backward pass (shapes only, no compute)."""
  import jax  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct(shape, np.float32)
  vjp_shapes = jax.eval_shape(lambda v: jax.vjp(fn, v)[1], x)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp_shapes)) / 2**20


def torch_step(x, g):
  """(x, g) NCHW tensors -> a no-argument closure computing y and dL/dx with torch autograd."""
  import torch  # pylint: disable=g-import-not-at-top
  layer = torch.nn.LocalResponseNorm(2 * RADIUS + 1, alpha=ALPHA * (2 * RADIUS + 1), beta=BETA,
                                     k=BIAS)
  x = x.requires_grad_(True)

  def step():
    x.grad = None
    y = layer(x)
    y.backward(g)
    return y, x.grad

  return step


def inputs(shape):
  """ReLU'd Gaussian activations (scale 60, as after conv1) and a cotangent, NHWC float32."""
  rng = np.random.default_rng(0)
  x = np.maximum(rng.normal(scale=60.0, size=shape), 0.0).astype(np.float32)
  return x, rng.normal(size=shape).astype(np.float32)


def steps_of(framework: str, shape) -> dict:
  """name -> a no-argument step that computes y and dL/dx and waits for them."""
  x, g = inputs(shape)
  if framework == 'torch':
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())  # XLA's CPU pool uses every core too.
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    return {'torch': torch_step(nchw(x), nchw(g))}
  import jax  # pylint: disable=g-import-not-at-top
  x, g = jax.device_put(x), jax.device_put(g)
  return {name: (lambda s=jax_step(fn): jax.block_until_ready(s(x, g)))
          for name, fn in JAX_CONTENDERS.items()}


def check_agreement(shape) -> None:
  """Raises if a JAX contender's y or dL/dx differs from torch's by more than 1e-5 (relative)."""
  y_ref, dx_ref = (t.detach().numpy().transpose(0, 2, 3, 1)
                   for t in steps_of('torch', shape)['torch']())
  for name, step in steps_of('jax', shape).items():
    y, dx = step()
    y_err = np.abs(np.asarray(y) - y_ref).max() / np.abs(y_ref).max()
    dx_err = np.abs(np.asarray(dx) - dx_ref).max() / np.abs(dx_ref).max()
    if max(y_err, dx_err) > 1e-5:
      raise RuntimeError(f'{name} disagrees with torch: rel. error y {y_err:.1e}, dx {dx_err:.1e}')


def time_framework(framework: str, shapes, rounds: int, warmup: int) -> dict:
  """{shape as text: {contender: median ms}} of one framework's contenders, in this process."""
  medians = {}
  for shape in shapes:
    steps = steps_of(framework, shape)
    for _ in range(warmup):  # Compiles.
      for step in steps.values():
        step()
    runners = {name: (lambda n, s=step: [s() for _ in range(n)]) for name, step in steps.items()}
    medians[str(list(shape))] = {name: 1e3 * statistics.median(t) for name, t in
                                 timing.time_interleaved(runners, rounds, 1).items()}
  return medians


def report(shapes, results: dict, rounds: int, warmup: int, pairs: int) -> None:
  """Prints, per shape, each contender's median over processes and its ratio to custom_vjp."""
  for shape in shapes:
    key = str(list(shape))
    medians = {name: statistics.median(r[key][name] for r in results[framework])
               for framework in results for name in results[framework][0][key]}
    print(f'\nshape {list(shape)} (NHWC; torch NCHW), median over {pairs} fresh processes per '
          f'framework of {rounds} rounds after {warmup} warm-up')
    print(f'  {"contender":<22}{"median ms":>10}{"vs custom_vjp":>15}{"residual MiB":>14}')
    for name, ms in medians.items():
      mib = (f'{residual_mib(JAX_CONTENDERS[name], shape):.0f}' if name in JAX_CONTENDERS
             else '-')
      print(f'  {name:<22}{ms:>10.1f}{ms / medians["custom_vjp"]:>14.2f}x{mib:>14}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32,
                      help='batch size (the paper: 128; 32 keeps a 2-core run near a minute)')
  parser.add_argument('--rounds', type=int, default=10, help='timed rounds per contender')
  parser.add_argument('--warmup', type=int, default=2, help='untimed rounds (compiles first)')
  parser.add_argument('--pairs', type=int, default=2, help='fresh processes per framework')
  parser.add_argument('--child', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if min(args.batch, args.rounds, args.pairs) < 1 or args.warmup < 0:
    parser.error('--batch, --rounds and --pairs must be >= 1 and --warmup >= 0')
  shapes = [(args.batch, spatial, spatial, channels) for spatial, channels in ((55, 96),
                                                                               (27, 256))]
  if args.child:
    timing.print_result(time_framework(args.child, shapes, args.rounds, args.warmup))
    return

  print(f'machine: {platform.machine()} {timing.cpu_name()}, {platform.system()} '
        f'{platform.release()}; python {platform.python_version()}, {timing.versions()}, '
        f'numpy {np.__version__}; {time.strftime("%Y-%m-%d %H:%M")}, 1-min load '
        f'{os.getloadavg()[0]:.1f}')
  for shape in shapes:
    check_agreement((2,) + shape[1:])
  argv = [a for a in sys.argv[1:] if not a.startswith('--child')]
  results = timing.run_alternating(
      {f: ['-m', 'benchmarks.lrn', *argv, f'--child={f}'] for f in ('jax', 'torch')}, args.pairs,
      lambda name, r: json.dumps({k: {n: round(ms, 1) for n, ms in v.items()}
                                  for k, v in r.items()}))
  report(shapes, results, args.rounds, args.warmup, args.pairs)


if __name__ == '__main__':
  main()
