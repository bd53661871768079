"""Imagenette (10 easy ImageNet classes) with the paper's network and augmentation.

Point it at an image folder (the default here, as on these machines) or a TFDS build:

    python -m alexnet_jax.main --config=configs/imagenette.py --workdir=/tmp/imagenette \
        --config.data_dir=../shared/data/imagenette2-224
    python -m alexnet_jax.main --config=configs/imagenette.py --workdir=/tmp/imagenette \
        --config.dataset=imagenette/full-size-v2   # needs the internet once
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
  """Returns the Imagenette configuration (image folder layout by default)."""
  config = imagenet.get_config()
  config.dataset = 'folder'
  config.data_dir = '../shared/data/imagenette2-224'
  config.train_split = 'train'
  config.eval_split = 'val'
  config.num_classes = 10

  # The paper's N(0, 0.01) init needs many epochs to leave its flat start; 9.5k images and
  # tens of epochs do not give it that time. He init expects unit-variance inputs.
  config.model.init = 'he'
  config.divide_by_std = True
  config.optimizer = 'sgd'
  config.learning_rate = 0.02
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 1.0
  config.batch_size = 128
  config.num_epochs = 30.0
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  config.shuffle_buffer_size = 10_000
  return config
