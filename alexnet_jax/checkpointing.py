"""Orbax checkpoints of the train state: save, keep the last K plus the best, restore safely.

A checkpoint holds two items: 'state' (the whole `TrainState` as a host pytree: params,
optimizer state, step, dropout key, plateau schedule) and 'meta' (JSON: the config it was
written with and run counters). The data position is the step itself: the input pipeline
reproduces the stream from any step (see `input_pipeline.create_train_iterator`).

Orbax writes each step into a temporary directory and renames it when complete, so a save cut
short by a crash is never listed. A listed checkpoint whose files were damaged later fails to
restore; `restore_latest` then falls back to the next older one, says which it skipped and,
in a training run, moves the damaged one aside (`DAMAGED_DIRECTORY`) so that it is no longer
the latest and its step can be saved again. A checkpoint unreadable for another reason
(permissions, a file system that is down) stops the run and changes nothing.
"""

from collections.abc import Iterator, Mapping
import contextlib
import itertools
import json
import logging as logging_std
import sys
from typing import Any

from absl import logging
from etils import epath
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from alexnet_jax import config_fields

# The subdirectory of a workdir that holds its checkpoints.
DIRECTORY = 'checkpoints'
# How long a process waits in one of a save's barriers (JAX's coordination service) for the
# others of its job. Orbax's default is 20 minutes, but JAX's heartbeat timeout ends a process
# that waits for a lost peer sooner, in C++ (an abort and a stack trace): under it, the wait
# ends in a Python error that `cli.user_errors` turns into one line. Half a minute is far more
# than processes writing AlexNet's state (under 1 GB) differ by (reasoned, not measured on a
# cluster); a save waits in up to two barriers in turn, and `cli` sets the heartbeat timeout
# to four times this.
BARRIER_TIMEOUT_S = 30

# The key of the value saved with a checkpoint that ranks it for `BestN` and `best_step`: the
# run's config.best_metric (validation top-1 by default; runs from before the field saved it
# under this name).
_BEST_METRIC = 'eval_top1'


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or used; the message says why and what to do."""


def _eval_top1(metrics: Mapping[str, float]) -> float:
  return metrics[_BEST_METRIC]


def create_manager(directory: epath.PathLike, keep: int, async_save: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A manager keeping the `keep` latest checkpoints plus the best by config.best_metric.

  read_only: for readers beside a training run; such a manager creates, cleans up and
  deletes nothing, so the run's save in progress (a temporary directory) is left alone. A
  writer first puts back a checkpoint whose replacement never completed (see `save`).
  """
  if not read_only:
    _recover_replaced(epath.Path(directory))
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=_eval_top1, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  # Orbax writes a save's metrics, and ranks by them in `best_step`, only when best_fn is set;
  # without it BestN sees no metrics and the best checkpoint is deleted like any other.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=_eval_top1, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only,
      save_interval_steps=0 if read_only else 1,
      async_options=ocp.AsyncOptions(timeout_secs=BARRIER_TIMEOUT_S))
  return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options,
                               item_names=('state', 'meta'))


def save(manager: ocp.CheckpointManager, state: Any, meta: Mapping[str, Any],
         best_metric: float | None = None) -> None:
  """Starts saving `state` (host or first-replica pytree) at its step; refuses non-finite params.

  best_metric: config.best_metric's value at this step (higher is better), where measured.

  A step saved before (when a preemption cut its evaluation short) is saved again with the
  evaluation: its old copy is moved aside, not deleted, until the new one is complete, so a
  kill at any moment leaves one complete checkpoint of the step (`_recover_replaced`).

  Raises:
    CheckpointError: the params hold NaN/Inf (the previous checkpoints are kept as they are),
      or the previous asynchronous save failed (disk full, permissions).
  """
  step = int(state.step)
  if not all(np.isfinite(x).all() for x in jax.tree.leaves(state.params)):
    raise CheckpointError(f'Refusing to checkpoint step {step}: the parameters are not finite. '
                          f'Last good checkpoint: {manager.latest_step()}.')
  aside = _move_to_replace(manager, step) if step in manager.all_steps() else None
  state_dict = _as_arrays(state)
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_dict), meta=ocp.args.JsonSave(dict(meta))),
                 metrics=None if best_metric is None else {_BEST_METRIC: best_metric}, force=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, e) from e
  if aside is not None:
    wait(manager)  # Rare (a re-run evaluation): the old copy goes only once the new is whole.
    if jax.process_index() == 0:
      aside.rmtree()


# The suffix of a checkpoint moved aside while its step is saved again; Orbax lists only
# whole numbers, so it is no step of the manager's.
_REPLACED = '.replaced'


