"""Evaluators: what a run measures on held-out data, each chosen by name in the config.

As big_vision's evaluators: each is given the model's predict function (the mapped eval
step, or fc7's features) and a state, and returns named metrics. `config.evaluators` maps a
name to one evaluator's settings; the loop runs each at its own cadence and writes its
scalars to metrics.jsonl under its name, and `python -m alexnet_jax.evaluate --evaluators=...`
runs them on a checkpoint:

    config.evaluators = {
        'eval': {'kind': 'classification'},  # config.eval_crops, every config.eval_every_epochs
        'eval_10crop': {'kind': 'classification', 'crops': 10, 'every_epochs': 10.0},
        'per_class': {'kind': 'per_class'},
        'knn': {'kind': 'knn', 'k': 20},
    }

`config.best_metric` ('<evaluator>/<metric>', higher is better) is the one number the plateau
rule and the best checkpoint read. Every evaluator also runs at the run's last step.
"""

import abc
from collections.abc import Mapping
import pathlib
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np

from alexnet_jax import evaluation
from alexnet_jax import features
from alexnet_jax import parallel
from alexnet_jax import preemption
from alexnet_jax import train_state
from alexnet_jax.train_state import TrainState

DEFAULT_BEST_METRIC = 'eval/top1'
# The evaluator whose numbers are the run's eval_* in final_metrics.json and the eval curve
# of curves.png: the validation accuracy every run has reported.
PRIMARY = 'eval'


class Evaluator(abc.ABC):
  """One evaluation: `run(state) -> metrics`; `scalars` name those metrics.jsonl gets.

  Attributes:
    name: its key in config.evaluators (the metrics' prefix).
    every_epochs: how often the loop runs it (and at the last step).
  """
  scalars: tuple[str, ...] = ()
  settings: tuple[str, ...] = ('kind', 'every_epochs')

  def __init__(self, name: str, config: ml_collections.ConfigDict,
               data_parallel: parallel.DataParallel, p_eval_step: Any,
               every_epochs: float | None = None):
    self.name, self.config, self.data_parallel = name, config, data_parallel
    self.p_eval_step = p_eval_step
    self.every_epochs = config.eval_every_epochs if every_epochs is None else every_epochs

  @abc.abstractmethod
  def run(self, state: TrainState,
          notice: preemption.Notice | None = None) -> dict[str, Any] | None:
    """The metrics of `state` (on the devices, `data_parallel.put_state`); None when
    `notice` cut the evaluation short."""


