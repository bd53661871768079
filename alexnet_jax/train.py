"""Training: the train state, the pure per-device steps, and the loop that joins them.

    from alexnet_jax import train
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    state, metrics = train.train_and_evaluate(config, workdir)

TensorFlow (tf.data) is imported only when data is read, so the state and the steps also run
where it is not installed (e.g. a GPU box for benchmarks).

Both steps run on one device's slice of the batch under a `parallel.DataParallel` (pmap, or
jit over a mesh): gradients and metrics are averaged (or summed) over devices through
`parallel`, which is the only place that knows how the devices are arranged.
"""

from collections.abc import Callable
import dataclasses
import functools
import json
import time
from typing import Any

from absl import logging
from etils import epath
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from alexnet_jax import checkpointing
from alexnet_jax import config_checks
from alexnet_jax import convert
from alexnet_jax import cpu_convolutions
from alexnet_jax import host_memory
from alexnet_jax import models
from alexnet_jax import normalize
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import plots
from alexnet_jax import preemption
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


class NonFiniteError(RuntimeError):
  """The loss or the gradients stopped being finite (see `config.on_nonfinite`)."""


class Preempted(Exception):
  """SIGTERM arrived; the run saved a checkpoint of `step` and stopped. Rerun to resume."""

  def __init__(self, step: int):
    super().__init__(f'Preempted: checkpoint of step {step} saved. Run the same command to '
                     f'resume.')
    self.step = step