def _move_to_replace(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves checkpoint `step` to <step>.replaced (process 0; the others wait); returns where."""
  directory = epath.Path(manager.directory)
  aside = directory / f'{step}{_REPLACED}'
  if jax.process_index() == 0:
    (directory / str(step)).rename(aside)
  ocp.multihost.sync_global_processes(f'alexnet_jax: checkpoint {step} set aside')
  manager.reload()
  return aside


def _recover_replaced(directory: epath.Path) -> None:
  """Drops each <step>.replaced whose new <step> is complete, and puts back the others
  (process 0; the others wait). Orbax renames a save into <step> only once it is whole."""
  if jax.process_index() == 0 and directory.is_dir():
    for aside in directory.glob(f'*{_REPLACED}'):
      replacement = directory / aside.name[:-len(_REPLACED)]
      if replacement.exists():
        aside.rmtree()
      else:
        logging.warning('The replacement of checkpoint %s did not complete: the one it was to '
                        'replace is back.', replacement)
        aside.rename(replacement)
  ocp.multihost.sync_global_processes('alexnet_jax: replaced checkpoints recovered')


def _as_arrays(state: Any) -> Any:
  """The state as a nested dict of numpy arrays (0-d for scalars), as Orbax wants it."""
  return jax.tree.map(np.asarray, flax.serialization.to_state_dict(state))


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until pending saves are on disk; raises `CheckpointError` if one failed."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, e) from e


def _save_error(manager: ocp.CheckpointManager, error: Exception) -> CheckpointError:
  return CheckpointError(
      f'Saving a checkpoint in {manager.directory} failed: {type(error).__name__}: {error}. '
      f'Check free disk space and write permission there. The previous checkpoints are intact '
      f'(latest: step {manager.latest_step()}).')


def check_compatible(saved_config: Mapping[str, Any], config: Mapping[str, Any],
                     directory: Any) -> None:
  """Raises `CheckpointError` naming each state-defining field (`config_fields`) that differs.

  Orbax restores a saved array of another shape into the target without complaint, so this
  is the only guard before a Flax shape error far from the cause.
  """
  saved = config_fields.flatten(config_fields.with_added_defaults(dict(saved_config)))
  now = config_fields.flatten(config_fields.with_added_defaults(dict(config)))
  differences = [f'{f}: checkpoint {saved.get(f)!r}, this run {now.get(f)!r}'
                 for f in config_fields.STATE_DEFINING if saved.get(f) != now.get(f)]
  if differences:
    raise CheckpointError(
        f'The checkpoints in {directory} belong to a different model or optimizer '
        f'({"; ".join(differences)}). Use a fresh --workdir, or set the fields back.')


class _Unreadable(Exception):
  """A listed checkpoint that cannot be read; the message says how it failed.

  damaged: its files are missing or broken (as opposed to unreadable for now: permissions,
    an unavailable file system), so it can never be read and may be moved aside.
  """

  def __init__(self, error: Exception):
    super().__init__(f'{type(error).__name__}: {str(error)[:200]}')
    self.damaged = _means_damage(error)


# Errors that say nothing about the files themselves: they may read fine later or elsewhere.
_TRANSIENT_STATUSES = ('PERMISSION_DENIED', 'UNAVAILABLE', 'DEADLINE_EXCEEDED',
                       'RESOURCE_EXHAUSTED', 'UNAUTHENTICATED', 'ABORTED')


def _means_damage(error: Exception) -> bool:
  """Whether a restore error means damaged files (measured with Orbax 0.12.8: a deleted item
  or array gives KeyError / FileNotFoundError, truncated metadata a JSONDecodeError, truncated
  array data a ValueError from TensorStore carrying its status text)."""
  if isinstance(error, (PermissionError, TimeoutError, ConnectionError)):
    return False
  if isinstance(error, (KeyError, FileNotFoundError, ValueError)):
    return not any(status in str(error) for status in _TRANSIENT_STATUSES)
  return False


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any,
                  config: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(state, meta) of checkpoint `step`; raises `_Unreadable` if its files cannot be read."""
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # pylint: disable=broad-except
    raise _Unreadable(e) from e
  check_compatible(meta.get('config', {}), config, manager.directory)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_as_arrays(target))))['state']
    return flax.serialization.from_state_dict(target, restored), meta
  except Exception as e:  # pylint: disable=broad-except
    raise _Unreadable(e) from e


