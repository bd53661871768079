"""fc7 features and nearest training images (the paper's section 6.1, Figure 4 right).

The features are checked against the model's own logits (fc8 of them must give them), the
search against numpy's brute force, and `python -m alexnet_jax.neighbours` on conftest's tiny
trained model: a training photo asked as a query finds itself first.
"""

import json
import pathlib
import re

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from alexnet_jax import features
from alexnet_jax import inference
from alexnet_jax import input_pipeline
from alexnet_jax import normalize
from alexnet_jax import parallel
from started import Started

K = 3


@pytest.fixture(scope='module')
def query_photo(tiny_imagenette):
  """A training photo (the second of the third class), named as a user would."""
  return sorted((tiny_imagenette / 'train').glob('*/*'))[2 * 4 + 1]


@pytest.fixture(scope='module')
def out(tmp_path_factory):
  return tmp_path_factory.mktemp('neighbours')


@pytest.fixture(scope='module')
def commands(tiny_runs, query_photo, out, env):
  """neighbours on model a: the photo and two val examples as queries; an index the val split
  lacks. Started together (see `Started`), each drawing into OUT/<name>.png."""
  flags = {'queries': [f'--k={K}', '--eval_index=0,13', str(query_photo)],
           'bad_index': ['--eval_index=20']}
  return Started({name: ('alexnet_jax.neighbours', [f"--workdir={tiny_runs['a']}",
                                                    f'--out={out / name}.png', *more])
                  for name, more in flags.items()}, env)


@pytest.fixture(scope='module')
def model(tiny_runs):
  config = inference.load_config(None, tiny_runs['a'])
  return config, inference.load_state(config, tiny_runs['a'])


@pytest.mark.slow
@pytest.mark.usefixtures('commands')  # Started first: they run while this test does.
def test_features_are_what_fc8_reads_and_are_stored_once(model, tmp_path):
  config, state = model
  bank = features.split_features(config, state, tmp_path, 'train')
  assert bank.features.shape == (40, 4096) and bank.features.dtype == np.float32
  np.testing.assert_array_equal(bank.positions, np.arange(40))
  # The same images through the model's ordinary forward pass.
  train_config = config.copy_and_resolve_references()
  train_config.eval_split = 'train'
  batches = list(input_pipeline.create_eval_iterator(train_config, crops=1))
  images = normalize.for_config(config)(
      {'image': np.concatenate([b['image'][b['mask']] for b in batches])})
  np.testing.assert_array_equal(bank.labels, np.concatenate([b['label'][b['mask']]
                                                             for b in batches]))
  logits = np.asarray(jax.jit(lambda x: state.apply_fn({'params': state.params}, x,
                                                       train=False))(images))
  fc8 = state.params['fc8']
  assert (bank.features >= 0).all() and (bank.features > 0).mean() > 0.05
  np.testing.assert_allclose(bank.features @ np.asarray(fc8['kernel']) + np.asarray(fc8['bias']),
                             logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
  directory = tmp_path / 'features' / f'fc7_train_{features.params_digest(state.params)}'
  written = (directory / 'features.npy').stat().st_mtime_ns
  stored = features.split_features(config, state, tmp_path, 'train')
  assert (directory / 'features.npy').stat().st_mtime_ns == written  # Read, not recomputed.
  for a, b in zip(bank, stored):
    np.testing.assert_array_equal(a, b)
  about = json.loads((directory / 'about.json').read_text())
  assert about['split'] == 'train' and about['config']['image_size'] == 63
  assert [p.name for p in (tmp_path / 'features').iterdir()] == [directory.name]


def test_search_agrees_with_numpy_brute_force(monkeypatch):
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(53, 16)).astype(np.float32)
  bank[40] = bank[7]  # A tie: equal distances come in index order.
  queries = np.concatenate([bank[[7, 30]], rng.normal(size=(3, 16)).astype(np.float32)])
  # Bank batches of 12 rows over 4 devices: 5 batches, the last padded.
  monkeypatch.setattr(features, '_SEARCH_ROWS', 12)
  distances, rows = features.nearest(bank, queries, 5, parallel.create('pmap', jax.devices()))
  brute = np.linalg.norm(bank[None].astype(np.float64) - queries[:, None], axis=-1)
  expected = np.argsort(brute, axis=-1, kind='stable')[:, :5]
  np.testing.assert_array_equal(rows, expected)
  np.testing.assert_allclose(distances, np.take_along_axis(brute, expected, axis=1),
                             rtol=1e-4, atol=1e-3)
  assert list(rows[0, :2]) == [7, 40] and list(rows[1, :1]) == [30]


