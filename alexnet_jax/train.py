"""Training: the train state, the pure per-device steps, and the loop that joins them.

    from alexnet_jax import train
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    state, metrics = train.train_and_evaluate(config, workdir)

TensorFlow (tf.data) is imported only when data is read, so the state and the steps also run
where it is not installed (e.g. a GPU box for benchmarks).

Both steps run on one device's slice of the batch inside `parallel.pmap`: gradients and
metrics are averaged (or summed) over devices through `parallel`, which is the only place that
knows how the devices are arranged.
"""

from collections.abc import Callable, Iterator
import contextlib
import functools
import json
import pathlib
import signal
import time
from typing import Any

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from alexnet_jax import checkpointing
from alexnet_jax import config_checks
from alexnet_jax import convert
from alexnet_jax import models
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import plots
from alexnet_jax import reporting


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the plateau schedule and the base dropout key.

  dropout_rng: raw uint32[2] key; step k on device d uses fold_in(fold_in(key, k), d), so
    resuming at any step reproduces the same dropout masks.
  plateau: the paper's learning-rate schedule state (`optim.PlateauState`).
  """
  dropout_rng: jax.Array
  plateau: optim.PlateauState


def create_model(config: ml_collections.ConfigDict) -> models.AlexNet:
  """The AlexNet that `config.model` and `config.num_classes` describe."""
  m = config.model
  return models.AlexNet(
      num_classes=config.num_classes, variant=m.variant, dropout_rate=m.dropout_rate,
      dtype=jnp.dtype(m.dtype), init_scheme=m.init, lrn_depth_radius=m.lrn_depth_radius,
      lrn_bias=m.lrn_bias, lrn_alpha=m.lrn_alpha, lrn_beta=m.lrn_beta)


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
  dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  params = jax.jit(functools.partial(model.init, train=False))(init_rng, dummy)['params']
  if init_from:
    params = convert.initial_params(init_from, params, config.model.variant, config.image_size)
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=optim.create_optimizer(config, params),
      dropout_rng=dropout_rng, plateau=optim.PlateauState.create())


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-example softmax cross-entropy. logits [B, K] float32, labels [B] int -> [B]."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def topk_correct(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest scores. scores [B, K], labels [B] -> [B]."""
  label_scores = jnp.take_along_axis(scores, labels[:, None], axis=-1)
  # Rank = number of classes scoring strictly higher; ties go in the label's favour.
  rank = jnp.sum(scores > label_scores, axis=-1)
  return (rank < k).astype(jnp.float32)


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               learning_rate_fn: Callable[[jax.Array], jax.Array],
               label_smoothing: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's slice of the global batch (run under `parallel.pmap`).

  Args:
    state: this device's replica of the train state.
    batch: {'image': float32 [b, S, S, 3], 'label': int32 [b]}.
    learning_rate_fn: step -> base learning rate; the plateau scale multiplies it.
    label_smoothing: optional label smoothing of the targets.
  Returns:
    The new state and metrics averaged over all devices: loss, top1, top5, learning_rate,
    and finite (1.0 when loss and gradients were finite; otherwise the update was skipped).
  """
  dropout_rng = jax.random.fold_in(
      jax.random.fold_in(state.dropout_rng, state.step), parallel.device_index())

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, batch['image'], train=True,
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


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums of eval metrics over the real (unmasked) examples of all devices.

  Args:
    state: this device's replica of the train state.
    batch: {'image': [b, S, S, 3] or [b, crops, S, S, 3], 'label': int32 [b], 'mask': bool [b]};
      with crops, the softmax is averaged over them (the paper's 10-crop test).
  Returns:
    Totals over devices: loss, top1, top5, count (scalars), and per-class correct / count
    ([num_classes] each) for per-class accuracy.
  """
  images = batch['image']
  crops = images.shape[1] if images.ndim == 5 else 1
  logits = state.apply_fn({'params': state.params},
                          images.reshape((-1,) + images.shape[-3:]), train=False)
  probs = jax.nn.softmax(logits.reshape(images.shape[0], crops, -1)).mean(axis=1)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  label_prob = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
  top1 = topk_correct(probs, labels, 1)
  one_hot = jax.nn.one_hot(labels, probs.shape[-1]) * mask[:, None]
  return parallel.sum_over_devices({
      'loss': jnp.sum(-jnp.log(jnp.maximum(label_prob, 1e-30)) * mask),
      'top1': jnp.sum(top1 * mask),
      'top5': jnp.sum(topk_correct(probs, labels, 5) * mask),
      'count': jnp.sum(mask),
      'class_correct': jnp.sum(one_hot * top1[:, None], axis=0),
      'class_count': jnp.sum(one_hot, axis=0),
  })


