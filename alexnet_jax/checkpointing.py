"""Orbax checkpoints of the train state: save, keep the last K plus the best, restore safely.

A checkpoint holds two items: 'state' (the whole `TrainState` as a host pytree: params,
optimizer state, step, dropout key, plateau schedule) and 'meta' (JSON: the config it was
written with and run counters). The data position is the step itself: the input pipeline
reproduces the stream from any step (see `input_pipeline.create_train_iterator`).

Orbax writes each step into a temporary directory and renames it when complete, so a save cut
short by a crash is never listed. A listed checkpoint whose files were damaged later fails to
restore; `restore_latest` then falls back to the next older one and says which it skipped.
"""

from collections.abc import Mapping
import json
import pathlib
from typing import Any

from absl import logging
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# The subdirectory of a workdir that holds its checkpoints.
DIRECTORY = 'checkpoints'
# Config fields that change the shape or meaning of the saved state: a checkpoint written with
# other values cannot be resumed (see `check_compatible`).
_STATE_DEFINING_FIELDS = ('num_classes', 'model.variant', 'optimizer', 'image_size')
# The metric saved with a checkpoint that ranks it for `BestN` and `best_step`.
_BEST_METRIC = 'eval_top1'


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or used; the message says why and what to do."""


def _eval_top1(metrics: Mapping[str, float]) -> float:
  return metrics[_BEST_METRIC]


def create_manager(directory: str | pathlib.Path, keep: int, async_save: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A manager keeping the `keep` latest checkpoints plus the best by 'eval_top1'.

  read_only: for readers beside a training run; such a manager creates, cleans up and
  deletes nothing, so the run's save in progress (a temporary directory) is left alone.
  """
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
      save_interval_steps=0 if read_only else 1)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                               item_names=('state', 'meta'))


def save(manager: ocp.CheckpointManager, state: Any, meta: Mapping[str, Any],
         eval_top1: float | None = None) -> None:
  """Starts saving `state` (host or first-replica pytree) at its step; refuses non-finite params.

  Raises:
    CheckpointError: the params hold NaN/Inf (the previous checkpoints are kept as they are),
      or the previous asynchronous save failed (disk full, permissions).
  """
  step = int(state.step)
  if not all(np.isfinite(x).all() for x in jax.tree.leaves(state.params)):
    raise CheckpointError(f'Refusing to checkpoint step {step}: the parameters are not finite. '
                          f'Last good checkpoint: {manager.latest_step()}.')
  state_dict = _as_arrays(state)
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_dict), meta=ocp.args.JsonSave(dict(meta))),
                 metrics=None if eval_top1 is None else {_BEST_METRIC: eval_top1}, force=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, e) from e


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
  """Raises `CheckpointError` naming each state-defining field that differs."""
  def get(cfg, dotted):
    for key in dotted.split('.'):
      cfg = cfg.get(key) if isinstance(cfg, Mapping) else None
    return cfg
  differences = [f'{f}: checkpoint {get(saved_config, f)!r}, this run {get(config, f)!r}'
                 for f in _STATE_DEFINING_FIELDS if get(saved_config, f) != get(config, f)]
  if differences:
    raise CheckpointError(
        f'The checkpoints in {directory} belong to a different model or optimizer '
        f'({"; ".join(differences)}). Use a fresh --workdir, or set the fields back.')


class _Unreadable(Exception):
  """A listed checkpoint whose files cannot be read; the message says how it failed."""


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any,
                  config: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(state, meta) of checkpoint `step`; raises `_Unreadable` if its files are damaged."""
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # pylint: disable=broad-except
    raise _Unreadable(f'{type(e).__name__}: {str(e)[:200]}') from e
  check_compatible(meta.get('config', {}), config, manager.directory)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_as_arrays(target))))['state']
    return flax.serialization.from_state_dict(target, restored), meta
  except Exception as e:  # pylint: disable=broad-except
    raise _Unreadable(f'{type(e).__name__}: {str(e)[:200]}') from e


def restore_latest(manager: ocp.CheckpointManager, target: Any,
                   config: Mapping[str, Any]) -> tuple[Any, dict[str, Any]] | None:
  """Restores the newest readable checkpoint into the structure of `target`.

  Args:
    manager: from `create_manager`.
    target: a host `TrainState` of the run's config (shapes and dtypes to restore into).
    config: the run's config as a dict, checked against the one saved with the checkpoint.
  Returns:
    (state, meta) of the newest checkpoint that restores, or None when there is none.
  Raises:
    CheckpointError: the checkpoints belong to another model/optimizer, or none is readable.
  """
  manager.reload()
  steps = sorted(manager.all_steps(), reverse=True)
  skipped = []
  for step in steps:
    try:
      restored = _restore_step(manager, step, target, config)
    except _Unreadable as e:
      skipped.append(f'step {step} ({e})')
      continue
    for message in skipped:
      logging.warning('Skipped damaged checkpoint %s in %s', message, manager.directory)
    return restored
  if skipped:
    raise CheckpointError(
        f'No checkpoint in {manager.directory} could be read: {"; ".join(skipped)}. Move the '
        f'directory away to start afresh, or restore it from a backup.')
  return None


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The step saved with the highest eval top-1 (ties: the newest), None if none has one.

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


def read_params(directory: str | pathlib.Path,
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
  directory = pathlib.Path(directory)
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
