"""Convolution and max-pool gradients in forms that XLA compiles well on CPU.

Same numbers as `lax.conv_general_dilated` and `nn.max_pool` (tests/test_fast_ops.py checks
values and gradients against both and against PyTorch), different programs. On a 2-core CPU
(jax 0.10.2, batch 64, 224 px) we measured:
  - grouped convolution (`feature_group_count=2`): 5-9x slower than two convolutions on the
    halves, forward and backward (conv2 fwd+bwd 8.0 s grouped vs 4.2 s split);
  - the weight gradient, which XLA emits as one convolution whose "kernel" is the whole
    output gradient: 4-5x slower than one matrix product per kernel row over contiguous
    windows of the input (alone, batch 64: a conv2 half 1.59 s vs 0.23 s; conv1, stride 4,
    0.81 s vs 0.38 s after space-to-depth);
  - max-pool backward (select-and-scatter): 25x the forward (pool1 470 ms vs 18 ms).
So for CPU we split groups, take weight gradients as matrix products and route the max-pool
gradient with comparisons and strided pads. The model uses these only with
`config.model.ops='cpu'` ('auto' on a CPU backend, `train.create_model`); elsewhere it keeps
XLA's own ops, which cuDNN serves well (docs/benchmarks_gpu.md), and never traces these.

`partitionable_conv_general_dilated` is the form for model parallelism (the paper's two GPUs,
`config.parallelism='model'`): XLA's SPMD partitioner (Shardy or GSPMD, jax 0.10.2) all-gathers
the input and the kernel of a `feature_group_count` convolution whose channels are split over
devices, and the split-groups form above reshuffles the halves with all-to-alls; folding the
groups into the batch (`batch_group_count`) lets every device convolve its own group alone.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated` with the CPU-friendly forms above (a drop-in for `nn.Conv`).

  Only NHWC/HWIO convolutions without dilation and with explicit padding take the fast path;
  anything else is passed to lax unchanged.

  Args:
    lhs: [N, H, W, C_in] images.
    rhs: [kh, kw, C_in / groups, C_out] kernel.
    window_strides, padding, ...: as `lax.conv_general_dilated`.

  Returns:
    [N, H', W', C_out].
  """
  if not _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, kwargs):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kwargs)
  return _grouped_conv(lhs, rhs, strides=tuple(window_strides),
                       padding=tuple(tuple(p) for p in padding), groups=feature_group_count,
                       precision=precision)


def _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                kwargs) -> bool:
  """Whether a convolution is NHWC/HWIO, undilated, explicitly padded, with no other options."""
  undilated = all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
  # Compared in lax's canonical form: nn.Conv passes ConvDimensionNumbers, not strings, and
  # lax's default (None) is NCHW. Only NHWC/HWIO is handled.
  nhwc = (dimension_numbers is not None and lhs.ndim == 4 and
          lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) ==
          lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  return nhwc and not kwargs and undilated and not isinstance(padding, str)


def partitionable_conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                                       window_strides: Sequence[int], padding,
                                       lhs_dilation=None, rhs_dilation=None,
                                       dimension_numbers=None, feature_group_count: int = 1,
                                       precision=None, **kwargs) -> jax.Array:
  """`conv_general_dilated` whose grouped convolutions split over devices by group.

  With the channels of `lhs` and the output features of `rhs` split over a mesh axis into as
  many parts as there are groups (or a multiple), each device convolves its groups with no
  communication, forward and backward. Stride-1 NHWC grouped convolutions (the paper's conv2,
  conv4, conv5) take that form; every other one is lax's own: the CPU weight gradient above
  loops over kernel rows, and the partitioner gathered conv3's input again in every iteration.

  Args, Returns: as `conv_general_dilated`.
  """
  if (feature_group_count == 1 or tuple(window_strides) != (1, 1) or
      not _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                      kwargs)):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers,
                                    feature_group_count=feature_group_count,
                                    precision=precision, **kwargs)
  return _batch_grouped_conv(lhs, rhs, tuple(tuple(p) for p in padding), feature_group_count,
                             precision)


