"""Convolution and max-pool gradients in forms that XLA compiles well on CPU.

Same numbers as `lax.conv_general_dilated` and `nn.max_pool` (tests/test_fast_ops.py checks
values and gradients against both and against PyTorch), different programs. On a 2-core CPU
(jax 0.10.2, batch 64, 224 px) we measured:
  - grouped convolution (`feature_group_count=2`): 5-9x slower than two convolutions on the
    halves, forward and backward (conv2 fwd+bwd 8.0 s grouped vs 4.2 s split);
  - the weight gradient of a stride-1 convolution, which XLA emits as one convolution whose
    "kernel" is the whole output gradient: 4x slower than k*k matrix products over shifted
    input windows (conv2 half 1.77 s vs 0.43 s);
  - max-pool backward (select-and-scatter): 25x the forward (pool1 470 ms vs 18 ms).
So on CPU we split groups, take stride-1 weight gradients as shifted matmuls and route the
max-pool gradient with comparisons and strided pads. Other platforms keep XLA's own ops
(`lax.platform_dependent`), which cuDNN serves well (docs/benchmarks_gpu.md).
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
  lax_conv = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision, **kwargs)
  undilated = all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
  # Compared in lax's canonical form: nn.Conv passes ConvDimensionNumbers, not strings, and
  # lax's default (None) is NCHW. Only NHWC/HWIO is handled.
  nhwc = (dimension_numbers is not None and lhs.ndim == 4 and
          lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) ==
          lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not nhwc or kwargs or not undilated or isinstance(padding, str):
    return lax_conv(lhs, rhs)
  strides = tuple(window_strides)
  padding = tuple(tuple(p) for p in padding)
  cpu_conv = functools.partial(_grouped_conv, strides=strides, padding=padding,
                               groups=feature_group_count, precision=precision)
  return lax.platform_dependent(lhs, rhs, cpu=lambda x, w: cpu_conv(x, w),
                                default=lambda x, w: lax_conv(x, w))


def _grouped_conv(x: jax.Array, w: jax.Array, *, strides, padding, groups, precision):
  """One convolution per group, concatenated along channels (the paper's two GPUs)."""
  xs = jnp.split(x, groups, axis=-1)
  ws = jnp.split(w, groups, axis=-1)
  return jnp.concatenate(
      [_conv(a, b, strides, padding, precision) for a, b in zip(xs, ws)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def _conv_fwd(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, g):
  x, w = residuals
  conv = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=padding,
                           dimension_numbers=_NHWC, precision=precision)
  _, vjp = jax.vjp(conv, x, w)
  if strides != (1, 1):
    return vjp(g)
  grad_x, _ = vjp(g)
  return grad_x, _shifted_weight_grad(x, g, w.shape, padding, precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _shifted_weight_grad(x, g, kernel_shape, padding, precision):
  """dL/dw[i, j] = sum over n, h, w of x_pad[n, h + i, w + j, :]^T g[n, h, w, :] (stride 1).

  Args:
    x: [N, H, W, C_in] input; g: [N, H', W', C_out] output gradient.
  Returns:
    [kh, kw, C_in, C_out].
  """
  kh, kw = kernel_shape[:2]
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  n, oh, ow, _ = g.shape
  rows = []
  for i in range(kh):
    row = [jnp.einsum('nhwc,nhwo->co', lax.slice(xp, (0, i, j, 0), (n, i + oh, j + ow, x.shape[3])),
                      g, precision=precision)
           for j in range(kw)]
    rows.append(jnp.stack(row))
  return jnp.stack(rows).astype(x.dtype)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """VALID max-pool of NHWC `x` with square window and stride; `nn.max_pool`'s numbers.

  Args:
    x: [N, H, W, C].
  Returns:
    [N, (H - window) // stride + 1, (W - window) // stride + 1, C].
  """
  return lax.platform_dependent(
      x, cpu=functools.partial(_routed_max_pool, window=window, stride=stride),
      default=functools.partial(_reduce_window_max, window=window, stride=stride))


def _reduce_window_max(x, window, stride):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           'VALID')


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _routed_max_pool(x, window, stride):
  return _reduce_window_max(x, window, stride)


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