def evaluate(p_eval_step: Callable[..., Any], replicated_state: TrainState,
             config: ml_collections.ConfigDict, data_parallel: parallel.DataParallel,
             crops: int | None = None,
             notice: preemption.Notice | None = None) -> dict[str, Any] | None:
  """One pass over the eval split; every example counted once, whatever the device count.

  Args:
    p_eval_step: `eval_step` under `data_parallel.map`.
    replicated_state: the state on the devices (`data_parallel.put_state`).
    config: the run's config.
    data_parallel: how the devices run the step.
    crops: the crops asked for (see `input_pipeline.eval_crops`); None: config.eval_crops.
    notice: checked after every batch; when it says stop, the pass ends there.
  Returns:
    loss, top1, top5 (means over examples), count, crops (the crops used), per_class_top1 (a
    list, NaN for classes without examples), per_class_count (a list) and skipped_images
    (undecodable files, over all processes; they are not in count). None when `notice`
    stopped the pass.
  Raises:
    ValueError: the split has no example, or none of its images decodes.
  """
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  crops = input_pipeline.eval_crops(config, crops)
  totals = None
  batches = input_pipeline.create_eval_iterator(
      config, crops=crops, process_index=jax.process_index(), process_count=jax.process_count())
  for batch in batches:
    sums = p_eval_step(replicated_state, data_parallel.put_batch(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if notice is not None and notice.reached():
      return None
  skipped = parallel.sum_over_processes(batches.num_skipped)
  totals = None if totals is None else data_parallel.get(totals)
  count = 0.0 if totals is None else float(totals['count'])
  if not count:
    raise ValueError(f'No image of the {config.eval_split!r} split of {config.dataset!r} '
                     f'could be evaluated: {skipped} files failed to decode (each is named in '
                     'the log above).' if skipped else
                     f'The eval split {config.eval_split!r} of {config.dataset!r} is empty.')
  with np.errstate(invalid='ignore', divide='ignore'):
    per_class = totals['class_correct'].astype(np.float64) / totals['class_count']
  return {'loss': float(totals['loss']) / count, 'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count, 'count': count, 'crops': crops,
          'per_class_top1': per_class.tolist(), 'per_class_count': totals['class_count'].tolist(),
          'skipped_images': skipped}


def _check_finite(metrics: list[dict[str, Any]], first_step: int, config: ml_collections.ConfigDict,
                  last_checkpoint: int | None) -> int:
  """Counts the skipped non-finite steps in `metrics`; raises on one if the run must stop."""
  finite = np.array([m['finite'] for m in metrics])
  bad = np.flatnonzero(finite < 0.5)
  if bad.size and config.on_nonfinite == 'stop':
    raise NonFiniteError(
        f'Non-finite loss or gradients at step {first_step + int(bad[0])}; the update was not '
        f'applied and training stopped. Last good checkpoint: '
        f'{"none yet" if last_checkpoint is None else f"step {last_checkpoint}"}. Lower '
        f'the learning rate, or set --config.on_nonfinite=skip to skip such steps.')
  if bad.size:
    logging.warning('Skipped %d non-finite steps (first: step %d).', bad.size,
                    first_step + int(bad[0]))
  return int(bad.size)


# The final summary of a run, in its workdir.
FINAL_METRICS_FILE = 'final_metrics.json'


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a training run will do, fixed before it starts (see `_set_up`)."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  data_parallel: parallel.DataParallel
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  streamed: bool  # The training batches depend on the process count (`DatasetInfo.streamed`).


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: epath.PathLike) -> tuple[TrainState, dict[str, Any]]:
  """Trains and evaluates per `config`, resuming from the newest checkpoint in `workdir`.

  A run without checkpoints starts from `config.init_from` when it is set. A workdir whose
  run has finished is left as it is: its state and final metrics are returned.

  Returns:
    The final host train state and the final metrics (also in WORKDIR/final_metrics.json).
  """
  start_time = time.time()
  plan = _set_up(config, workdir)
  manager = checkpointing.create_manager(plan.workdir / checkpointing.DIRECTORY,
                                         config.keep_checkpoints)
  with checkpointing.closing(manager):
    finished = _finished(plan, manager)
    if finished is not None:
      return finished
    config_checks.write_config(config, plan.workdir)
    parallel.sync_processes('config written')  # Other processes read it only after this.
    writer = reporting.MetricWriter(plan.workdir)
    state, meta = _restore_or_start(plan, manager, writer)
    with preemption.watch() as notice:
      loop = _Loop(plan, manager, writer, state, meta, started=start_time)
      loop.run(notice)
  return loop.finish(time.time() - start_time)


def _set_up(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> _Plan:
  """Checks the config, devices and workdir, and counts the steps; writes nothing."""
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(workdir)
  config_checks.validate(config)
  devices = parallel.select_devices(config.num_devices)
  parallel.per_device_batch_size(config.batch_size, len(devices), 'batch_size')
  parallel.per_device_batch_size(config.eval_batch_size, len(devices), 'eval_batch_size')
  config_checks.check_workdir(config, workdir)
  info = input_pipeline.get_dataset_info(config)
  steps_per_epoch = max(1, info.num_train_examples // config.batch_size)
  total_steps = optim.total_train_steps(config, steps_per_epoch)
  logging.info('%s: %d train / %d eval examples, %d steps per epoch, %d steps in all, on %d '
               'devices.', config.dataset, info.num_train_examples, info.num_eval_examples,
               steps_per_epoch, total_steps, len(devices) * jax.process_count())
  return _Plan(config=config, workdir=workdir,
               data_parallel=parallel.for_config(config),
               steps_per_epoch=steps_per_epoch,
               total_steps=total_steps,
               eval_every=max(1, int(config.eval_every_epochs * steps_per_epoch)),
               streamed=info.streamed)


def _finished(plan: _Plan, manager: Any) -> tuple[TrainState, dict[str, Any]] | None:
  """(state, final metrics) of a workdir whose run has ended, else None.

  Touches no file, unless its last checkpoint is damaged: that one is moved aside (see
  `checkpointing.restore_latest`) and the run is not finished any more.
  """
  path = plan.workdir / FINAL_METRICS_FILE
  latest = manager.latest_step()
  if latest is None or latest < plan.total_steps or not path.exists():
    return None
  final = json.loads(path.read_text())
  if final.get('step') != latest:
    return None  # Stopped after its last checkpoint, before its summary: finish it.
  state, _ = checkpointing.restore_latest(
      manager, zeros_state(plan.config), checkpointing.config_to_dict(plan.config),
      damaged_to=plan.workdir / checkpointing.DAMAGED_DIRECTORY)
  if int(state.step) != latest:
    return None
  logging.info('%s holds a finished run: step %d of %d, final eval top-1 %.4f (%s). Nothing '
               'to do; raise num_epochs or num_train_steps to train on.', plan.workdir, latest,
               plan.total_steps, final.get('eval_top1') or float('nan'), path)
  return state, final


def _restore_or_start(plan: _Plan, manager: Any, writer: reporting.MetricWriter
                      ) -> tuple[TrainState, dict[str, Any]]:
  """The newest readable checkpoint's (state, meta), or a fresh state and meta."""
  config = plan.config
  config_dict = checkpointing.config_to_dict(config)
  # The workdir's own checkpoints win over init_from: a rerun continues where it stopped.
  resuming = manager.latest_step() is not None
  state = create_train_state(config, jax.random.PRNGKey(config.seed),
                             None if resuming else config.init_from)
  restored = checkpointing.restore_latest(
      manager, state, config_dict, damaged_to=plan.workdir / checkpointing.DAMAGED_DIRECTORY)
  if restored is None:
    writer.write_text('config', str(config))
    model_summary = models.summary(create_model(config), config.image_size)
    writer.write_text('model', model_summary)
    if jax.process_index() == 0:
      (plan.workdir / 'model_summary.txt').write_text(model_summary)
    return state, {'config': config_dict, 'skipped_steps': 0,
                   'process_count': jax.process_count()}
  state, meta = restored
  _check_process_count(plan, meta.get('process_count'))
  logging.info('Resuming from the checkpoint at step %d.', int(state.step))
  # Every optimizer setting comes from the config in force (the learning rate is set by the
  # step itself); the checkpoint's own would otherwise win silently.
  state = state.replace(opt_state=optim.with_config_hyperparams(state.opt_state, config))
  return state, {**meta, 'config': config_dict, 'process_count': jax.process_count()}


def _check_process_count(plan: _Plan, saved: int | None) -> None:
  """Refuses to resume on another process count where that changes the batches to come.

  Streamed records are read per process (see input_pipeline), so a process count that differs
  from the checkpoint's would give another stream of examples from here on. A checkpoint
  from before the count was saved (None) passes.
  """
  now = jax.process_count()
  if not plan.streamed or saved in (None, now):
    return
  change = (f'{plan.workdir} was trained by {saved} processes, each reading its own share of '
            f'the {plan.config.dataset!r} records, and this run has {now}: every batch from '
            'here on differs from those of the run it resumes')
  if plan.config.allow_config_change:
    logging.warning('%s (allow_config_change).', change)
    return
  raise ValueError(f'{change}. Rerun with {saved} processes, or pass '
                   '--config.allow_config_change=True to go on with another stream.')


# What `_Loop` times (`reporting.TimeSpent`): from the start to the first step (reading the
# workdir, building the state and the input pipeline), the first step (its compilation
# included), the steps after it (waiting for each, and the logs), waiting for the next batch,
# evaluations (their compilation included) and saves.
_TIME_PARTS = ('setup', 'first_step', 'train_steps', 'input_wait', 'evaluation',
               'checkpoints')


class _Loop:
  """The step loop of one run and what happens at its logs, evaluations and saves."""

  def __init__(self, plan: _Plan, manager: Any, writer: reporting.MetricWriter,
               state: TrainState, meta: dict[str, Any], started: float):
    from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    config = plan.config
    self.plan, self.manager, self.writer, self.meta = plan, manager, writer, meta
    self.started, self.time_spent = started, reporting.TimeSpent()
    self.start_step = int(state.step)
    self.par = plan.data_parallel
    normalization = normalize.for_config(config)
    self.p_train_step = self.par.map(functools.partial(
        train_step, label_smoothing=config.label_smoothing, normalization=normalization,
        learning_rate_fn=optim.create_learning_rate_fn(config, plan.steps_per_epoch)),
                                     donate_state=True)
    self.p_eval_step = self.par.map(functools.partial(eval_step, normalization=normalization))
    self.train_batches = input_pipeline.create_train_iterator(
        config, start_step=self.start_step, process_index=jax.process_index(),
        process_count=jax.process_count())
    self.replicated = self.par.put_state(state)
    self.throughput = reporting.Throughput(self.start_step, plan.total_steps, config.batch_size)
    self.pending, self.pending_from = [], self.start_step
    self.summary, self.eval_metrics = {}, {}
    self.step_drops = ({int(e * plan.steps_per_epoch) for e in config.step_epochs}
                       if config.lr_schedule == 'step' else set())

  def run(self, notice: preemption.Notice) -> None:
    """Steps to the end of the run; raises `Preempted` after saving when `notice` says so."""
    plan, config = self.plan, self.plan.config
    self.time_spent.seconds['setup'] = time.time() - self.started
    if self.meta.pop('eval_pending', False) and not self._evaluate(self.start_step, notice):
      raise Preempted(self.start_step)  # Preempted again during the same evaluation.
    batches = self.par.prefetch(self.train_batches, config.prefetch_to_device)
    for step in range(self.start_step + 1, plan.total_steps + 1):
      # The step before this one is still running here: a wait means input came slower.
      with self.time_spent('input_wait'):
        batch = next(batches)
      first = step == self.start_step + 1
      with self.time_spent('first_step' if first else 'train_steps'):
        self._step(batch, first)
      stop = notice.reached()
      is_eval = step % plan.eval_every == 0 or step == plan.total_steps
      if step in self.step_drops:
        self.writer.write(step, 'lr_drop', {'scale': config.plateau_factor})
      if step % config.log_every_steps == 0 or is_eval or stop:
        with self.time_spent('train_steps'):  # It waits for the last step's metrics.
          self._log_train(step)
      if is_eval and not stop:
        stop = not self._evaluate(step, notice)
      elif is_eval or stop or step % config.checkpoint_every_steps == 0:
        self._save(eval_pending=is_eval)
      if stop:
        checkpointing.wait(self.manager)
        raise Preempted(step)

  def _step(self, batch: Any, first: bool) -> None:
    """Dispatches a train step; waits for the one before it (the `first`: for itself, and
    so for its compilation)."""
    self.replicated, metrics = self.p_train_step(self.replicated, batch)
    if first:
      host_memory.release_freed(after=metrics)  # What compiling freed: hundreds of MiB.
    self.pending.append(metrics)
    if len(self.pending) > 1:
      # At most one step queued behind the running one: without this, dispatch runs up to
      # log_every_steps ahead, and a preemption waits for all of them before the save.
      jax.block_until_ready(self.pending[-2])

  def _log_train(self, step: int) -> None:
    """Checks and writes the train metrics of the steps since the last log."""
    host = [self.par.get(m) for m in self.pending]
    self.meta['skipped_steps'] += _check_finite(host, self.pending_from + 1, self.plan.config,
                                                self.manager.latest_step())
    self.summary = {k: float(np.mean([m[k] for m in host])) for k in ('loss', 'top1', 'top5')}
    self.summary.update(learning_rate=float(host[-1]['learning_rate']),
                        epoch=step / self.plan.steps_per_epoch, **self.throughput.report(step))
    self.writer.write(step, 'train', self.summary)
    self.pending, self.pending_from = [], step

  def _evaluate(self, step: int, notice: preemption.Notice) -> bool:
    """Evaluates, runs the plateau rule, plots and saves; False if `notice` cut it short
    (then the state is saved to be evaluated on resume)."""
    config = self.plan.config
    with self.time_spent('evaluation'):
      metrics = evaluate(self.p_eval_step, self.replicated, config, self.par, notice=notice)
    if metrics is None:
      logging.warning('Preempted during the evaluation of step %d: it runs again on resume.',
                      step)
      self._save(eval_pending=True)
      return False
    self.eval_metrics = metrics
    self.writer.write(step, 'eval', {k: metrics[k] for k in ('loss', 'top1', 'top5')})
    if metrics['top1'] > self.meta.get('best_eval_top1', -1.0):
      self.meta.update(best_eval_top1=metrics['top1'], best_eval_top5=metrics['top5'])
    plateau, dropped = optim.update_plateau(
        self.par.get(self.replicated.plateau), metrics['top1'], config)
    if dropped:
      logging.info('Validation top-1 stopped improving: learning rate x%g at step %d.',
                   config.plateau_factor, step)
      self.writer.write(step, 'lr_drop', {'scale': float(plateau.scale)})
    self.replicated = self.replicated.replace(plateau=self.par.put_state(plateau))
    if jax.process_index() == 0:
      plots.plot_learning_curves(reporting.read_history(self.plan.workdir),
                                 self.plan.workdir / 'curves.png', self.plan.steps_per_epoch)
    self._save(metrics['top1'])
    return True

  def _save(self, eval_top1: float | None = None, eval_pending: bool = False) -> None:
    """Saves the state; `eval_pending`: its step's evaluation is still to run (on resume)."""
    with self.time_spent('checkpoints'):
      state = self.par.get(self.replicated)
      if eval_pending and int(state.step) in self.manager.all_steps():
        return  # Preempted again before evaluating this restored state: saved as it is.
      meta = {**self.meta, 'eval_pending': True} if eval_pending else self.meta
      checkpointing.save(self.manager, state, meta, eval_top1)

  def _time_report(self, wall_time_s: float) -> dict[str, float]:
    """Seconds of this run (since it started or resumed) per part, logged; 'other' is the
    rest of the wall time: plots, the last save's wait, the summary."""
    parts = {part: self.time_spent.seconds[part] for part in _TIME_PARTS}
    parts['other'] = wall_time_s - sum(parts.values())
    logging.info('Where the %.0f s went: %s.', wall_time_s,
                 ', '.join(f'{part} {seconds:.1f} s' for part, seconds in parts.items()))
    return {part: round(seconds, 2) for part, seconds in parts.items()}

  def finish(self, wall_time_s: float) -> tuple[TrainState, dict[str, Any]]:
    """The final state and metrics; writes final_metrics.json (process 0)."""
    state = self.par.get(self.replicated)
    run, meta, eval_metrics = self.plan, self.meta, self.eval_metrics
    final = {'step': int(state.step), 'epoch': int(state.step) / run.steps_per_epoch,
             'train_loss': self.summary.get('loss'), 'eval_loss': eval_metrics.get('loss'),
             'eval_top1': eval_metrics.get('top1'), 'eval_top5': eval_metrics.get('top5'),
             'eval_crops': eval_metrics.get('crops'),
             'best_eval_top1': meta.get('best_eval_top1'),
             'best_eval_top5': meta.get('best_eval_top5'), 'skipped_steps': meta['skipped_steps'],
             # Since this run started (not before a resume); includes the prefetched batches.
             'skipped_train_images': parallel.sum_over_processes(self.train_batches.num_skipped),
             'skipped_eval_images': eval_metrics.get('skipped_images', 0),
             'wall_time_s': wall_time_s, 'time_s': self._time_report(wall_time_s)}
    if final['skipped_train_images'] or final['skipped_eval_images']:
      logging.warning('Skipped %d undecodable training images and %d in the last evaluation '
                      '(each named in the log).', final['skipped_train_images'],
                      final['skipped_eval_images'])
    if jax.process_index() == 0:
      (run.workdir / FINAL_METRICS_FILE).write_text(json.dumps(final, indent=2))
    return state, final
