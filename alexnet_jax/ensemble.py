"""Ensembles of trained models, softmax averaged: the paper's section 7 and Table 2.

    python -m alexnet_jax.evaluate --workdir=A --ensemble=B,C [--crops=10] [--checkpoint=best]

"Averaging the predictions of five similar CNNs gives an error rate of 16.4%" (18.2% for one).
An ensemble is itself a model here: `combine` makes a `TrainState` whose apply function returns
the log of its members' mean softmax, so `steps.eval_step` (crops, top-k, loss, per-class
accuracy), the input pipeline and `parallel` evaluate it exactly as they evaluate one model,
and each member's numbers beside it come from that same path. Every model sees the same
batches (the first model's eval split, crops and preprocessing), so the members must share
their classes and their evaluation input (image size, canvas, mean, scale, channels), and crops
with mirrors are refused where a member was trained without them (`check_crops`).
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import json
import os
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax import checkpointing
from alexnet_jax import cli
from alexnet_jax import config_checks
from alexnet_jax import config_fields
from alexnet_jax import evaluation
from alexnet_jax import inference
from alexnet_jax import input_pipeline
from alexnet_jax import labels
from alexnet_jax import parallel
from alexnet_jax.train_state import TrainState



def _log_mean_softmax(apply_fns: Sequence[Callable[..., jax.Array]], variables: dict[str, Any],
                      images: jax.Array, *, train: bool) -> jax.Array:
  """log(mean over members of softmax(logits)): images [N, S, S, C] -> [N, num_classes].

  In log space (logsumexp of log_softmax), so a class that every member finds improbable keeps
  a finite score; its softmax is the members' mean softmax.
  """
  log_probs = jnp.stack([
      jax.nn.log_softmax(apply_fn({'params': params}, images, train=train).astype(jnp.float32))
      for apply_fn, params in zip(apply_fns, variables['params'])])
  return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(len(apply_fns))


def combine(states: Sequence[TrainState]) -> TrainState:
  """The ensemble of `states` as one train state, for `steps.eval_step` and
  `evaluation.evaluate`.

  Its params are the members' params (a tuple) and its apply function returns the log of their
  mean softmax, normalised already, so eval_step's log_softmax keeps it (up to rounding); over
  crops eval_step averages again, so each example gets the mean over members and crops alike.
  Only apply_fn and params mean anything (the optimizer state is dropped: evaluation never
  reads it, and replicating it would copy every member's momentum to every device).
  """
  return states[0].replace(
      apply_fn=functools.partial(_log_mean_softmax, tuple(s.apply_fn for s in states)),
      params=tuple(s.params for s in states), opt_state=())


def _evaluation_input(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a model needs to share with the others: classes and what evaluation feeds it."""
  options = dataclasses.asdict(input_pipeline.preprocessing_options(config))
  options['mean'], options['std'] = input_pipeline.pixel_statistics(config)  # The device's.
  shared = {'dataset': config.dataset, 'num_classes': config.num_classes}
  shared.update((name, value) for name, value in options.items()
                if name not in config_fields.TRAINING_ONLY)
  return shared


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """'field=<b's value> where the first has <a's>' per field that differs (arrays: named)."""
  differ = []
  for name in a:
    x, y = a[name], b[name]
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
      if not (x is not None and y is not None and np.array_equal(x, y)):
        differ.append(f'{name} (another array)')
    elif x != y:
      differ.append(f'{name}={y!r} where the first has {x!r}')
  return differ


def check_compatible(configs: Sequence[ml_collections.ConfigDict],
                     workdirs: Sequence[epath.PathLike]) -> None:
  """Raises ValueError naming the first model that does not share the first one's classes,
  image size or evaluation preprocessing, and how it differs."""
  if len(set(map(_identity, workdirs))) < len(workdirs):
    raise ValueError(f'The ensemble names a workdir twice: {list(map(str, workdirs))}; an '
                     'ensemble of a model with itself is that model.')
  first = _evaluation_input(configs[0])
  for config, workdir in zip(configs[1:], workdirs[1:]):
    differ = _differences(first, _evaluation_input(config))
    if differ:
      raise ValueError(
          f'The models of an ensemble must share their classes, image size and evaluation '
          f'preprocessing (all see the same images); {workdir} differs from {workdirs[0]}: '
          f'{"; ".join(differ)}.')


def _identity(workdir: epath.PathLike) -> str:
  """A workdir's name for comparisons: resolved where local (links, '..', a trailing '/')."""
  path = epath.Path(workdir)
  return os.fspath(path if '://' in os.fspath(path) else path.resolve())


def check_crops(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[epath.PathLike],
                crops: int) -> None:
  """Raises ValueError naming the first member trained without mirrors (random_flip False)
  where the crops the first config gives for `crops` (`input_pipeline.eval_crops`) mirror:
  every member sees the same crops, and mirrored ones are images it never saw."""
  if input_pipeline.eval_crops(configs[0], crops) != 10:  # The only crops with mirrors.
    return
  for config, workdir in zip(configs[1:], workdirs[1:]):
    if not config.random_flip:
      raise ValueError(
          f'{workdir} was trained without mirrors (random_flip=False), and the 10 crops '
          f'of the ensemble (those of {workdirs[0]}, random_flip=True) mirror: use --crops=1 '
          'or 5.')


def load_members(workdirs: Sequence[epath.PathLike],
                 config: ml_collections.ConfigDict | None = None,
                 checkpoint: int | str = 'latest'
                 ) -> tuple[list[ml_collections.ConfigDict], list[TrainState]]:
  """The configs and the host train states of an ensemble's models, as this host runs them.

  Args:
    workdirs: training workdirs, the first one's config (or `config`) sets the evaluation.
    config: replaces the first workdir's saved config (the others keep theirs).
    checkpoint: the checkpoint of every workdir: a step, 'latest' or 'best'.
  Returns:
    (one config per workdir, `parallel.on_this_host`'s; one state per workdir, made with its
    config's model ops), in order. The first config is the evaluation's.
  Raises:
    ValueError: the models do not share classes and evaluation input (see `check_compatible`),
      or a config is invalid.
    FileNotFoundError, checkpointing.CheckpointError: a workdir without config or checkpoint.
  """
  configs = [inference.load_config(config if i == 0 else None, workdir)
             for i, workdir in enumerate(workdirs)]
  for member in configs:
    config_checks.validate(member)
  check_compatible(configs, workdirs)
  configs = [parallel.on_this_host(member) for member in configs]
  return configs, [inference.load_state(member, workdir, checkpoint)
                   for member, workdir in zip(configs, workdirs)]


def format_side_by_side(report: dict[str, Any]) -> str:
  """Top-1/top-5 accuracy and error and loss of each member and of the ensemble, as a table."""
  rows = [*report['members'], report]
  width = max(len(row['weights']) for row in rows)
  lines = [f"  {'model':<{width}}  {'top-1':>6}  {'top-5':>6}  {'top-1 err':>9}  "
           f"{'top-5 err':>9}  {'loss':>7}"]
  for row in rows:
    lines.append(f"  {row['weights']:<{width}}  {row['top1']:6.4f}  {row['top5']:6.4f}  "
                 f"{row['top1_error']:9.4f}  {row['top5_error']:9.4f}  {row['loss']:7.4f}")
  return '\n'.join(lines)


def main(workdirs: Sequence[str], model: cli.ModelFlags, crops: str | None) -> None:
  """`python -m alexnet_jax.evaluate --workdir=A --ensemble=B,...`: evaluates each model and
  the ensemble, prints them side by side and writes A/eval_ensemble<M>_<C>crop.json.

  Args:
    workdirs: the models' workdirs, --workdir's first (the JSON goes there).
    model: evaluate's model flags (--config for the first model, --checkpoint for all).
    crops: the --crops flag (None: the first config's eval_crops).
  """
  with cli.user_errors():
    if model.init_from.value:
      raise ValueError('--init_from and --ensemble: an ensemble is made of training workdirs '
                       '(--workdir and --ensemble), not of weights files.')
    checkpoint = checkpointing.parse_checkpoint(model.checkpoint.value)
    configs, states = load_members(workdirs, model.config.value, checkpoint)
    config, crops = configs[0], int(crops or configs[0].eval_crops)
    check_crops(configs, workdirs, crops)
    names = labels.class_names(config)
    about = {'checkpoint': str(checkpoint), 'init_from': None, 'dataset': config.dataset,
             'split': config.eval_split}
    members = []
    for workdir, state in zip(workdirs, states):
      metrics = evaluation.evaluate_state(config, state, crops)
      members.append(evaluation.make_report(
          metrics, names, weights=f'step {int(state.step)} of {workdir}', step=int(state.step),
          crops=metrics['crops'], **about))
    metrics = evaluation.evaluate_state(config, combine(states), crops)
    report = evaluation.make_report(
        metrics, names, weights=f'ensemble of {len(states)} (softmax averaged)',
        workdirs=list(map(str, workdirs)), step=None, crops=metrics['crops'], **about)
    report['members'] = members
  if jax.process_index() == 0:
    path = epath.Path(workdirs[0]) / f"eval_ensemble{len(states)}_{report['crops']}crop.json"
    path.write_text(json.dumps(report, indent=2))
    print(evaluation.format_report(report))
    print('Side by side:')
    print(format_side_by_side(report))
    print(f'Wrote {path}')
