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

# Config fields that change the shape or meaning of the saved state: a checkpoint written with
# other values cannot be resumed (see `check_compatible`).
_STATE_DEFINING_FIELDS = ('num_classes', 'model.variant', 'optimizer', 'image_size')


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or used; the message says why and what to do."""


def create_manager(directory: str | pathlib.Path, keep: int,
                   async_save: bool = True) -> ocp.CheckpointManager:
  """A manager keeping the `keep` latest checkpoints plus the best by 'eval_top1'."""
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m['eval_top1'], n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
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
                 metrics=None if eval_top1 is None else {'eval_top1': eval_top1}, force=True)
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
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except
      skipped.append(f'step {step} ({type(e).__name__}: {e})')
      continue
    check_compatible(meta.get('config', {}), config, manager.directory)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_as_arrays(target))))['state']
      state = flax.serialization.from_state_dict(target, restored)
    except Exception as e:  # pylint: disable=broad-except
      skipped.append(f'step {step} ({type(e).__name__}: {str(e)[:200]})')
      continue
    for message in skipped:
      logging.warning('Skipped damaged checkpoint %s in %s', message, manager.directory)
    return state, meta
  if skipped:
    raise CheckpointError(
        f'No checkpoint in {manager.directory} could be read: {"; ".join(skipped)}. Move the '
        f'directory away to start afresh, or restore it from a backup.')
  return None


def config_to_dict(config: Any) -> dict[str, Any]:
  """A JSON-safe dict of an ml_collections config (tuples become lists)."""
  return json.loads(config.to_json_best_effort())
