"""Convolutions and max-pool gradients in forms that XLA compiles well on CPU.

Same numbers as `lax.conv_general_dilated` and `nn.max_pool` (tests/test_fast_ops.py checks
values and gradients against both and against PyTorch), different programs. On CPU, XLA
compiles three of AlexNet's operations slowly: convolutions on its default YNNPACK kernels
(its own Eigen ones, `cpu_convolutions.XLA_FLAG`, are faster forward and in both gradients),
grouped convolutions (`feature_group_count=2`: slower than two convolutions on the halves)
and the max-pool gradient (select-and-scatter: many times the forward). So for CPU we take
Eigen's convolutions, split groups and route the max-pool gradient with comparisons and
strided pads; the measurements are in docs/benchmarks.md ("Four findings"). The model uses
these only with `config.model.ops='cpu'` ('auto' on a CPU backend,
`train_state.create_model`); elsewhere it keeps XLA's own ops, which cuDNN serves well
(docs/benchmarks_gpu.md), and never traces these.

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

  Only grouped NHWC/HWIO convolutions without dilation and with explicit padding are split;
  anything else is passed to lax unchanged.

  Args:
    lhs: [N, H, W, C_in] images.
    rhs: [kh, kw, C_in / groups, C_out] kernel.
    window_strides, padding, ...: as `lax.conv_general_dilated`.

  Returns:
    [N, H', W', C_out].
  """
  if feature_group_count == 1 or not _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation,
                                                  dimension_numbers, kwargs):
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
  conv4, conv5) take that form; every other one is lax's own.

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
      [lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=_NHWC,
                                precision=precision) for a, b in zip(xs, ws)], axis=-1)


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