def _groups_into_batch(x: jax.Array, groups: int) -> jax.Array:
  """[N, H, W, G * C] -> [G * N, H, W, C]: group g's channels become batch rows [g N, (g + 1) N)."""
  n, h, w, c = x.shape
  return (x.reshape(n, h, w, groups, c // groups).transpose(3, 0, 1, 2, 4)
          .reshape(groups * n, h, w, c // groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _batch_grouped_conv(x, w, padding, groups, precision):
  """A stride-1 grouped convolution as `batch_group_count`: output group g sees batch group g.

  Args:
    x: [N, H, W, C_in]; w: [kh, kw, C_in / G, C_out] (HWIO, as for `feature_group_count=G`).
  Returns:
    [N, H', W', C_out], output features g * C_out / G ... from input channels g * C_in / G ...
  """
  return lax.conv_general_dilated(_groups_into_batch(x, groups), w, (1, 1), padding,
                                  dimension_numbers=_NHWC, batch_group_count=groups,
                                  precision=precision)


def _batch_grouped_conv_fwd(x, w, padding, groups, precision):
  return _batch_grouped_conv(x, w, padding, groups, precision), (x, w)


def _batch_grouped_conv_bwd(padding, groups, precision, residuals, g):
  """dL/dx as a batch-grouped convolution of g with each group's flipped, transposed kernel;
  dL/dw as lax's own weight gradient of the grouped convolution (it partitions by group)."""
  x, w = residuals
  kh, kw, c, o = w.shape
  w_t = (w.reshape(kh, kw, c, groups, o // groups)[::-1, ::-1].transpose(0, 1, 4, 3, 2)
         .reshape(kh, kw, o // groups, groups * c))
  full_padding = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding)]
  grad_x = lax.conv_general_dilated(_groups_into_batch(g, groups), w_t, (1, 1), full_padding,
                                    dimension_numbers=_NHWC, batch_group_count=groups,
                                    precision=precision)
  _, vjp = jax.vjp(lambda w: lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=_NHWC, feature_group_count=groups,
      precision=precision), w)
  grad_w, = vjp(g)
  return grad_x, grad_w


_batch_grouped_conv.defvjp(_batch_grouped_conv_fwd, _batch_grouped_conv_bwd)


def _grouped_conv(x: jax.Array, w: jax.Array, *, strides, padding, groups, precision):
  """One convolution per group, concatenated along channels (the paper's two GPUs)."""
  xs = jnp.split(x, groups, axis=-1)
  ws = jnp.split(w, groups, axis=-1)
  return jnp.concatenate(
      [_conv(a, b, strides, padding, precision) for a, b in zip(xs, ws)], axis=-1)


def _lax_nhwc_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


_conv = jax.custom_vjp(_lax_nhwc_conv, nondiff_argnums=(2, 3, 4))


def _conv_fwd(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, g):
  x, w = residuals
  _, vjp = jax.vjp(lambda x: _lax_nhwc_conv(x, w, strides, padding, precision), x)
  grad_x, = vjp(g)  # Unused for the first layer (the images): XLA drops it.
  return grad_x, _weight_grad(x, g, w.shape, strides, padding, precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _weight_grad(x, g, kernel_shape, strides, padding, precision):
  """dL/dw of an NHWC/HWIO convolution as a few large matrix products.

  A strided convolution is first rewritten as a stride-1 one (space-to-depth): the input's
  s x s phases become channels, and the kernel's taps regroup into ceil(k / s) per phase.

  Args:
    x: [N, H, W, C_in] input; g: [N, H', W', C_out] output gradient.
  Returns:
    [kh, kw, C_in, C_out].
  """
  kh, kw = kernel_shape[:2]
  sh, sw = strides
  n, oh, ow, o = g.shape
  c = x.shape[3]
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  if (sh, sw) == (1, 1):
    return _stride1_weight_grad(xp, g, kh, kw, precision)
  th, tw = -(-kh // sh), -(-kw // sw)  # Taps per phase.
  h2, w2 = oh + th - 1, ow + tw - 1
  # Crop or zero-pad to whole phases: rows past s * h2 never meet a kernel tap.
  xp = lax.pad(xp[:, :sh * h2, :sw * w2], jnp.zeros((), xp.dtype),
               ((0, 0, 0), (0, max(0, sh * h2 - xp.shape[1]), 0),
                (0, max(0, sw * w2 - xp.shape[2]), 0), (0, 0, 0)))
  phases = xp.reshape(n, h2, sh, w2, sw, c).transpose(0, 1, 3, 2, 4, 5)
  grad = _stride1_weight_grad(phases.reshape(n, h2, w2, sh * sw * c), g, th, tw, precision)
  grad = grad.reshape(th, tw, sh, sw, c, o).transpose(0, 2, 1, 3, 4, 5)
  return grad.reshape(th * sh, tw * sw, c, o)[:kh, :kw]


def _stride1_weight_grad(xp, g, kh, kw, precision):
  """dL/dw[i, j] = sum over n, h, w of xp[n, h + i, w + j, :]^T g[n, h, w, :] (stride 1).

  In a [C, Hp * Wp, N] layout of the padded input, the window of tap (i, j) is one contiguous
  slice starting at i * Wp + j, if the output gradient is widened to Wp columns with zeros
  (they cancel the columns that wrap around). Each kernel row is then one matrix product of
  [kw * C, H' * Wp * N] by [H' * Wp * N, C_out]: long contiguous copies and a large product,
  where XLA:CPU's own weight-gradient convolution is 4-5x slower.

  Args:
    xp: [N, Hp, Wp, C_in] padded input; g: [N, Hp - kh + 1, Wp - kw + 1, C_out].
  Returns:
    [kh, kw, C_in, C_out].
  """
  n, oh, ow, o = g.shape
  hp, wp, c = xp.shape[1:]
  rows = oh * wp
  flat = jnp.pad(xp.transpose(3, 1, 2, 0).reshape(c, hp * wp, n), ((0, 0), (0, kw - 1), (0, 0)))
  g_flat = jnp.pad(g, ((0, 0), (0, 0), (0, wp - ow), (0, 0))).transpose(1, 2, 0, 3)
  g_flat = g_flat.reshape(rows * n, o)

  def kernel_row(_, i):
    # A loop, not unrolled: one row's windows are alive at a time (tens of MB each).
    windows = jnp.stack([lax.dynamic_slice_in_dim(flat, i * wp + j, rows, axis=1)
                         for j in range(kw)])
    return None, jnp.dot(windows.reshape(kw * c, rows * n), g_flat,
                         precision=precision).reshape(kw, c, o)
  return lax.scan(kernel_row, None, jnp.arange(kh))[1].astype(xp.dtype)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """VALID max-pool of NHWC `x` with square window and stride; `nn.max_pool`'s numbers.

  Args:
    x: [N, H, W, C].
  Returns:
    [N, (H - window) // stride + 1, (W - window) // stride + 1, C].
  """
  return _routed_max_pool(x, window, stride)


def _reduce_window_max(x, window, stride):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           'VALID')


_routed_max_pool = jax.custom_vjp(_reduce_window_max, nondiff_argnums=(1, 2))


def _routed_max_pool_fwd(x, window, stride):
  y = _reduce_window_max(x, window, stride)
  return y, (x, y)


def _routed_max_pool_bwd(window, stride, residuals, g):
  """Sends each output's gradient to the first maximum of its window, in row-major order.

  That is the element XLA's select-and-scatter and PyTorch pick when a window has ties (common
  after ReLU: all-zero windows).
  """
  x, y = residuals
  n, oh, ow, c = y.shape
  taken = jnp.zeros(y.shape, bool)
  grad_x = jnp.zeros_like(x)
  for i in range(window):
    for j in range(window):
      limit = (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c)
      candidate = lax.slice(x, (0, i, j, 0), limit, (1, stride, stride, 1))
      chosen = (candidate == y) & ~taken
      taken = taken | chosen
      routed = jnp.where(chosen, g, jnp.zeros((), g.dtype))
      # Back to x's grid: stride - 1 zeros between entries, offset (i, j).
      grad_x = grad_x + lax.pad(routed, jnp.zeros((), g.dtype), (
          (0, 0, 0), (i, x.shape[1] - limit[1], stride - 1),
          (j, x.shape[2] - limit[2], stride - 1), (0, 0, 0)))
  return (grad_x,)


_routed_max_pool.defvjp(_routed_max_pool_fwd, _routed_max_pool_bwd)