def restore_latest(manager: ocp.CheckpointManager, target: Any, config: Mapping[str, Any],
                   damaged_to: epath.PathLike | None = None
                   ) -> tuple[Any, dict[str, Any]] | None:
  """Restores the newest readable checkpoint into the structure of `target`.

  Args:
    manager: from `create_manager`.
    target: a host `TrainState` of the run's config (shapes and dtypes to restore into).
    config: the run's config as a dict, checked against the one saved with the checkpoint.
    damaged_to: where a training run moves damaged checkpoints (`damaged_to`/<step>), so that
      they are no longer the latest and their steps can be saved again; None (readers) leaves
      them in place.
  Returns:
    (state, meta) of the newest checkpoint that restores, or None when there is none.
  Raises:
    CheckpointError: the checkpoints belong to another model/optimizer, one cannot be read
      for a reason that is not damage (nothing is moved then), or none is readable.
  """
  _drop_closed_loop_callbacks()
  _drop_orphaned_read_errors()
  manager.reload()
  skipped = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = _restore_step(manager, step, target, config)
    except _Unreadable as e:
      if not e.damaged:
        raise CheckpointError(
            f'The checkpoint of step {step} in {manager.directory} cannot be read now ({e}); '
            'nothing was changed. Fix the cause (permissions, the file system) and rerun.'
        ) from e
      where = _move_aside(manager, step, damaged_to)
      logging.warning('Skipped damaged checkpoint step %d in %s (%s)%s', step,
                      manager.directory, e, f'; moved to {where}' if where else '')
      skipped.append(f'step {step} ({e})')
      continue
    return restored
  if skipped:
    moved = f' They were moved to {damaged_to}.' if damaged_to else ''
    raise CheckpointError(
        f'No checkpoint in {manager.directory} could be read: {"; ".join(skipped)}.{moved} '
        'Rerun to start afresh, or restore them from a backup.')
  return None