def test_k_larger_than_the_bank_is_an_error():
  with pytest.raises(ValueError, match='k=4 neighbours asked of a bank of 3 rows'):
    features.nearest(np.zeros((3, 2), np.float32), np.zeros((1, 2), np.float32), 4,
                     parallel.create('pmap', jax.devices()))


@pytest.mark.slow
def test_a_training_photo_finds_itself_first(commands, query_photo, tiny_runs, out):
  status, stdout, stderr = commands['queries']
  assert status == 0, stderr[-3000:]
  blocks = re.split(r'^(?=\S)', stdout, flags=re.M)
  assert blocks[1].startswith(f'The {K} nearest of 40 train images by fc7 distance (3 queries')
  photo, val0, val13 = blocks[2:5]
  assert photo.splitlines()[0] == str(query_photo)
  assert val0.startswith('val #0 (n01440764 tench, ')
  assert val13.startswith('val #13 (n03417042 garbage truck, ')
  rows = [re.fullmatch(r'\s+(\d)\.\s+(\S+)  (.+)  (\S+)', line).groups()
          for block in (photo, val0, val13) for line in block.splitlines()[1:]]
  assert len(rows) == 3 * K
  first_rank, first_distance, first_name, first_file = rows[0]
  assert first_file == str(query_photo) and first_name == 'n02979186 cassette player'
  # Itself: its distance computed directly, 0 (the printout's 3 decimals).
  assert float(first_distance) == 0
  assert [int(r[0]) for r in rows] == [1, 2, 3] * 3
  assert len(list((tiny_runs['a'] / 'features').glob('fc7_train_*/features.npy'))) == 1
  with Image.open(out / 'queries.png') as image:
    # A row per query, 1 + K cells of 120 x 145 pixels.
    assert image.size == ((1 + K) * 120, 3 * 145)
    assert np.asarray(image.convert('L')).std() > 10


def test_an_index_outside_the_eval_split_is_one_clear_error(commands, out):
  status, _, stderr = commands['bad_index']
  assert status == 1
  errors = [line for line in stderr.splitlines() if line.startswith('E')]
  assert len(errors) == 1, stderr[-3000:]
  assert "The 'val' split has 20 examples: no index 20." in errors[0]
  assert 'Traceback' not in stderr and not (out / 'bad_index.png').exists()


def test_distances_are_exact_where_the_matrix_products_cancel(monkeypatch):
  """Norms ~3e3 and neighbours ~0.5 apart: |q|^2 - 2 q.x + |x|^2 in float32 loses every digit
  of the distance (its rounding, ~1 in squared units, exceeds it). The reference is numpy in
  float64 on the same float32 inputs."""
  rng = np.random.default_rng(1)
  base = rng.uniform(300, 500, size=64)
  bank = (base + rng.normal(scale=0.05, size=(200, 64))).astype(np.float32)
  queries = np.concatenate([bank[[3, 50]] + rng.normal(scale=0.01, size=(2, 64)),
                            base + rng.normal(scale=0.05, size=(3, 64))]).astype(np.float32)
  monkeypatch.setattr(features, '_SEARCH_ROWS', 48)  # 5 bank batches, the last padded.
  distances, rows = features.nearest(bank, queries, 6, parallel.create('mesh', jax.devices()))
  brute = np.linalg.norm(bank[None].astype(np.float64) - queries[:, None], axis=-1)
  expected = np.argsort(brute, axis=-1, kind='stable')[:, :6]
  np.testing.assert_array_equal(rows, expected)
  np.testing.assert_array_equal(
      distances, np.take_along_axis(brute, expected, axis=1).astype(np.float32))
  assert list(rows[:2, 0]) == [3, 50]


