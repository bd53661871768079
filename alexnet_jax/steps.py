"""The pure per-device steps: one SGD update, and the sums an evaluation adds up.

Both run on one device's slice of the batch under a `parallel.DataParallel` (pmap, or jit over
a mesh): gradients and metrics are averaged (or summed) over devices through `parallel`, which
is the only place that knows how the devices are arranged.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from alexnet_jax import normalize
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax.train_state import TrainState


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-example softmax cross-entropy. logits [B, K] float32, labels [B] int -> [B]."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def topk_correct(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest scores. scores [B, K], labels [B] -> [B].

  Ranks as `lax.top_k` and `argmax` do (ties go to the lower class index), so a constant
  output scores what chance and its ties allow, not 100%; a row with a NaN or infinite score
  never counts as correct (an overflowed model must not look perfect to the plateau rule or
  to the best checkpoint).
  """
  label_scores = jnp.take_along_axis(scores, labels[:, None], axis=-1)
  lower_index = jnp.arange(scores.shape[-1]) < labels[:, None]
  ahead = (scores > label_scores) | ((scores == label_scores) & lower_index)
  finite = jnp.all(jnp.isfinite(scores), axis=-1)
  return ((jnp.sum(ahead, axis=-1) < k) & finite).astype(jnp.float32)


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               learning_rate_fn: Callable[[jax.Array], jax.Array],
               label_smoothing: float = 0.0,
               normalization: normalize.Normalization = normalize.Normalization()
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's slice of the global batch (run by `DataParallel.map`).

  Args:
    state: this device's replica of the train state.
    batch: {'image': uint8 [b, S, S, C], 'label': int32 [b]} and the example's random choices
      (C = config.input_channels; see `input_pipeline.create_train_iterator`).
    learning_rate_fn: step -> base learning rate; the plateau scale multiplies it.
    label_smoothing: optional label smoothing of the targets.
    normalization: turns the batch into the network's input (`normalize.for_config`).
  Returns:
    The new state and metrics averaged over all devices: loss, top1, top5, learning_rate,
    and finite (1.0 when loss and gradients were finite; otherwise the update was skipped).
  """
  dropout_rng = jax.random.fold_in(
      jax.random.fold_in(state.dropout_rng, state.step), parallel.device_index())

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, normalization(batch), train=True,
                            rngs={'dropout': dropout_rng})
    return cross_entropy(logits, batch['label'], label_smoothing).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads, loss = parallel.mean_over_devices((grads, loss))
  learning_rate = learning_rate_fn(state.step) * state.plateau.scale
  finite = jnp.isfinite(loss) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

  def apply(state):
    state = state.replace(opt_state=optim.with_learning_rate(state.opt_state, learning_rate))
    return state.apply_gradients(grads=grads)

  def skip(state):
    return state.replace(step=state.step + 1)

  new_state = jax.lax.cond(finite, apply, skip, state)
  metrics = parallel.mean_over_devices({
      'loss': loss,
      'top1': topk_correct(logits, batch['label'], 1).mean(),
      'top5': topk_correct(logits, batch['label'], 5).mean(),
  })
  metrics.update(learning_rate=learning_rate, finite=finite.astype(jnp.float32))
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              normalization: normalize.Normalization = normalize.Normalization()
              ) -> dict[str, jax.Array]:
  """Sums of eval metrics over the real (unmasked) examples of all devices.

  Args:
    state: this device's replica of the train state.
    batch: {'image': uint8 [b, S, S, C] or [b, crops, S, S, C], 'label': int32 [b],
      'mask': bool [b]} (see `input_pipeline.create_eval_iterator`); with crops, the softmax
      is averaged over them (the paper's 10-crop test), in log space:
      log_probs = logsumexp_c(log_softmax(logits_c)) - log(crops).
    normalization: turns the batch into the network's input (`normalize.for_config`).
  Returns:
    Totals over devices: loss (-log_probs of the label), top1, top5 (ranked by log_probs, see
    `topk_correct`), count (scalars), and per-class correct / count
    ([num_classes] each) for per-class accuracy.
  """
  images = normalization(batch)
  crops = images.shape[1] if images.ndim == 5 else 1
  logits = state.apply_fn({'params': state.params},
                          images.reshape((-1,) + images.shape[-3:]), train=False)
  # log of the crops' mean softmax, in log space: exact where a probability underflows.
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32).reshape(images.shape[0], crops, -1))
  log_probs = jax.nn.logsumexp(log_probs, axis=1) - jnp.log(crops)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  label_log_prob = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  top1 = topk_correct(log_probs, labels, 1)
  one_hot = jax.nn.one_hot(labels, log_probs.shape[-1]) * mask[:, None]
  return parallel.sum_over_devices({
      'loss': -jnp.sum(jnp.where(mask > 0, label_log_prob, 0.0)),
      'top1': jnp.sum(top1 * mask),
      'top5': jnp.sum(topk_correct(log_probs, labels, 5) * mask),
      'count': jnp.sum(mask),
      'class_correct': jnp.sum(one_hot * top1[:, None], axis=0),
      'class_count': jnp.sum(one_hot, axis=0),
  })