def _drop_closed_loop_callbacks() -> None:
  """Keeps the aftermath of a failed restore off stderr.

  When one array of a damaged checkpoint fails, Orbax closes its event loop while TensorStore
  still finishes the other reads; their callbacks then raise "Event loop is closed" in
  TensorStore's threads, each printed as a traceback (dozens, measured) through
  `sys.unraisablehook`. Those, and only those, are dropped; every other one is printed.
  The filter goes in before the first read: the late callbacks can arrive while the failed
  restore is still unwinding (seen on the CI machine), before any handler of ours runs.
  """
  hook = sys.unraisablehook
  if getattr(hook, 'drops_closed_loop_callbacks', False):
    return

  def filtered(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
      hook(unraisable)
  filtered.drops_closed_loop_callbacks = True
  sys.unraisablehook = filtered


class _OrphanedReadErrors(logging_std.Filter):
  """Drops asyncio's "Task exception was never retrieved" for errors that mean damage.

  The reads of a failed restore that Orbax no longer awaits end in tasks whose errors asyncio
  logs, with a traceback, when the task is collected: the same damage `restore_latest` has
  already reported in one line (seen once in a full test run, dependent on collection timing).
  """

  def filter(self, record: logging_std.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (record.getMessage().startswith('Task exception was never retrieved')
                and isinstance(error, Exception) and _means_damage(error))


def _drop_orphaned_read_errors() -> None:
  """Installs `_OrphanedReadErrors` on asyncio's logger, once."""
  logger = logging_std.getLogger('asyncio')
  if not any(isinstance(f, _OrphanedReadErrors) for f in logger.filters):
    logger.addFilter(_OrphanedReadErrors())


# Where a training run's damaged checkpoints go: beside `DIRECTORY`, in its workdir.
DAMAGED_DIRECTORY = 'checkpoints-damaged'


def _move_aside(manager: ocp.CheckpointManager, step: int,
                damaged_to: epath.PathLike | None) -> epath.Path | None:
  """Moves checkpoint `step` to `damaged_to`/<step>[.N] (process 0; the others wait)."""
  if damaged_to is None:
    return None
  target = epath.Path(damaged_to) / str(step)
  for n in itertools.count(1):
    if not target.exists():
      break
    target = epath.Path(damaged_to) / f'{step}.{n}'
  # Every process has named the same target before process 0 makes it exist.
  ocp.multihost.sync_global_processes(f'alexnet_jax: checkpoint {step} found damaged')
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    (epath.Path(manager.directory) / str(step)).rename(target)
  ocp.multihost.sync_global_processes(f'alexnet_jax: checkpoint {step} moved aside')
  manager.reload()
  return target


@contextlib.contextmanager
def closing(manager: ocp.CheckpointManager) -> Iterator[ocp.CheckpointManager]:
  """Waits for pending saves and closes `manager` on every way out of the block.

  On the way out of an error the error stays the one reported: a failing save is logged in
  one line, and no background save outlives the manager (its threads would otherwise die
  with the interpreter, in dozens of tracebacks).
  """
  try:
    yield manager
  except BaseException:
    try:
      manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error('A pending checkpoint save failed too: %s: %s', type(e).__name__, e)
    raise
  try:
    wait(manager)
  finally:
    manager.close()


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The step saved with the highest config.best_metric (ties: the newest), None if none has
  one.

  The same step that `create_manager`'s `BestN` keeps.
  """
  scored = [(metrics[_BEST_METRIC], step) for step in manager.all_steps()
            if (metrics := manager.metrics(step))]
  return max(scored)[1] if scored else None


def parse_checkpoint(name: str) -> int | str:
  """'latest', 'best' or a step number (int) from its text; raises ValueError otherwise."""
  if name in ('latest', 'best'):
    return name
  if name.isdigit():
    return int(name)
  raise ValueError(f"No checkpoint is called {name!r}: name a step number, 'best' or 'latest'.")


def restore(manager: ocp.CheckpointManager, target: Any, config: Mapping[str, Any],
            which: int | str = 'latest') -> tuple[Any, dict[str, Any]]:
  """Restores the checkpoint that `which` names into the structure of `target`.

  Args:
    manager: from `create_manager`.
    target: see `restore_latest`.
    config: see `restore_latest`.
    which: a step number, 'latest' (the newest readable, see `restore_latest`) or 'best'
      (see `best_step`), or its text (see `parse_checkpoint`).
  Returns:
    (state, meta) of that checkpoint.
  Raises:
    CheckpointError: there is no such checkpoint, it cannot be read, or it belongs to another
      model/optimizer.
    ValueError: `which` names no checkpoint.
  """
  which = parse_checkpoint(str(which))
  if which == 'latest':
    restored = restore_latest(manager, target, config)
    if restored is None:
      raise _no_checkpoint_error(manager)
    return restored
  manager.reload()
  steps = sorted(manager.all_steps())
  if not steps:
    raise _no_checkpoint_error(manager)
  step = best_step(manager) if which == 'best' else which
  if step is None:
    raise CheckpointError(f'No checkpoint in {manager.directory} was saved with an evaluation, '
                          f'so none is the best; its steps are {steps}.')
  if step not in steps:
    raise CheckpointError(f'No checkpoint of step {step} in {manager.directory}; its steps are '
                          f'{steps}.')
  try:
    return _restore_step(manager, step, target, config)
  except _Unreadable as e:
    raise CheckpointError(f'The checkpoint of step {step} in {manager.directory} cannot be '
                          f'read ({e}); its other steps are {[s for s in steps if s != step]}.'
                          ) from e


def _no_checkpoint_error(manager: ocp.CheckpointManager) -> CheckpointError:
  return CheckpointError(f'No checkpoint in {manager.directory}: train first, or pass the '
                         'workdir of a training run.')


def read_params(directory: epath.PathLike,
                best: bool = False) -> tuple[int, dict[str, Any], dict[str, Any]]:
  """The params of one checkpoint, without the rest of the train state (export, fine-tuning).

  Needs no model or config: the arrays come back as saved, whatever their shapes.

  Args:
    directory: a training workdir, its checkpoints/ directory, or one step's directory in it.
    best: the checkpoint of `best_step` instead of the latest (ignored for a step's directory).
  Returns:
    (step, params as nested dicts of numpy arrays {'conv1': {'kernel': [11, 11, 3, 96], ...},
    ...}, the meta saved with them: {'config': {...}, ...}).
  Raises:
    CheckpointError: there is no such checkpoint.
  """
  directory = epath.Path(directory)
  if (directory / DIRECTORY).is_dir():
    directory = directory / DIRECTORY
  step = None
  if directory.name.isdigit() and (directory / 'state').is_dir():
    directory, step = directory.parent, int(directory.name)
  # The workdir may belong to a run still writing to it; `keep` matters only to writers.
  manager = create_manager(directory, keep=1, read_only=True)
  try:
    if step is None:
      step = best_step(manager) if best else manager.latest_step()
    if step is None:
      raise CheckpointError(
          f'No {"evaluated " if best else ""}checkpoint in {directory}: is it a training workdir?')
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return step, restored['state']['params'], restored['meta']


def config_to_dict(config: Any) -> dict[str, Any]:
  """A JSON-safe dict of an ml_collections config (tuples become lists)."""
  return json.loads(config.to_json_best_effort())
