"""Training images nearest to query images in fc7 space: the paper's Figure 4 (right).

    python -m alexnet_jax.neighbours --workdir=DIR [--k=6] [--eval_index=0,17] [IMAGE ...]

Queries are image files (a folder stands for its images) and examples of the eval split by
index (--eval_index). For each, it prints the k training images whose fc7 features (the last
hidden layer, see `features`) are closest in Euclidean distance, with their classes, distances
and files, and draws them into DIR/neighbours.png (--out): a row per query, the query first.
The training split's features are computed once and kept in DIR/features/ for later calls
(with the same weights, by content, and config); then only the images shown are read. Model
and config come as for predict: a checkpoint of DIR (--checkpoint) or a weights file
(--init_from), the config DIR saved unless --config, run as `parallel.on_this_host` says.
"""

import dataclasses
import functools
import os
import time
from typing import Any, NamedTuple

# TensorFlow only reads images: keep it off the GPUs and quiet. Must precede its first import.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from etils import epath
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from alexnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
from alexnet_jax import cli
from alexnet_jax import config_checks
from alexnet_jax import data_sources
from alexnet_jax import features
from alexnet_jax import inference
from alexnet_jax import input_pipeline
from alexnet_jax import normalize
from alexnet_jax import parallel
from alexnet_jax import plots
from alexnet_jax import predict
from alexnet_jax import preprocessing

_MODEL = cli.define_model_flags()
_K = flags.DEFINE_integer('k', 6, 'Neighbours per query (the paper shows 6).', lower_bound=1)
_EVAL_INDEX = flags.DEFINE_list('eval_index', [], 'Query with these examples of the eval split '
                                '(indices in its order: sorted class folders, sorted files).')
_OUT = flags.DEFINE_string('out', None, 'The picture to write; default DIR/neighbours.png.')


def split_examples(source: data_sources.Source, split: str, positions: np.ndarray,
                   options: preprocessing.Options) -> list[dict[str, Any]]:
  """The examples of `split` at `positions` (indices in its canonical order), in that order.

  Reads each example alone: its handle is the one-example share of "process" p of n
  (`data_sources.process_range(n, p, n)` is [p, p + 1)), so a streamed source reads the one
  shard that holds it (TFDS skips into it; a prepared shard is read through up to it) and
  decodes that image only.

  Returns:
    One dict per position: 'input' (the evaluation's centre crop, `preprocessing.eval_image`'s
    dict: 'image' uint8 [S, S, C], 0-255, as shown, ...), 'label' (int) and 'key' (bytes: file
    or id).
  Raises:
    ValueError: a position outside the split, or a file that does not decode.
  """
  count = source.num_examples(split)
  bad = [int(p) for p in positions if not 0 <= p < count]
  if bad:
    raise ValueError(f'The {split!r} split has {count} examples: no index {bad[0]}.')
  unique = np.unique(positions)
  if not unique.size:  # No --eval_index.
    return []
  # One pipeline (one trace of the preprocessing) over the examples' one-example shares.
  handles = functools.reduce(tf.data.Dataset.concatenate, [
      source.handles(split, process_index=int(p), process_count=count) for p in unique])
  ds = handles.map(lambda handle: {
      'key': handle['key'], 'label': handle['label'],
      'input': preprocessing.eval_image(source.load(handle), options)})
  try:
    found = dict(zip(unique, ds.as_numpy_iterator()))
  except tf.errors.OpError as e:
    raise ValueError(f'An image of the {split!r} split does not decode: {e.message}') from e
  return [found[p] for p in positions]


class _Query(NamedTuple):
  input: dict[str, np.ndarray]  # The model's input before `normalize`: 'image' [S, S, C], ...
  title: str  # In the picture.
  header: str  # In the printout.


def _queries(paths: list[str], eval_index: np.ndarray, config: ml_collections.ConfigDict,
             source: data_sources.Source, options: preprocessing.Options,
             names: list[str]) -> list[_Query]:
  """The image files (and the images in the folders) named, then the eval examples asked for.

  Raises:
    ValueError: a file that does not decode, a folder without images, an index out of range.
  """
  queries = []
  file_options = dataclasses.replace(options, encoded=True)  # Files, whatever the dataset.
  for path in predict.image_files(paths):
    try:
      queries.append(_Query(predict.load_image(path, file_options), path.name, str(path)))
    except ValueError as e:
      raise ValueError(f'{path}: cannot read the query: {e}') from e
  if paths and not queries:
    raise ValueError(f'No images in {paths} ({", ".join(data_sources.IMAGE_EXTENSIONS)}).')
  split = config.eval_split
  for position, example in zip(eval_index, split_examples(source, split, eval_index, options)):
    name = names[example['label']]
    queries.append(_Query(example['input'], f'{split} #{position}\n{plots.short_name(name)}',
                          f'{split} #{position} ({name}, {example["key"].decode()})'))
  return queries


def main(argv):
  if len(argv) < 2 and not _EVAL_INDEX.value:
    raise app.UsageError('Name query images (files or folders) or --eval_index.')
  cli.start()
  with cli.user_errors():
    if jax.process_count() > 1:
      raise ValueError('neighbours runs in one process (it computes the bank alone).')
    checkpoint = checkpointing.parse_checkpoint(_MODEL.checkpoint.value)
    workdir, init_from = epath.Path(_MODEL.workdir.value), _MODEL.init_from.value
    config = inference.load_config(_MODEL.config.value, workdir)
    config_checks.validate(config)
    config = parallel.on_this_host(config)
    try:
      eval_index = np.array([int(i) for i in _EVAL_INDEX.value], np.int64)
    except ValueError as e:
      raise ValueError(f'--eval_index takes whole numbers: {_EVAL_INDEX.value}.') from e
    names = predict.class_names(config)
    source = data_sources.get_source(config)
    options = input_pipeline.preprocessing_options(config, source.encoded)
    queries = _queries(argv[1:], eval_index, config, source, options, names)
    state = inference.load_state(config, workdir, checkpoint, init_from)
    bank = features.split_features(config, state, workdir, config.train_split)
    data_parallel = parallel.for_config(config)
    query_features = features.features_fn(state, data_parallel, normalize.for_config(config))(
        {name: np.stack([q.input[name] for q in queries]) for name in queries[0].input})
    start = time.time()
    distances, rows = features.nearest(bank.features, query_features, _K.value, data_parallel)
    seconds = time.time() - start
    found = split_examples(source, config.train_split, bank.positions[rows.ravel()], options)
  print(f'The {_K.value} nearest of {len(bank.labels)} {config.train_split} images by fc7 '
        f'distance ({len(queries)} queries, search in {seconds:.2f} s):')
  neighbours, titles = [], []
  for query, row_d, row_found in zip(queries, distances,
                                     (found[i:i + _K.value] for i in range(0, len(found),
                                                                           _K.value))):
    print(query.header)
    for rank, (distance, example) in enumerate(zip(row_d, row_found), start=1):
      print(f'  {rank:2d}. {distance:10.3f}  {names[example["label"]]}  '
            f'{example["key"].decode()}')
    neighbours.append([example['input']['image'] for example in row_found])
    titles.append([f'{plots.short_name(names[example["label"]])}\n{distance:.1f}'
                   for distance, example in zip(row_d, row_found)])
  out = epath.Path(_OUT.value or workdir / 'neighbours.png')
  plots.plot_neighbours([q.input['image'] for q in queries], [q.title for q in queries], neighbours,
                        titles, out)
  print(f'Wrote {out}')


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
