"""conv1's kernel groups and their colour number (the paper's section 6.1, Figure 3).

The colour share is checked on kernels made by hand; the groups against the paper network's
connectivity: conv2's first half of filters must see conv1's first half of kernels only.
"""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from alexnet_jax import models
from alexnet_jax import plots


def _kernel(*pixels_rgb) -> np.ndarray:
  """A 2x1 kernel [2, 1, 3, 1] whose two pixels have these RGB weights."""
  return np.array(pixels_rgb, np.float64).reshape(2, 1, 3, 1)


@pytest.mark.parametrize('kernel,share', [
    (_kernel((0.3, 0.3, 0.3), (-2, -2, -2)), 0.0),  # Grey: the same weight on R, G and B.
    (_kernel((1, -1, 0), (0.5, 0, -0.5)), 1.0),  # Channels cancel at each pixel.
    (_kernel((1, 0, 0), (0, 0, 0)), 2 / 3),  # Pure red: mean 1/3, chroma (2, -1, -1) / 3.
    # (2, 0, 1) is grey (1, 1, 1) + chroma (1, -1, 0): energy 5, chroma 2; the grey pixel
    # adds energy 3 and no chroma: 2 / 8.
    (_kernel((2, 0, 1), (1, 1, 1)), 2 / 8),
    (_kernel((0, 0, 0), (0, 0, 0)), 0.0),
])
def test_colour_share_of_hand_made_kernels(kernel, share):
  assert plots.colour_share(kernel) == pytest.approx([share], abs=1e-12)


def test_random_kernels_have_two_thirds_and_captions_name_each_group():
  rng = np.random.default_rng(0)
  grey = np.repeat(rng.normal(size=(11, 11, 1, 48)), 3, axis=2)
  kernel = np.concatenate([grey, rng.normal(size=(11, 11, 3, 48))], axis=-1)
  shares = plots.colour_share(kernel)
  assert shares[:48] == pytest.approx(np.zeros(48), abs=1e-12)
  assert shares[48:].mean() == pytest.approx(2 / 3, abs=0.01)
  first, second = plots.group_captions(kernel, 2)
  assert first == 'kernels 0-47 (group 1 of 2): mean colour share 0.0000'
  assert second == f'kernels 48-95 (group 2 of 2): mean colour share {shares[48:].mean():.4f}'


def _param_shapes(variant: str):
  return jax.eval_shape(lambda: models.AlexNet(num_classes=10, variant=variant).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))['params']


@pytest.mark.parametrize('variant,groups', [('paper', 2), ('torchvision', 1)])
def test_kernel_groups_follow_conv2(variant, groups):
  assert plots.kernel_groups(_param_shapes(variant)) == groups


def test_paper_groups_are_conv2s_halves(small_real_batch):
  """Changing a kernel of group 1 moves conv2's first 128 maps only; one of group 2 the others.

  Kernels 10 and 60 are away from the middle: the LRN after conv1 sums 5 neighbouring maps
  across all 96, so kernels 46-49 reach both halves through it.
  """
  model = models.AlexNet(num_classes=10)
  images = jnp.asarray(small_real_batch['image'][:2])
  # He-random weights drawn by numpy: jax's initialisers take far longer on a small CPU.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: rng.normal(0, np.sqrt(2 / np.prod(x.shape[:-1])), x.shape).astype(np.float32),
      _param_shapes('paper'))

  @jax.jit
  def conv2(params):
    _, state = model.apply({'params': params}, images, train=False, mutable=['intermediates'],
                           capture_intermediates=lambda module, _: module.name == 'conv2')
    return state['intermediates']['conv2']['__call__'][0]

  before = np.asarray(conv2(params))
  assert before.shape[-1] == 256 and plots.kernel_groups(params) == 2
  for kernel, changed, unchanged in ((10, slice(0, 128), slice(128, 256)),
                                     (60, slice(128, 256), slice(0, 128))):
    moved = jax.tree.map(np.copy, params)
    moved['conv1']['kernel'][..., kernel] *= 3
    after = np.asarray(conv2(moved))
    np.testing.assert_array_equal(after[..., unchanged], before[..., unchanged])
    assert np.abs(after[..., changed] - before[..., changed]).max() > 1e-3


@pytest.mark.parametrize('kernels,groups,height', [
    # 2 blocks of 4 rows of 12 kernels, 11 px + 1 px apart and around, drawn 4x, 18 px captions.
    (96, 2, 2 * ((4 * 12 + 1) * 4 + 18)),
    (64, 1, (6 * 12 + 1) * 4 + 18),  # torchvision's 64: 6 rows, the last one part full.
])
def test_filter_picture_has_a_captioned_block_per_group(tmp_path, kernels, groups, height):
  kernel = np.random.default_rng(0).normal(size=(11, 11, 3, kernels))
  plots.plot_filters(kernel, tmp_path / 'filters.png', groups)
  with Image.open(tmp_path / 'filters.png') as image:
    assert image.size == ((12 * 12 + 1) * 4, height)
    assert np.asarray(image.convert('L')).std() > 10
