"""d2l's AlexNet recipe ("Dive into Deep Learning", its chapter on AlexNet) on Fashion-MNIST.

The network the course teaches (`model.variant='d2l'`: the paper's widths without groups or
LRN, conv1 padded by 1, maps 54, 26, 12, 5) on 1-channel 28x28 Fashion-MNIST resized to 224 px,
trained as the book does: plain SGD, lr 0.01, batch 128, 10 epochs, Xavier-uniform init, pixels
on [0, 1] and no augmentation.

    python -m alexnet_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/fashion_mnist

TFDS downloads `fashion_mnist` (30 MB) into config.data_dir on the first run, which needs the
internet; without it the run stops with one line saying how to prepare it elsewhere.
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
  """Returns d2l's Fashion-MNIST configuration of the d2l AlexNet."""
  config = imagenet.get_config()
  config.dataset = 'fashion_mnist'  # TFDS: 60,000 train / 10,000 test 28x28 grey images.
  config.train_split = 'train'
  config.eval_split = 'test'  # d2l evaluates on the test split.
  config.num_classes = 10
  config.input_channels = 1  # Grey, as d2l's nn.Conv2d(1, 96, ...).

  # d2l: transforms.Resize(224) then ToTensor(): the whole 28x28 image upscaled to 224, pixels
  # divided by 255, no mean, no crop, no flip, no lighting noise.
  config.image_size = 224
  config.resize_size = 224  # = image_size: the 'paper' crop is the whole resized image.
  config.center_crop_train = True  # Fashion-MNIST is square: the central square is all of it.
  config.random_flip = False
  config.pca_lighting_std = 0.0
  config.mean_subtraction = 'none'
  config.divide_by_255 = True

  config.model.variant = 'd2l'  # conv1_padding stays None: d2l's own padding of 1.
  config.model.init = 'xavier'  # d2l's init_cnn: nn.init.xavier_uniform_ on the weights.
  config.model.dropout_rate = 0.5  # d2l: Dropout(p=0.5) after fc6 and fc7.

  # d2l: torch.optim.SGD(net.parameters(), lr=0.01): no momentum, no weight decay, no schedule.
  config.optimizer = 'sgd'
  config.learning_rate = 0.01
  config.momentum = 0.0
  config.weight_decay = 0.0
  config.lr_schedule = 'constant'

  config.batch_size = 128  # d2l.
  config.eval_batch_size = 256
  config.num_epochs = 10.0  # d2l.
  config.eval_every_epochs = 1.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.shuffle_buffer_size = 60_000  # The whole training split, as d2l's DataLoader shuffle.
  return config
