"""Imagenette in under an hour on a 2-core CPU: the paper network at 96 px for 7 epochs.

    python -m alexnet_jax.main --config=configs/imagenette_cpu.py --workdir=/tmp/imagenette_cpu

docs/results.md records what it reaches and how long it takes. Everything not set here is
configs/imagenette.py (paper network, LRN, augmentation, He init, SGD momentum, cosine).
"""

import ml_collections

from configs import imagenette


def get_config() -> ml_collections.ConfigDict:
  """Returns the one-hour CPU configuration for Imagenette."""
  config = imagenette.get_config()
  # Chosen when a paper-variant train step at batch 64 took 4.5 s at 128 px and 2.4 s at 96 px
  # on 2 cores (jax 0.10.2, XLA's own convolutions): 96 px bought 7 epochs in the hour, 128 px
  # only 4. With fast_ops' CPU gradients the step takes 1.54 s and 0.89 s (step alone), so
  # the same hour now fits 128 px; the config stays as docs/results.md recorded it. The resize
  # keeps the paper's 256/224 ratio.
  config.image_size = 96
  config.resize_size = 110
  config.batch_size = 64
  config.eval_batch_size = 128
  # lr 0.01 at batch 64 is the rate the digits default and the CI smoke run (64 px) train
  # with; 1 epoch of warmup keeps the first steps of the un-normalised net stable.
  config.learning_rate = 0.01
  config.warmup_epochs = 1.0
  config.num_epochs = 7.0
  config.eval_every_epochs = 2.0
  config.log_every_steps = 25
  config.checkpoint_every_steps = 300
  config.cache = True  # 3,925 val images at 96 px: 0.4 GB decoded, no re-decoding per eval.
  return config