def _fake_bank(directory, count: int) -> features.Bank:
  """Stands in for `compute_split`: a bank of `count` rows, written as it writes one."""
  bank = features.Bank(np.full((count, 2), count, np.float32), np.zeros(count, np.int32),
                       np.arange(count))
  for name, array in zip(features.Bank._fields, bank):
    np.save(directory / f'{name}.npy', array)
  return bank


def test_a_bank_stored_meanwhile_by_another_call_is_used(model, tmp_path, monkeypatch):
  """Two calls computing the same bank at once: the second finishes while the first computes
  (here: inside it). Each computes into a directory of its own; the first then reads the
  second's bank and leaves nothing else behind."""
  config, state = model
  calls = []

  def compute(config, state, split, directory):
    calls.append(directory)
    if len(calls) == 1:  # The other call, from start to end.
      features.split_features(config, state, tmp_path, split)
    return _fake_bank(directory, len(calls))
  monkeypatch.setattr(features, 'compute_split', compute)
  bank = features.split_features(config, state, tmp_path, 'train')
  assert len(set(calls)) == 2
  np.testing.assert_array_equal(bank.features, np.full((2, 2), 2, np.float32))  # The other's.
  digest = features.params_digest(state.params)
  assert [p.name for p in (tmp_path / 'features').iterdir()] == [f'fc7_train_{digest}']


def test_the_cache_is_keyed_by_the_weights_content(model, tiny_runs, tmp_path, monkeypatch):
  """Different weights get their own bank; the same weights (another copy) share one."""
  config, state = model
  other = inference.load_state(config, tiny_runs['b'])
  monkeypatch.setattr(features, 'compute_split',
                      lambda config, state, split, directory: _fake_bank(directory, 3))
  copy = state.replace(params=jax.tree.map(np.array, state.params))
  for params_of in (state, other, copy):
    features.split_features(config, params_of, tmp_path, 'train')
  names = sorted(p.name for p in (tmp_path / 'features').iterdir())
  assert names == sorted(f'fc7_train_{features.params_digest(s.params)}' for s in (state, other))
  assert features.params_digest(state.params) != features.params_digest(other.params)


@pytest.fixture(scope='module')
def prepared(tiny_imagenette, tmp_path_factory):
  """tiny_imagenette prepared as alexnet_jax.prepare writes it, 8 examples a shard: the 40
  train examples in 5 shards."""
  from alexnet_jax import prepare  # pylint: disable=g-import-not-at-top
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(dataset='folder', data_dir=str(tiny_imagenette), train_split='train',
                       eval_split='val', num_classes=10, image_size=63, resize_size=66)
  output = tmp_path_factory.mktemp('prepared')
  assert prepare.prepare(config, str(output), examples_per_shard=8)
  config.dataset, config.data_dir = 'prepared', str(output)
  return config


def test_the_examples_shown_are_read_alone(prepared, tmp_path):
  """Of prepared shards, only those holding the examples asked for are read: the others are
  gone here. The keys and labels are those of the records at those positions (read here in
  shard order, without PreparedSource)."""
  from alexnet_jax import data_sources  # pylint: disable=g-import-not-at-top
  from alexnet_jax import neighbours  # pylint: disable=g-import-not-at-top
  metadata = json.loads((pathlib.Path(prepared.data_dir) / 'metadata.json').read_text())
  shards = metadata['splits']['train']['shards']
  assert metadata['splits']['train']['shard_sizes'] == [8] * 5
  for name in (pathlib.Path(prepared.data_dir)).iterdir():
    (tmp_path / name.name).symlink_to(name)
  for name in shards[:2] + shards[3:]:  # Keep the third shard only: examples 16..23.
    (tmp_path / name).unlink()
  source = data_sources.PreparedSource(str(tmp_path), prepared.shuffle_buffer_size)
  options = input_pipeline.preprocessing_options(prepared, source.encoded)
  found = neighbours.split_examples(source, 'train', np.array([21, 16, 21]), options)
  records = [tf.train.Example.FromString(record.numpy()).features.feature for name in shards
             for record in tf.data.TFRecordDataset(f'{prepared.data_dir}/{name}')]
  for got, position in zip(found, (21, 16, 21)):
    assert got['key'] == records[position]['image/filename'].bytes_list.value[0]
    assert got['label'] == records[position]['image/class/label'].int64_list.value[0]
  assert found[0]['input']['image'].shape == (63, 63, 3)
