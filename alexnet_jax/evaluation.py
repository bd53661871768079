"""Evaluation: one pass over the eval split with a mapped eval step, and its report.

The training loop, `python -m alexnet_jax.evaluate` and ensembles all evaluate here, so a
number means the same wherever it is printed. TensorFlow (tf.data) is imported only when data
is read.
"""

from collections.abc import Callable
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax import normalize
from alexnet_jax import parallel
from alexnet_jax import preemption
from alexnet_jax import preprocessing
from alexnet_jax import steps
from alexnet_jax.train_state import TrainState


def evaluate(p_eval_step: Callable[..., Any], replicated_state: TrainState,
             config: ml_collections.ConfigDict, data_parallel: parallel.DataParallel,
             crops: int | None = None,
             notice: preemption.Notice | None = None) -> dict[str, Any] | None:
  """One pass over the eval split; every example counted once, whatever the device count.

  Args:
    p_eval_step: `steps.eval_step` under `data_parallel.map`.
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


def evaluate_state(config: ml_collections.ConfigDict, state: TrainState,
                   crops: int) -> dict[str, Any]:
  """Runs config.eval_split as `parallel.on_this_host(config)` says (the state made with that
  config's model ops); see `evaluate`."""
  data_parallel, step = mapped_eval_step(config)
  return evaluate(step, data_parallel.put_state(state), config, data_parallel, crops)


def mapped_eval_step(config: ml_collections.ConfigDict
                     ) -> tuple[parallel.DataParallel, Callable[..., Any]]:
  """The devices of `parallel.on_this_host(config)` and `steps.eval_step` mapped over them,
  made once per config: an ensemble evaluates each member and the ensemble with the same one
  (one compilation, one read of a mean image)."""
  return _mapped_eval_step(config.to_json_best_effort())


@functools.cache
def _mapped_eval_step(config_json: str) -> tuple[parallel.DataParallel, Any]:
  config = parallel.on_this_host(ml_collections.ConfigDict(json.loads(config_json)))
  data_parallel = parallel.for_config(config)
  parallel.per_device_batch_size(config.eval_batch_size, len(data_parallel.devices),
                                 'eval_batch_size')
  step = functools.partial(steps.eval_step, normalization=normalize.for_config(config))
  return data_parallel, data_parallel.map(step)


def make_report(metrics: dict[str, Any], class_names: list[str], **about: Any) -> dict[str, Any]:
  """A JSON-safe record of `evaluate`'s metrics, errors and per-class table added.

  Args:
    metrics: from `evaluate`.
    class_names: [num_classes] names, index = label.
    **about: what was evaluated (step, crops, ...), put first.
  Returns:
    about, then crop_names (the crops in words), top1, top5, top1_error, top5_error, loss,
    count, skipped_images (undecodable files, not in count) and per_class: a list of
    {'label', 'name', 'count', 'top1'} (top1 None for a class without examples).
  """
  per_class = [{'label': label, 'name': name, 'count': int(count),
                'top1': None if count == 0 else top1}
               for label, (name, count, top1) in enumerate(zip(
                   class_names, metrics['per_class_count'], metrics['per_class_top1']))]
  return {**about, 'crop_names': preprocessing.CROP_NAMES[metrics['crops']],
          'top1': metrics['top1'], 'top5': metrics['top5'],
          'top1_error': 1 - metrics['top1'], 'top5_error': 1 - metrics['top5'],
          'loss': metrics['loss'], 'count': int(metrics['count']),
          'skipped_images': metrics['skipped_images'], 'per_class': per_class}


def format_report(report: dict[str, Any]) -> str:
  """The report as text: a summary and the per-class table."""
  lines = [
      f"{report['weights']} on {report['dataset']}:{report['split']}, {report['count']} "
      f"examples, {report['crop_names']}" + (
          f" ({report['skipped_images']} undecodable images skipped)"
          if report['skipped_images'] else '') + ':',
      f"  top-1 accuracy {report['top1']:.4f}  (error {report['top1_error']:.4f})",
      f"  top-5 accuracy {report['top5']:.4f}  (error {report['top5_error']:.4f})",
      f"  loss {report['loss']:.4f}",
      'Per-class top-1 accuracy:',
      f"  {'label':>5}  {'examples':>8}  {'top-1':>6}  class",
  ]
  for row in report['per_class']:
    top1 = '-' if row['top1'] is None else f"{row['top1']:.4f}"
    lines.append(f"  {row['label']:>5}  {row['count']:>8}  {top1:>6}  {row['name']}")
  return '\n'.join(lines)
