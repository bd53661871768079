"""Throughput only: synthetic images, no input pipeline cost, nothing learned.

    python -m alexnet_jax.main --config=configs/fake_data_benchmark.py --workdir=/tmp/bench
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
  """Returns the paper network on synthetic 224 px data for a few hundred steps."""
  config = imagenet.get_config()
  config.dataset = 'fake'
  config.lr_schedule = 'constant'
  config.num_train_steps = 200
  config.steps_per_eval = 1
  config.log_every_steps = 20
  config.checkpoint_every_steps = 1_000_000  # Benchmarks do not save.
  return config
