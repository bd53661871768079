"""Evaluates a trained AlexNet: `python -m alexnet_jax.evaluate --workdir=DIR [--crops=10]`.

Restores a checkpoint of the workdir (--checkpoint: 'latest', 'best' by validation top-1, or a
step) or a weights file (--init_from), runs the config's eval split with the centre crop or
the paper's 10 crops (softmax averaged), prints top-1/top-5 accuracy, loss and per-class
accuracy, and writes them to DIR/eval_step<N>_<C>crop.json (eval_<weights file>_<C>crop.json
with --init_from). The config is the one the
training run saved in DIR unless --config names one; then the numbers equal those the run
logged for the same step (in DIR/metrics.jsonl), on any number of devices and processes (a
whole split; with config.steps_per_eval > 0 each process evaluates the first batches of its
own share, so that subset depends on the process count).
"""

import functools
import json
import os
from typing import Any

# TensorFlow only feeds data: keep it off the GPUs and quiet. Must precede its first import.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from etils import epath
import jax
import ml_collections

from alexnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
from alexnet_jax import cli
from alexnet_jax import config_checks
from alexnet_jax import ensemble
from alexnet_jax import inference
from alexnet_jax import labels
from alexnet_jax import normalize
from alexnet_jax import parallel
from alexnet_jax import preprocessing
from alexnet_jax import train

_MODEL = cli.define_model_flags()
_CROPS = flags.DEFINE_enum(
    'crops', None, ['1', '5', '10'], "1: the centre crop; 10: the paper's 10 crops, softmax "
    'averaged (the 5 unmirrored ones for a model trained without flips); 5: those 5. Default: '
    'config.eval_crops.')
_ENSEMBLE = flags.DEFINE_list(
    'ensemble', [], "More training workdirs: their models and --workdir's are evaluated "
    "alone and as an ensemble (softmax averaged, the paper's section 7), side by side; the "
    'JSON goes to --workdir.')


def evaluate(config: ml_collections.ConfigDict, state: train.TrainState,
             crops: int) -> dict[str, Any]:
  """Runs config.eval_split as `parallel.on_this_host(config)` says (the state made with that
  config's model ops); see `train.evaluate`."""
  data_parallel, step = _mapped_eval_step(config.to_json_best_effort())
  return train.evaluate(step, data_parallel.put_state(state), config, data_parallel, crops)


@functools.cache
def _mapped_eval_step(config_json: str) -> tuple[parallel.DataParallel, Any]:
  """The devices and the mapped eval step of a config, made once per config: an ensemble
  evaluates each member and the ensemble with the same one (one compilation, one read of a
  mean image)."""
  config = parallel.on_this_host(ml_collections.ConfigDict(json.loads(config_json)))
  data_parallel = parallel.for_config(config)
  parallel.per_device_batch_size(config.eval_batch_size, len(data_parallel.devices),
                                 'eval_batch_size')
  step = functools.partial(train.eval_step, normalization=normalize.for_config(config))
  return data_parallel, data_parallel.map(step)


def make_report(metrics: dict[str, Any], class_names: list[str], **about: Any) -> dict[str, Any]:
  """A JSON-safe record of `train.evaluate`'s metrics, errors and per-class table added.

  Args:
    metrics: from `train.evaluate`.
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.start()
  if _ENSEMBLE.value:
    ensemble.main([_MODEL.workdir.value, *_ENSEMBLE.value], _MODEL, _CROPS.value,
                  evaluate=evaluate, make_report=make_report, format_report=format_report)
    return
  with cli.user_errors():
    checkpoint = checkpointing.parse_checkpoint(_MODEL.checkpoint.value)
    workdir = epath.Path(_MODEL.workdir.value)
    init_from = _MODEL.init_from.value
    config = inference.load_config(_MODEL.config.value, workdir)
    config_checks.validate(config)
    config = parallel.on_this_host(config)
    state = inference.load_state(config, workdir, checkpoint, init_from)
    metrics = evaluate(config, state, int(_CROPS.value or config.eval_crops))
    crops = metrics['crops']  # The crops used: 10 asked of a model trained unmirrored is 5.
    step = None if init_from else int(state.step)
    report = make_report(
        metrics, labels.class_names(config),
        weights=init_from or f'step {step} of {workdir}', step=step,
        checkpoint=None if init_from else str(checkpoint), init_from=init_from, crops=crops,
        dataset=config.dataset, split=config.eval_split)
  if jax.process_index() == 0:
    name = epath.Path(init_from).stem if init_from else f'step{step}'
    path = workdir / f'eval_{name}_{crops}crop.json'
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f'Wrote {path}')


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
