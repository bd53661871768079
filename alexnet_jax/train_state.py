"""The train state: the AlexNet a config describes, its optimizer state and the plateau
schedule, made on the host (no device axis).

    from alexnet_jax import train_state
    state = train_state.create_train_state(config, jax.random.PRNGKey(0))

Training and every tool that loads a trained model start here; nothing here reads data, saves
checkpoints or knows about devices.
"""

import functools

from absl import logging
from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax import convert
from alexnet_jax import cpu_convolutions
from alexnet_jax import models
from alexnet_jax import optim


class TrainState(flax_train_state.TrainState):
  """Flax's TrainState plus the plateau schedule and the base dropout key.

  dropout_rng: raw uint32[2] key; step k on device d uses fold_in(fold_in(key, k), d), so
    resuming at any step reproduces the same dropout masks.
  plateau: the paper's learning-rate schedule state (`optim.PlateauState`).
  """
  dropout_rng: jax.Array
  plateau: optim.PlateauState


def create_model(config: ml_collections.ConfigDict) -> models.AlexNet:
  """The AlexNet that `config.model` and `config.num_classes` describe."""
  m, ops = config.model, model_ops(config)
  eigen = cpu_convolutions.eigen_convolutions_requested()
  if ops == 'cpu' and not eigen:
    logging.warning('XLA:CPU compiles the convolutions with YNNPACK, about half as fast as '
                    'with Eigen: import alexnet_jax before JAX starts (or set XLA_FLAGS=%s).',
                    cpu_convolutions.XLA_FLAG)
  elif m.ops == 'xla' and eigen and cpu_convolutions.jax_started():
    logging.warning("config.model.ops='xla' runs XLA's ops on Eigen's convolution kernels, "
                    "chosen when alexnet_jax was imported: for XLA:CPU's defaults call "
                    "cpu_convolutions.choose_convolutions('xla') before JAX starts.")
  return models.AlexNet(
      num_classes=config.num_classes, variant=m.variant, dropout_rate=m.dropout_rate,
      dtype=jnp.dtype(m.dtype), init_scheme=m.init, lrn_depth_radius=m.lrn_depth_radius,
      lrn_bias=m.lrn_bias, lrn_alpha=m.lrn_alpha, lrn_beta=m.lrn_beta,
      conv1_padding=m.conv1_padding, input_channels=config.input_channels, ops=ops)


def model_ops(config: ml_collections.ConfigDict) -> str:
  """`config.model.ops`, with 'auto' resolved: the split form under model parallelism, the
  CPU forms on a CPU backend, XLA's own ops elsewhere (configs/imagenet.py)."""
  if config.model.ops != 'auto':
    return config.model.ops
  if config.parallelism == 'model':
    return 'partitionable'
  return 'cpu' if jax.default_backend() == 'cpu' else 'xla'


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       init_from: str | None = None) -> TrainState:
  """Initialises the model and optimizer on the host (no device axis).

  Args:
    config: a config from `configs/`.
    rng: a PRNG key; split into the parameter init key and the dropout key.
    init_from: weights to start from (`convert.initial_params`), e.g. `config.init_from`;
      None: all fresh.
  Returns:
    A `TrainState` with step 0, params of `create_model(config)` at `config.image_size`, the
    optimizer state of `optim.create_optimizer`, and a fresh plateau schedule.
  """
  model = create_model(config)
  init_rng, dropout_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, config.image_size, config.image_size, config.input_channels),
                    jnp.float32)
  params = jax.jit(functools.partial(model.init, train=False))(init_rng, dummy)['params']
  if init_from:
    params = convert.initial_params(init_from, params, config.model.variant, config.image_size,
                                    config.model.conv1_padding)
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=optim.create_optimizer(config, params),
      dropout_rng=dropout_rng, plateau=optim.PlateauState.create())


def zeros_state(config: ml_collections.ConfigDict) -> TrainState:
  """A `TrainState` of `config`'s structure and shapes, all zeros: a target to restore into.

  Nothing is initialised: compiling the initialisers takes longer than evaluating a small model.
  """
  shapes = jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
