"""The device side of preprocessing: a batch of uint8 pixels -> the network's float input.

tf.data (`preprocessing`) decodes, crops and mirrors in uint8 and draws every random choice;
the float work runs here, inside the compiled train and eval steps, so a 224 px image crosses
to the device in 150,528 bytes instead of float32's 602,112, and the host is spared two thirds
of a prepared image's time. The arithmetic is the one tf.data did before, in the same order
(tested equal to a NumPy reference to float rounding); what it starts from differs only where
the host resamples (original photos, `random_resized`, the digits): that crop is now rounded
to uint8 once, at most 0.5 of 255 (prepared canvases are only cropped, so not rounded):

    image = (float32(pixels) - mean + lighting) / std

mean: the per-channel mean [C], or the mean image's window [S, S, C] at the crop's offset on
the canvas, mirrored with the crop (equal to mirroring the crop after subtracting, as the
float path did); lighting: the example's PCA colour shift [3] (`preprocessing.pca_lighting`);
std: [C] or [1]. Each term is left out when absent.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Normalization:
  """The constants of a run (`for_config`), closed over by the steps (not in the TrainState).

  The default subtracts and divides nothing: the float conversion alone, for batches whose
  images are the network's input already (tests and benchmarks of the step).

  Attributes:
    mean: float32 [C], or [R, R, C] (a mean image of the canvases), or None.
    std: float32 [C] or [1] (255: d2l's [0, 1] pixels), or None (the paper's 0-255 scale).
  """
  mean: Optional[np.ndarray] = None
  std: Optional[np.ndarray] = None

  def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
    """The network's input, float32 [b, S, S, C] ([b, crops, S, S, C] for multi-crop).

    Args:
      batch: 'image' [b, S, S, C] or [b, crops, S, S, C] (uint8 from tf.data; any real
        dtype), plus 'lighting' float32 [b, 3] if shifted, and for a mean image 'offset' int32
        [b, 2] / [b, crops, 2] and 'flip' bool [b] / [b, crops] (see
        `input_pipeline.create_train_iterator`, `create_eval_iterator`).
    """
    image = batch['image'].astype(jnp.float32)
    if self.mean is not None:
      mean = jnp.asarray(self.mean, jnp.float32)
      if mean.ndim == 3:
        mean = _windows(mean, batch['offset'], batch['flip'], image.shape[-3])
      image = image - mean
    if 'lighting' in batch:
      image = image + batch['lighting'][:, None, None, :]
    if self.std is not None:
      image = image / jnp.asarray(self.std, jnp.float32)
    return image


def _windows(mean: jax.Array, offset: jax.Array, flip: jax.Array, size: int) -> jax.Array:
  """The size x size windows of mean [R, R, C] at offset int [..., 2], mirrored where flip
  [...]: [..., size, size, C]."""
  def window(corner, mirrored):
    crop = jax.lax.dynamic_slice(mean, (corner[0], corner[1], 0), (size, size, mean.shape[2]))
    return jnp.where(mirrored, crop[:, ::-1], crop)
  lead = flip.shape
  windows = jax.vmap(window)(offset.reshape(-1, 2), flip.reshape(-1))
  return windows.reshape(lead + windows.shape[1:])


def for_config(config) -> Normalization:
  """The normalisation `config` asks for (mean_subtraction, divide_by_std, divide_by_255).

  Raises:
    ValueError: mean_subtraction='pixel' without a usable mean image.
  """
  # TensorFlow (which reads a mean image) is imported only when a run reads data.
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return Normalization(*input_pipeline.pixel_statistics(config))