class NonFiniteError(RuntimeError):
  """The loss or the gradients stopped being finite (see `config.on_nonfinite`)."""


class Preempted(Exception):
  """SIGTERM arrived; the run saved a checkpoint of `step` and stopped. Rerun to resume."""

  def __init__(self, step: int):
    super().__init__(f'Preempted: checkpoint of step {step} saved. Run the same command to '
                     f'resume.')
    self.step = step


def evaluate(p_eval_step: Callable[..., Any], replicated_state: TrainState,
             config: ml_collections.ConfigDict, devices: list[jax.Device],
             crops: int | None = None) -> dict[str, Any]:
  """One pass over the eval split; every example counted once, whatever the device count.

  Returns:
    loss, top1, top5 (means over examples), count, per_class_top1 (a list, NaN for classes
    without examples), per_class_count (a list) and skipped_images (undecodable files, over
    all processes; they are not in count).
  """
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  totals = None
  batches = input_pipeline.create_eval_iterator(
      config, crops=crops, process_index=jax.process_index(), process_count=jax.process_count())
  for batch in batches:
    sums = p_eval_step(replicated_state, parallel.shard(batch, len(devices)))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f'The eval split {config.eval_split!r} of {config.dataset!r} is empty.')
  totals = parallel.unreplicate(totals)
  count = float(totals['count'])
  with np.errstate(invalid='ignore', divide='ignore'):
    per_class = totals['class_correct'].astype(np.float64) / totals['class_count']
  return {'loss': float(totals['loss']) / count, 'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count, 'count': count,
          'per_class_top1': per_class.tolist(), 'per_class_count': totals['class_count'].tolist(),
          'skipped_images': parallel.sum_over_processes(batches.num_skipped)}


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[list[bool]]:
  """Catches SIGTERM (a preemption notice) into a flag the loop reads between steps."""
  flag = [False]
  def handler(signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step boundary.')
    flag[0] = True
  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # Not the main thread: leave signals alone.
    yield flag
    return
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def _check_finite(metrics: list[dict[str, Any]], first_step: int, config: ml_collections.ConfigDict,
                  last_checkpoint: int | None) -> int:
  """Counts the skipped non-finite steps in `metrics`; raises on one if the run must stop."""
  finite = np.array([m['finite'] for m in metrics])
  bad = np.flatnonzero(finite < 0.5)
  if bad.size and config.on_nonfinite == 'stop':
    raise NonFiniteError(
        f'Non-finite loss or gradients at step {first_step + int(bad[0])}; the update was not '
        f'applied and training stopped. Last good checkpoint: step {last_checkpoint}. Lower '
        f'the learning rate, or set --config.on_nonfinite=skip to skip such steps.')
  if bad.size:
    logging.warning('Skipped %d non-finite steps (first: step %d).', bad.size,
                    first_step + int(bad[0]))
  return int(bad.size)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path) -> tuple[TrainState, dict[str, Any]]:
  """Trains and evaluates per `config`, resuming from the newest checkpoint in `workdir`.

  A run without checkpoints starts from `config.init_from` when it is set.

  Returns:
    The final host train state and the final metrics (also in WORKDIR/final_metrics.json).
  """
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  start_time = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config_checks.validate(config)
  devices = parallel.select_devices(config.num_devices)
  parallel.per_device_batch_size(config.batch_size, len(devices), 'batch_size')
  parallel.per_device_batch_size(config.eval_batch_size, len(devices), 'eval_batch_size')
  config_checks.check_workdir(config, workdir)
  info = input_pipeline.get_dataset_info(config)
  steps_per_epoch = max(1, info.num_train_examples // config.batch_size)
  total_steps = optim.total_train_steps(config, steps_per_epoch)
  eval_every = max(1, int(config.eval_every_epochs * steps_per_epoch))

  writer = reporting.MetricWriter(workdir)
  manager = checkpointing.create_manager(workdir / checkpointing.DIRECTORY,
                                         config.keep_checkpoints)
  config_dict = checkpointing.config_to_dict(config)
  # The workdir's own checkpoints win over init_from: a rerun continues where it stopped.
  resuming = manager.latest_step() is not None
  state = create_train_state(config, jax.random.PRNGKey(config.seed),
                             None if resuming else config.init_from)
  meta = {'config': config_dict, 'skipped_steps': 0}
  restored = checkpointing.restore_latest(manager, state, config_dict)
  if restored is not None:
    state, meta = restored
    meta['config'] = config_dict
    logging.info('Resuming from the checkpoint at step %d.', int(state.step))
  else:
    writer.write_text('config', str(config))
    model_summary = models.summary(create_model(config), config.image_size)
    writer.write_text('model', model_summary)
    if jax.process_index() == 0:
      (workdir / 'model_summary.txt').write_text(model_summary)
  start_step = int(state.step)
  logging.info('%s: %d train / %d eval examples, %d steps per epoch, %d steps in all, on %d '
               'devices.', config.dataset, info.num_train_examples, info.num_eval_examples,
               steps_per_epoch, total_steps, len(devices) * jax.process_count())

  p_train_step = parallel.pmap(functools.partial(
      train_step, learning_rate_fn=optim.create_learning_rate_fn(config, steps_per_epoch),
      label_smoothing=config.label_smoothing), devices, donate_state=True)
  p_eval_step = parallel.pmap(eval_step, devices)
  train_batches = input_pipeline.create_train_iterator(
      config, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  batches = parallel.prefetch_to_device(train_batches, config.prefetch_to_device, devices)
  replicated = parallel.replicate(state, devices)
  throughput = reporting.Throughput(start_step, total_steps, config.batch_size)
  eval_metrics, pending, pending_from, summary = {}, [], start_step, {}
  step_drops = ({int(e * steps_per_epoch) for e in config.step_epochs}
                if config.lr_schedule == 'step' else set())

  def save(eval_top1=None):
    host_state = parallel.unreplicate(replicated)
    checkpointing.save(manager, host_state, meta, eval_top1)

  with _sigterm_flag() as preempted:
    for step in range(start_step + 1, total_steps + 1):
      replicated, metrics = p_train_step(replicated, next(batches))
      pending.append(metrics)
      if len(pending) > 1:
        # At most one step queued behind the running one: without this, dispatch runs up to
        # log_every_steps ahead, and a SIGTERM waits for all of them before the save.
        jax.block_until_ready(pending[-2])
      is_last = step == total_steps
      if step in step_drops:
        writer.write(step, 'lr_drop', {'scale': config.plateau_factor})
      if step % config.log_every_steps == 0 or step % eval_every == 0 or is_last or preempted[0]:
        host = [parallel.unreplicate(m) for m in pending]
        meta['skipped_steps'] += _check_finite(host, pending_from + 1, config,
                                               manager.latest_step())
        summary = {k: float(np.mean([m[k] for m in host])) for k in ('loss', 'top1', 'top5')}
        summary.update(learning_rate=float(host[-1]['learning_rate']), epoch=step / steps_per_epoch,
                       **throughput.report(step))
        writer.write(step, 'train', summary)
        pending, pending_from = [], step
      if step % eval_every == 0 or is_last:
        eval_metrics = evaluate(p_eval_step, replicated, config, devices)
        writer.write(step, 'eval', {k: eval_metrics[k] for k in ('loss', 'top1', 'top5')})
        if eval_metrics['top1'] > meta.get('best_eval_top1', -1.0):
          meta.update(best_eval_top1=eval_metrics['top1'], best_eval_top5=eval_metrics['top5'])
        plateau, dropped = optim.update_plateau(
            parallel.unreplicate(replicated.plateau), eval_metrics['top1'], config)
        if dropped:
          logging.info('Validation top-1 stopped improving: learning rate x%g at step %d.',
                       config.plateau_factor, step)
          writer.write(step, 'lr_drop', {'scale': float(plateau.scale)})
        replicated = replicated.replace(plateau=parallel.replicate(plateau, devices))
        if jax.process_index() == 0:
          plots.plot_learning_curves(reporting.read_history(workdir), workdir / 'curves.png',
                                     steps_per_epoch)
        save(eval_metrics['top1'])
      elif step % config.checkpoint_every_steps == 0 or preempted[0]:
        save()
      if preempted[0]:
        checkpointing.wait(manager)
        raise Preempted(step)
  checkpointing.wait(manager)
  manager.close()

  state = parallel.unreplicate(replicated)
  final = {'step': int(state.step), 'epoch': int(state.step) / steps_per_epoch,
           'train_loss': summary.get('loss'), 'eval_loss': eval_metrics.get('loss'),
           'eval_top1': eval_metrics.get('top1'), 'eval_top5': eval_metrics.get('top5'),
           'best_eval_top1': meta.get('best_eval_top1'),
           'best_eval_top5': meta.get('best_eval_top5'), 'skipped_steps': meta['skipped_steps'],
           # Since this run started (not before a resume); includes the prefetched batches.
           'skipped_train_images': parallel.sum_over_processes(train_batches.num_skipped),
           'skipped_eval_images': eval_metrics.get('skipped_images', 0),
           'wall_time_s': time.time() - start_time}
  if final['skipped_train_images'] or final['skipped_eval_images']:
    logging.warning('Skipped %d undecodable training images and %d in the last evaluation '
                    '(each named in the log).', final['skipped_train_images'],
                    final['skipped_eval_images'])
  if jax.process_index() == 0:
    (workdir / 'final_metrics.json').write_text(json.dumps(final, indent=2))
  return state, final