class Classification(Evaluator):
  """Accuracy of the softmax (averaged over `crops` crops): top1, top5, loss, count, crops.

  The evaluation the loop always ran (`evaluation.evaluate`); crops default to
  config.eval_crops (1: centre; 10: the paper's; 5: its unmirrored half).
  """
  scalars = ('loss', 'top1', 'top5')
  settings = Evaluator.settings + ('crops',)

  def __init__(self, *args, crops: int | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.crops = crops

  def run(self, state, notice=None):
    return evaluation.evaluate(self.p_eval_step, state, self.config, self.data_parallel,
                               self.crops, notice)


class PerClass(Classification):
  """Each class's top-1 (a list, NaN for a class without examples), their mean (balanced
  accuracy) and the worst class's."""
  scalars = ('mean_class_top1', 'worst_class_top1')

  def run(self, state, notice=None):
    metrics = super().run(state, notice)
    if metrics is None:
      return None
    per_class = np.array(metrics['per_class_top1'], np.float64)
    return {'mean_class_top1': float(np.nanmean(per_class)),
            'worst_class_top1': float(np.nanmin(per_class)),
            'per_class_top1': metrics['per_class_top1'],
            'per_class_count': metrics['per_class_count'], 'crops': metrics['crops']}


def knn_vote(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
  """The label most of each query's neighbours have; a tie goes to the tied label whose
  nearest neighbour ranks first.

  Args:
    neighbour_labels: int [Q, k], nearest first.
    num_classes: C.
  Returns:
    int64 [Q].
  """
  queries, k = neighbour_labels.shape
  votes = np.zeros((queries, num_classes), np.int64)
  np.add.at(votes, (np.arange(queries)[:, None], neighbour_labels), 1)
  first_rank = np.full((queries, num_classes), k, np.int64)
  # Reversed, so the nearest rank is written last and stays.
  for rank in reversed(range(k)):
    first_rank[np.arange(queries), neighbour_labels[:, rank]] = rank
  return np.argmax(votes * (k + 1) - first_rank, axis=1)


class KNearestNeighbours(Evaluator):
  """top1 of a k-nearest-neighbour vote among the fc7 features of `bank_split`'s images.

  The paper's Figure 4 (right) as a number: each eval image (centre crop) takes the label most
  of its k nearest training images (Euclidean, fc7 after its ReLU) have. The features are
  computed afresh (`features.compute_split`, written to a temporary directory under TMPDIR,
  memory-mapped from there: on a disk a bank larger than memory is fine, on a tmpfs it is
  memory) and searched with `features.nearest`. One process only (`check` refuses more):
  the search spans the devices of every process, and each would feed it the same rows.
  A preemption is noticed between the two splits and after the search, not within them.
  """
  scalars = ('top1',)
  settings = Evaluator.settings + ('k', 'bank_split')

  def __init__(self, *args, k: int = 20, bank_split: str | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.k = k
    self.bank_split = bank_split or self.config.train_split

  def run(self, state, notice=None):
    config = parallel.on_this_host(self.config)
    host_state = self.data_parallel.get(state)
    host_state = host_state.replace(apply_fn=train_state.create_model(config).apply)
    with tempfile.TemporaryDirectory() as directory:
      banks = []
      for split in (self.bank_split, config.eval_split):
        split_directory = pathlib.Path(directory) / f'{len(banks)}_{split}'
        split_directory.mkdir()
        banks.append(features.compute_split(config, host_state, split, split_directory))
        if notice is not None and notice.reached():
          return None
      bank, queries = banks
      _, rows = features.nearest(bank.features, queries.features, min(self.k, len(bank.labels)),
                                 parallel.for_config(config))
      predicted = knn_vote(bank.labels[rows], config.num_classes)
      top1 = float(np.mean(predicted == queries.labels))
    return {'top1': top1, 'count': len(queries.labels), 'k': self.k}


KINDS: dict[str, type[Evaluator]] = {
    'classification': Classification, 'per_class': PerClass, 'knn': KNearestNeighbours}


# Kinds of metrics.jsonl records that the loop writes itself.
_RESERVED_NAMES = ('train', 'lr_drop')


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming a bad evaluator setting or a best_metric no evaluator gives."""
  for name, settings in config.evaluators.items():
    if name in _RESERVED_NAMES or '/' in name:
      raise ValueError(f'config.evaluators.{name}: an evaluator may not be named '
                       f"{_RESERVED_NAMES} (metrics.jsonl's own records) nor hold '/' "
                       '(best_metric is <evaluator>/<metric>).')
    kind = settings.get('kind')
    if kind not in KINDS:
      raise ValueError(f'config.evaluators.{name}.kind={kind!r} is not one of '
                       f'{tuple(KINDS)}.')
    unknown = set(settings) - set(KINDS[kind].settings)
    if unknown:
      raise ValueError(f'config.evaluators.{name} has {sorted(unknown)}, which a {kind!r} '
                       f'evaluator does not read; it reads {KINDS[kind].settings}.')
    if settings.get('every_epochs', 1.0) <= 0 or settings.get('k', 1) < 1:
      raise ValueError(f'config.evaluators.{name}: every_epochs and k must be positive.')
    if kind == 'knn' and jax.process_count() > 1:
      raise ValueError(f'config.evaluators.{name} is a k-NN evaluator, which runs in one '
                       f'process; this job has {jax.process_count()}. Run it after training '
                       'with python -m alexnet_jax.evaluate --evaluators=' + name + '.')
    if settings.get('crops', 1) not in (1, 5, 10):
      raise ValueError(f'config.evaluators.{name}.crops={settings["crops"]} is not one of '
                       '(1, 5, 10).')
  if config.evaluators.get(PRIMARY, {'kind': 'classification'})['kind'] != 'classification':
    raise ValueError(f'config.evaluators.{PRIMARY} is the run\'s validation accuracy (eval_* '
                     "in final_metrics.json): its kind must be 'classification'.")
  name, _, metric = config.best_metric.partition('/')
  if name not in config.evaluators or metric not in KINDS[
      config.evaluators[name]['kind']].scalars or metric == 'loss':
    raise ValueError(f'config.best_metric={config.best_metric!r} must be <evaluator>/<metric> '
                     'of an accuracy an evaluator of config.evaluators reports (higher is '
                     f'better), such as {DEFAULT_BEST_METRIC!r}.')


def create(config: ml_collections.ConfigDict, data_parallel: parallel.DataParallel,
           p_eval_step: Any, names: list[str] | None = None) -> dict[str, Evaluator]:
  """The evaluators config.evaluators names (`names` of them, if given), in its order.

  Args:
    config: the run's config (checked with `check`).
    data_parallel: the devices the state is on.
    p_eval_step: `steps.eval_step` under `data_parallel.map`.
    names: a subset of config.evaluators' names; None: all.
  Raises:
    ValueError: a name that config.evaluators does not have.
  """
  missing = set(names or ()) - set(config.evaluators)
  if missing:
    raise ValueError(f'No evaluator named {sorted(missing)} in config.evaluators (it has '
                     f'{sorted(config.evaluators)}).')
  chosen = {}
  for name, settings in config.evaluators.items():
    if names is None or name in names:
      settings = dict(settings)
      chosen[name] = KINDS[settings.pop('kind')](name, config, data_parallel, p_eval_step,
                                                 **settings)
  return chosen


def due(evaluators: Mapping[str, Evaluator], step: int, steps_per_epoch: int,
        total_steps: int) -> list[str]:
  """The names of the evaluators to run after `step`: each every `every_epochs` epochs (at
  least every step), all at the last."""
  return [name for name, evaluator in evaluators.items()
          if step == total_steps or step % max(1, int(evaluator.every_epochs * steps_per_epoch))
          == 0]


def scalars(evaluator: Evaluator, metrics: Mapping[str, Any]) -> dict[str, float]:
  """The evaluator's scalar metrics: what metrics.jsonl gets under its name."""
  return {key: float(metrics[key]) for key in evaluator.scalars}


def evaluate_state(config: ml_collections.ConfigDict, state: TrainState,
                   names: list[str] | None = None) -> dict[str, dict[str, Any]]:
  """Runs the evaluators `names` (None: all) of config.evaluators on a host `state` (made
  with `parallel.on_this_host(config)`'s model ops): {name: metrics}."""
  data_parallel, p_eval_step = evaluation.mapped_eval_step(config)
  on_devices = data_parallel.put_state(state)
  return {name: evaluator.run(on_devices)
          for name, evaluator in create(config, data_parallel, p_eval_step, names).items()}

