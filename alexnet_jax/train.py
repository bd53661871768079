"""The training loop: a config and a workdir in, a trained state and its metrics out.

    from alexnet_jax import train
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    state, metrics = train.train_and_evaluate(config, workdir)

The loop joins what other modules make: the train state (`train_state`), the per-device steps
(`steps`), the input pipeline, the evaluators (`evaluators`), checkpoints and metrics. TensorFlow
(tf.data) is imported only when data is read.
"""

import dataclasses
import functools
import json
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from alexnet_jax import checkpointing
from alexnet_jax import config_checks
from alexnet_jax import evaluators
from alexnet_jax import host_memory
from alexnet_jax import models
from alexnet_jax import normalize
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import plots
from alexnet_jax import preemption
from alexnet_jax import reporting
from alexnet_jax import steps
from alexnet_jax import train_state
from alexnet_jax.train_state import TrainState

# Users build the state through the trainer's module (README, "From Python").
create_train_state = train_state.create_train_state


class NonFiniteError(RuntimeError):
  """The loss or the gradients stopped being finite (see `config.on_nonfinite`)."""


class Preempted(Exception):
  """SIGTERM arrived; the run saved a checkpoint of `step` and stopped. Rerun to resume."""

  def __init__(self, step: int):
    super().__init__(f'Preempted: checkpoint of step {step} saved. Run the same command to '
                     f'resume.')
    self.step = step


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
  evaluators.check(config)
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
      manager, train_state.zeros_state(plan.config), checkpointing.config_to_dict(plan.config),
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
  state = train_state.create_train_state(config, jax.random.PRNGKey(config.seed),
                                         None if resuming else config.init_from)
  restored = checkpointing.restore_latest(
      manager, state, config_dict, damaged_to=plan.workdir / checkpointing.DAMAGED_DIRECTORY)
  if restored is None:
    writer.write_text('config', str(config))
    model_summary = models.summary(train_state.create_model(config), config.image_size)
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
        steps.train_step, label_smoothing=config.label_smoothing, normalization=normalization,
        learning_rate_fn=optim.create_learning_rate_fn(config, plan.steps_per_epoch)),
                                     donate_state=True)
    self.evaluators = evaluators.create(config, self.par, self.par.map(
        functools.partial(steps.eval_step, normalization=normalization)))
    self.train_batches = input_pipeline.create_train_iterator(
        config, start_step=self.start_step, process_index=jax.process_index(),
        process_count=jax.process_count())
    self.replicated = self.par.put_state(state)
    self.throughput = reporting.Throughput(self.start_step, plan.total_steps, config.batch_size)
    self.pending, self.pending_from = [], self.start_step
    self.summary, self.eval_metrics = {}, {}  # eval_metrics: each evaluator's latest.
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
      is_eval = bool(self._due(step))
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

  def _due(self, step: int) -> list[str]:
    """The evaluators that run after `step`."""
    return evaluators.due(self.evaluators, step, self.plan.steps_per_epoch,
                          self.plan.total_steps)

  def _evaluate(self, step: int, notice: preemption.Notice) -> bool:
    """Runs the evaluators due, the plateau rule, plots and saves; False if `notice` cut it
    short (then the state is saved to be evaluated on resume)."""
    results = {}
    with self.time_spent('evaluation'):
      for name in self._due(step):
        results[name] = self.evaluators[name].run(self.replicated, notice)
        if results[name] is None:
          logging.warning('Preempted during the evaluation of step %d: it runs again on '
                          'resume.', step)
          self._save(eval_pending=True)
          return False
    best = self._record_eval(step, results)
    if best is not None:
      self._run_plateau_rule(step, best)
    self._plot()
    self._save(best)
    return True

  def _record_eval(self, step: int, results: dict[str, dict[str, Any]]) -> float | None:
    """Writes each evaluator's scalars, keeps the best so far; returns config.best_metric
    (None where its evaluator did not run at `step`)."""
    for name, metrics in results.items():
      self.writer.write(step, name, evaluators.scalars(self.evaluators[name], metrics))
    self.eval_metrics.update(results)
    primary = results.get(evaluators.PRIMARY)
    if primary and primary['top1'] > self.meta.get('best_eval_top1', -1.0):
      self.meta.update(best_eval_top1=primary['top1'], best_eval_top5=primary['top5'])
    best_name, _, metric = self.plan.config.best_metric.partition('/')
    if best_name not in results:
      return None
    value = results[best_name][metric]
    # A checkpoint from before best_metric existed ranked by validation top-1: its best.
    before = (self.meta.get('best_eval_top1', -1.0)
              if self.plan.config.best_metric == evaluators.DEFAULT_BEST_METRIC else -1.0)
    self.meta['best_metric_value'] = max(value, self.meta.get('best_metric_value', before))
    return value

  def _run_plateau_rule(self, step: int, value: float) -> None:
    """The paper's rule: the learning rate drops when config.best_metric (validation top-1
    in the paper) stops improving."""
    config = self.plan.config
    plateau, dropped = optim.update_plateau(
        self.par.get(self.replicated.plateau), value, config)
    if dropped:
      logging.info('%s stopped improving: learning rate x%g at step %d.', config.best_metric,
                   config.plateau_factor, step)
      self.writer.write(step, 'lr_drop', {'scale': float(plateau.scale)})
    self.replicated = self.replicated.replace(plateau=self.par.put_state(plateau))

  def _plot(self) -> None:
    """Redraws WORKDIR/curves.png from the metric history (process 0)."""
    if jax.process_index() == 0:
      plots.plot_learning_curves(reporting.read_history(self.plan.workdir),
                                 self.plan.workdir / 'curves.png', self.plan.steps_per_epoch)

  def _save(self, best_metric: float | None = None, eval_pending: bool = False) -> None:
    """Saves the state with config.best_metric's value, where measured; `eval_pending`: its
    step's evaluation is still to run (on resume)."""
    with self.time_spent('checkpoints'):
      state = self.par.get(self.replicated)
      if eval_pending and int(state.step) in self.manager.all_steps():
        return  # Preempted again before evaluating this restored state: saved as it is.
      meta = {**self.meta, 'eval_pending': True} if eval_pending else self.meta
      checkpointing.save(self.manager, state, meta, best_metric)

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
    run, meta = self.plan, self.meta
    eval_metrics = self.eval_metrics.get(evaluators.PRIMARY, {})
    final = {'step': int(state.step), 'epoch': int(state.step) / run.steps_per_epoch,
             'train_loss': self.summary.get('loss'), 'eval_loss': eval_metrics.get('loss'),
             'eval_top1': eval_metrics.get('top1'), 'eval_top5': eval_metrics.get('top5'),
             'eval_crops': eval_metrics.get('crops'),
             'best_eval_top1': meta.get('best_eval_top1'),
             'best_eval_top5': meta.get('best_eval_top5'),
             'best_metric': run.config.best_metric,
             'best_metric_value': meta.get('best_metric_value'),
             'evaluators': {name: evaluators.scalars(self.evaluators[name], metrics)
                            for name, metrics in self.eval_metrics.items()},
             'skipped_steps': meta['skipped_steps'],
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
