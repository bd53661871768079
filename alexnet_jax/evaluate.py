"""Evaluates a trained AlexNet: `python -m alexnet_jax.evaluate --workdir=DIR [--crops=10]`.

Restores a checkpoint of the workdir (--checkpoint: 'latest', 'best' by config.best_metric, or a
step) or a weights file (--init_from), runs the config's eval split with the centre crop or
the paper's 10 crops (softmax averaged), prints top-1/top-5 accuracy, loss and per-class
accuracy, and writes them to DIR/eval_step<N>_<C>crop.json (eval_<weights file>_<C>crop.json
with --init_from); --evaluators=NAME,... (or 'all') also runs those of the config's
evaluators (config.evaluators: k-NN on fc7, per-class accuracy, other crops) and adds their
metrics to the report. The config is the one the
training run saved in DIR unless --config names one; then the numbers equal those the run
logged for the same step (in DIR/metrics.jsonl), on any number of devices and processes (a
whole split; with config.steps_per_eval > 0 each process evaluates the first batches of its
own share, so that subset depends on the process count).
"""

import json
import os

# TensorFlow only feeds data: keep it off the GPUs and quiet. Must precede its first import.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from etils import epath
import jax

from alexnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
from alexnet_jax import cli
from alexnet_jax import config_checks
from alexnet_jax import ensemble
from alexnet_jax import evaluation
from alexnet_jax import evaluators
from alexnet_jax import inference
from alexnet_jax import labels
from alexnet_jax import parallel

_MODEL = cli.define_model_flags()
_CROPS = flags.DEFINE_enum(
    'crops', None, ['1', '5', '10'], "1: the centre crop; 10: the paper's 10 crops, softmax "
    'averaged (the 5 unmirrored ones for a model trained without flips); 5: those 5. Default: '
    'config.eval_crops.')
_ENSEMBLE = flags.DEFINE_list(
    'ensemble', [], "More training workdirs: their models and --workdir's are evaluated "
    "alone and as an ensemble (softmax averaged, the paper's section 7), side by side; the "
    'JSON goes to --workdir.')
_EVALUATORS = flags.DEFINE_list(
    'evaluators', [], "Also run these evaluators of the config's config.evaluators ('all': "
    'every one) and report their metrics.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.start()
  if _ENSEMBLE.value:
    if _EVALUATORS.value:
      raise app.UsageError('--evaluators runs on one model; leave it out with --ensemble.')
    ensemble.main([_MODEL.workdir.value, *_ENSEMBLE.value], _MODEL, _CROPS.value)
    return
  with cli.user_errors():
    checkpoint = checkpointing.parse_checkpoint(_MODEL.checkpoint.value)
    workdir = epath.Path(_MODEL.workdir.value)
    init_from = _MODEL.init_from.value
    config = inference.load_config(_MODEL.config.value, workdir)
    config_checks.validate(config)
    evaluators.check(config)
    config = parallel.on_this_host(config)
    state = inference.load_state(config, workdir, checkpoint, init_from)
    metrics = evaluation.evaluate_state(config, state, int(_CROPS.value or config.eval_crops))
    crops = metrics['crops']  # The crops used: 10 asked of a model trained unmirrored is 5.
    step = None if init_from else int(state.step)
    report = evaluation.make_report(
        metrics, labels.class_names(config),
        weights=init_from or f'step {step} of {workdir}', step=step,
        checkpoint=None if init_from else str(checkpoint), init_from=init_from, crops=crops,
        dataset=config.dataset, split=config.eval_split)
    if _EVALUATORS.value:
      names = None if _EVALUATORS.value == ['all'] else _EVALUATORS.value
      report['evaluators'] = evaluators.evaluate_state(config, state, names)
  if jax.process_index() == 0:
    name = epath.Path(init_from).stem if init_from else f'step{step}'
    path = workdir / f'eval_{name}_{crops}crop.json'
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(evaluation.format_report(report))
    for name, metrics in report.get('evaluators', {}).items():
      print(f'{name}: ' + ', '.join(f'{key} {value:.4f}' for key, value in metrics.items()
                                     if isinstance(value, float)))
    print(f'Wrote {path}')


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
