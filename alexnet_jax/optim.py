"""The optimizer and learning-rate schedules.

The paper (section 5) updates
    v <- momentum * v - weight_decay * lr * w - lr * grad,    w <- w + v,
so the learning rate sits *inside* the velocity: after a learning-rate drop the old velocity
keeps its old scale and decays away. `optax.sgd` and PyTorch scale after the momentum buffer,
    v <- momentum * v + grad + weight_decay * w,              w <- w - lr * v,
which rescales the whole velocity at once. Both are offered (`config.optimizer`).

The learning rate is an injected hyperparameter (`optax.inject_hyperparams`), set by the train
step from a step schedule times the plateau scale kept in the train state, so the paper's
"divide by 10 when validation error stops improving" survives checkpoints like everything else.
"""

from collections.abc import Callable
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

OPTIMIZERS = ('paper_momentum', 'sgd')
SCHEDULES = ('plateau', 'step', 'cosine', 'linear', 'constant')


def paper_momentum(learning_rate: float, momentum: float, weight_decay: float,
                   decay_mask: Any = None) -> optax.GradientTransformation:
  """The paper's momentum SGD: the velocity accumulates -lr * (grad + weight_decay * w)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum),
  )


def sgd(learning_rate: float, momentum: float, weight_decay: float,
        decay_mask: Any = None) -> optax.GradientTransformation:
  """`optax.sgd` / PyTorch SGD with coupled weight decay: lr applied after the momentum."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate),
  )


def _decay_mask(params: Any, decay_biases: bool) -> Any:
  """True for the leaves weight decay applies to: kernels always, biases by config."""
  return flax.traverse_util.path_aware_map(
      lambda path, _: decay_biases or path[-1] != 'bias', params)


def create_optimizer(config: ml_collections.ConfigDict,
                     params: Any) -> optax.GradientTransformation:
  """Builds the optimizer named by `config.optimizer`, its learning rate injectable."""
  factories = {'paper_momentum': paper_momentum, 'sgd': sgd}
  if config.optimizer not in factories:
    raise ValueError(f'config.optimizer={config.optimizer!r}; choose one of {OPTIMIZERS}.')
  return optax.inject_hyperparams(factories[config.optimizer], static_args=('decay_mask',))(
      learning_rate=config.learning_rate, momentum=config.momentum,
      weight_decay=config.weight_decay,
      decay_mask=_decay_mask(params, config.weight_decay_on_biases))


def with_learning_rate(opt_state: optax.OptState, learning_rate: jax.Array) -> optax.OptState:
  """Returns `opt_state` (from `create_optimizer`) with its learning rate replaced."""
  return opt_state._replace(
      hyperparams={**opt_state.hyperparams, 'learning_rate': learning_rate})


# The optimizer settings `inject_hyperparams` keeps in the state besides the learning rate
# (which the train step sets at every step).
_CONFIG_HYPERPARAMS = ('momentum', 'weight_decay')


def with_config_hyperparams(opt_state: optax.OptState,
                            config: ml_collections.ConfigDict) -> optax.OptState:
  """Returns a restored `opt_state` with momentum and weight decay of the config in force.

  `inject_hyperparams` saves them in the state, so a checkpoint would otherwise go on with
  the values it was written with whatever the resumed run's config says.
  """
  hyperparams = dict(opt_state.hyperparams)
  for name in _CONFIG_HYPERPARAMS:
    saved = np.asarray(hyperparams[name])
    wanted = np.asarray(config[name], saved.dtype)
    if saved != wanted:
      logging.info('Resumed with %s=%g from the config (the checkpoint had %g).', name,
                   wanted, saved)
    hyperparams[name] = wanted
  return opt_state._replace(hyperparams=hyperparams)


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """The step-dependent part of the learning rate (the plateau scale multiplies it).

  'plateau' and 'constant' are flat here; 'step' multiplies by `plateau_factor` at each epoch
  of `step_epochs`; 'cosine' and 'linear' decay to zero over the run (half a cosine period; a
  straight line, Li et al.'s budgeted training). All start with a linear warmup of
  `warmup_epochs` when that is positive.
  """
  if config.lr_schedule not in SCHEDULES:
    raise ValueError(f'config.lr_schedule={config.lr_schedule!r}; choose one of {SCHEDULES}.')
  base = config.learning_rate
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  total_steps = total_train_steps(config, steps_per_epoch)
  if config.lr_schedule == 'step':
    after_warmup = optax.piecewise_constant_schedule(
        base, {int(e * steps_per_epoch) - warmup_steps: config.plateau_factor
               for e in config.step_epochs})
  elif config.lr_schedule == 'cosine':
    after_warmup = optax.cosine_decay_schedule(base, max(1, total_steps - warmup_steps))
  elif config.lr_schedule == 'linear':
    after_warmup = optax.linear_schedule(base, 0.0, max(1, total_steps - warmup_steps))
  else:
    after_warmup = optax.constant_schedule(base)
  if warmup_steps <= 0:
    return after_warmup
  warmup = optax.linear_schedule(0.0, base, warmup_steps)
  return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """`num_train_steps` when set, else `num_epochs` worth of steps."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(config.num_epochs * steps_per_epoch)


@flax.struct.dataclass
class PlateauState:
  """The paper's schedule state: divide the learning rate when config.best_metric (val top-1
  by default) stops improving.

  scale: the factor on the learning rate (1, 0.1, 0.01, ...).
  best: the validation top-1 of the last significant improvement (see `update_plateau`):
    gains below `plateau_min_delta` do not move it, so they add up until they count.
  bad_evals: evaluations since `best` last moved.
  num_drops: how many times the learning rate has been divided.
  """
  scale: jax.Array
  best: jax.Array
  bad_evals: jax.Array
  num_drops: jax.Array

  @classmethod
  def create(cls) -> 'PlateauState':
    return cls(scale=jnp.float32(1.0), best=jnp.float32(-1.0), bad_evals=jnp.int32(0),
               num_drops=jnp.int32(0))


def update_plateau(plateau: PlateauState, eval_top1: float,
                   config: ml_collections.ConfigDict) -> tuple[PlateauState, bool]:
  """Records one evaluation of config.best_metric (`eval_top1`, higher is better); returns the
  new state and whether the learning rate dropped.

  Runs on the host between steps. An evaluation improves when its top-1 beats `best` by more
  than `plateau_min_delta`: absolutely ('abs', PyTorch's ReduceLROnPlateau threshold_mode='abs')
  or relatively ('rel': by more than best * min_delta). Only then does `best` move, as in
  PyTorch, Keras and `optax.contrib.reduce_on_plateau`: steady small gains do not stall it.
  With `lr_schedule != 'plateau'` the learning rate never drops.
  """
  best = float(plateau.best)
  if config.plateau_threshold_mode == 'rel':
    threshold = best + abs(best) * config.plateau_min_delta
  else:
    threshold = best + config.plateau_min_delta
  improved = eval_top1 > threshold
  bad_evals = 0 if improved else int(plateau.bad_evals) + 1
  drop = (config.lr_schedule == 'plateau' and bad_evals >= config.plateau_patience
          and int(plateau.num_drops) < config.plateau_max_drops)
  new = PlateauState(
      scale=jnp.float32(float(plateau.scale) * (config.plateau_factor if drop else 1.0)),
      best=jnp.float32(eval_top1 if improved else best),
      bad_evals=jnp.int32(0 if drop else bad_evals),
      num_drops=jnp.int32(int(plateau.num_drops) + int(drop)))
  return new, drop
