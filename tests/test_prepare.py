"""alexnet_jax.prepare and dataset='prepared': counts, pixels, resuming, sharding, training."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

from etils import epath
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from alexnet_jax import data_sources
from alexnet_jax import input_pipeline
from alexnet_jax import prepare
from alexnet_jax import train
from test_train import tiny_config

SIZE = 72  # Small canvases keep the tests fast; 63 px crops of them train the network.
CLASSES = 3
PER_CLASS = {'train': 3, 'val': 2}
BROKEN = 'broken.JPEG'


@pytest.fixture(scope='module')
def folder(tmp_path_factory, imagenette_dir, imagenet_samples_dir) -> pathlib.Path:
  """2 Imagenette classes (square photos) and a class 'samples' of non-square ImageNet photos,
  3 train and 2 val photos each (symlinks), plus a text file named .JPEG in the first train
  class."""
  root = tmp_path_factory.mktemp('folder')
  samples = [path for path in sorted(imagenet_samples_dir.iterdir())
             if len(set(Image.open(path).size)) == 2][:sum(PER_CLASS.values())]
  for split, count in PER_CLASS.items():
    for class_dir in sorted((imagenette_dir / split).iterdir())[:CLASSES - 1]:
      (root / split / class_dir.name).mkdir(parents=True)
      for path in sorted(class_dir.iterdir())[:count]:
        (root / split / class_dir.name / path.name).symlink_to(path)
    (root / split / 'samples').mkdir()
    for path in samples[:count] if split == 'train' else samples[-count:]:
      (root / split / 'samples' / path.name).symlink_to(path)
  first = sorted((root / 'train').iterdir())[0]
  (first / BROKEN).write_text('not an image')
  return root


def _config(data_dir, dataset='folder', **overrides):
  return tiny_config(dataset=dataset, data_dir=str(data_dir), train_split='train',
                     eval_split='val', num_classes=CLASSES, image_size=63, resize_size=SIZE,
                     **overrides)


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {path.name: path.read_bytes() for path in sorted(root.iterdir())}


@pytest.fixture(scope='module')
def prepared(folder, tmp_path_factory) -> pathlib.Path:
  """The folder prepared in one process, 2 examples a shard (train: 5 shards, val: 3)."""
  output = tmp_path_factory.mktemp('prepared')
  assert prepare.prepare(_config(folder), str(output), examples_per_shard=2)
  return output


def _records(output: pathlib.Path, split: str) -> list[dict]:
  """Every record of a split's shards, parsed independently of PreparedSource."""
  metadata = json.loads((output / prepare.METADATA).read_text())
  records = []
  for name in metadata['splits'][split]['shards']:
    for record in tf.data.TFRecordDataset(str(output / name)).as_numpy_iterator():
      features = tf.train.Example.FromString(record).features.feature
      records.append({'jpeg': features['image/encoded'].bytes_list.value[0],
                      'label': features['image/class/label'].int64_list.value[0],
                      'key': features['image/filename'].bytes_list.value[0].decode()})
  return records


def test_metadata_counts_labels_and_class_names_equal_the_folders(folder, prepared):
  metadata = json.loads((prepared / prepare.METADATA).read_text())
  class_names = sorted(os.listdir(folder / 'train'))
  assert metadata['class_names'] == class_names
  assert metadata['settings']['size'] == SIZE and metadata['settings']['quality'] == 90
  for split in PER_CLASS:
    listed = {name: sorted(os.listdir(folder / split / name)) for name in class_names}
    good = {name: [f for f in files if f != BROKEN] for name, files in listed.items()}
    info = metadata['splits'][split]
    assert info['class_counts'] == {name: len(files) for name, files in good.items()}
    assert info['num_examples'] == sum(map(len, good.values()))
    assert info['num_listed'] == sum(map(len, listed.values()))
    records = _records(prepared, split)
    # The folder lists classes sorted, files sorted, the label its class index; the shards
    # hold that list in prepare.ORDER_SEED's permutation, less the file that does not decode.
    listing = [(str(folder / split / name / f), class_names.index(name))
               for name in class_names for f in listed[name]]
    order = np.random.default_rng(prepare.ORDER_SEED).permutation(len(listing))
    assert [(r['key'], r['label']) for r in records] == [
        listing[i] for i in order if not listing[i][0].endswith(BROKEN)]
    assert metadata['settings']['order_seed'] == list(prepare.ORDER_SEED)
  assert metadata['splits']['train']['failed'] == [str(folder / 'train' / class_names[0] /
                                                       BROKEN)]
  assert metadata['splits']['train']['num_failed'] == 1
  assert metadata['splits']['val']['num_failed'] == 0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  return 10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b) ** 2))


def _pil_canvas(path: str) -> np.ndarray:
  """The central square resized to SIZE x SIZE by PIL (antialiased bilinear): [SIZE, SIZE, 3]."""
  image = Image.open(path).convert('RGB')
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  square = image.crop((left, top, left + side, top + side))
  return np.asarray(square.resize((SIZE, SIZE), Image.BILINEAR), np.float64)


def test_images_are_the_canvas_close_to_pils(prepared):
  for split in PER_CLASS:
    for record in _records(prepared, split):
      decoded = tf.io.decode_jpeg(record['jpeg']).numpy()
      assert decoded.shape == (SIZE, SIZE, 3)
      # Measured 32.6-39.0 dB at 72 px (JPEG at quality 90 and TF's resize against PIL's).
      assert _psnr(decoded, _pil_canvas(record['key'])) > 30, record['key']


def test_keep_aspect_keeps_the_whole_image_with_the_shorter_side_the_size(folder, tmp_path):
  config = _config(folder)
  config.eval_split = 'train'
  assert prepare.prepare(config, str(tmp_path), keep_aspect=True, examples_per_shard=100)
  for record in _records(tmp_path, 'train'):
    width, height = Image.open(record['key']).size
    short = min(width, height)
    expected = (height * SIZE // short, width * SIZE // short)
    assert tf.io.decode_jpeg(record['jpeg']).numpy().shape == expected + (3,)
  assert expected[0] != expected[1]  # The last class's photos are not square.


def test_a_resumed_preparation_equals_an_uninterrupted_one(folder, prepared, tmp_path, caplog):
  resumed = tmp_path / 'resumed'
  shutil.copytree(prepared, resumed)
  # The train shard that holds the bad file (its JSON lists it).
  (with_bad,) = [path for path in resumed.glob('train-*.json')
                 if json.loads(path.read_text())['failed']]
  with_bad.with_suffix('.tfrecord').unlink()
  (resumed / prepare.METADATA).unlink()
  before = os.stat(resumed / 'val-00000-of-00003.tfrecord').st_mtime_ns
  caplog.set_level('WARNING')
  assert prepare.prepare(_config(folder), str(resumed), examples_per_shard=2)
  assert _files(resumed) == _files(prepared)
  # The bad file, named with the decoder's reason on one line.
  (warning,) = [r.getMessage() for r in caplog.records if 'Cannot decode' in r.getMessage()]
  assert BROKEN in warning and 'Unknown image file format' in warning and '\n' not in warning
  # Finished shards are kept, not rewritten.
  assert os.stat(resumed / 'val-00000-of-00003.tfrecord').st_mtime_ns == before


def test_two_processes_write_disjoint_shards_whose_union_is_the_whole(folder, prepared,
                                                                      tmp_path):
  written = []
  for index in (0, 1):
    # Process 1 finishes last, yet only --shard_index=0 writes metadata.json: one writer.
    assert not prepare.prepare(_config(folder), str(tmp_path), shard_index=index, num_shards=2,
                               examples_per_shard=2)
    written.append(set(_files(tmp_path)) - set().union(*written))
  assert prepare.METADATA not in _files(tmp_path)
  shards = [{name for name in names if name.endswith('.tfrecord')} for names in written]
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == {name for name in _files(prepared)
                                   if name.endswith('.tfrecord')}
  assert prepare.prepare(_config(folder), str(tmp_path), shard_index=0, num_shards=2,
                         examples_per_shard=2)  # Its rerun, all shards done: writes it.
  assert _files(tmp_path) == _files(prepared)


def test_temporary_names_are_unique_across_hosts(tmp_path, monkeypatch):
  """PIDs repeat across hosts: the host's name and a random part make each name unique."""
  renamed = []
  monkeypatch.setattr(tf.io.gfile, 'rename', lambda old, new, overwrite: renamed.append(old))
  for _ in range(2):
    prepare._write_json(str(tmp_path / 'a.json'), {})  # pylint: disable=protected-access
  assert len(set(renamed)) == 2
  assert all(f'.tmp-{socket.gethostname()}-{os.getpid()}-' in name for name in renamed)


def test_independent_processes_refuse_a_tfds_source_to_prepare(tmp_path):
  """They would each download and prepare it into the same directory."""
  config = _config(tmp_path, dataset='mnist')
  with pytest.raises(ValueError, match='mnist is not prepared.*would each download it.*one job'):
    prepare.prepare(config, str(tmp_path / 'out'), shard_index=1, num_shards=2)


def test_other_settings_in_the_same_output_are_refused(folder, prepared, tmp_path):
  shutil.copytree(prepared, tmp_path / 'out')
  with pytest.raises(ValueError, match='prepared with'):
    prepare.prepare(_config(folder), str(tmp_path / 'out'), quality=80, examples_per_shard=2)


def test_the_source_reads_the_records_in_order_and_shuffled(prepared):
  config = _config(prepared, dataset='prepared')
  source = data_sources.get_source(config)
  metadata = json.loads((prepared / prepare.METADATA).read_text())
  assert source.class_names == metadata['class_names'] and source.encoded
  # Written at full chroma resolution: training may decode a crop's window alone.
  assert source.full_chroma_canvases and not metadata['settings']['chroma_downsampling']
  records = _records(prepared, 'train')
  assert source.num_examples('train') == len(records)
  handles = list(source.handles('train').as_numpy_iterator())
  assert [(h['key'].decode(), h['label']) for h in handles] == [
      (r['key'], r['label']) for r in records]
  assert handles[0]['image'] == records[0]['jpeg']
  shuffled = [h['key'] for h in source.handles('train', shuffle_seed=(0, 1)).as_numpy_iterator()]
  assert sorted(shuffled) == sorted(h['key'] for h in handles)


@pytest.mark.slow
def test_a_short_training_run_on_the_prepared_data(prepared, tmp_path):
  config = _config(prepared, dataset='prepared', batch_size=4, eval_batch_size=8,
                   num_train_steps=2, prefetch_to_device=1, num_devices=1, cache=False)
  _, final = train.train_and_evaluate(config, epath.Path(tmp_path))
  assert final['skipped_train_images'] == 0 and final['skipped_eval_images'] == 0
  assert final['step'] == 2 and np.isfinite(final['eval_loss'])


@pytest.mark.slow
def test_missing_data_is_one_line_and_a_nonzero_exit(tmp_path):
  command = [sys.executable, '-m', 'alexnet_jax.prepare', '--config=configs/imagenette.py',
             f'--config.data_dir={tmp_path / "nothing"}', f'--output={tmp_path / "out"}']
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if 'ValueError' in line]
  assert len(errors) == 1 and 'does not exist' in errors[0], result.stderr


def _bytes_read() -> int:
  """Bytes this process has read from files so far (Linux's rchar)."""
  with open('/proc/self/io') as f:
    return int(next(line for line in f if line.startswith('rchar')).split()[1])


def test_each_of_two_processes_reads_only_its_own_shards(prepared):
  """The shards each process opens, the records it gets and the bytes it reads: disjoint
  shares whose union is the split, and about half the split's bytes each."""
  source = data_sources.get_source(_config(prepared, dataset='prepared'))
  metadata = json.loads((prepared / prepare.METADATA).read_text())['splits']['train']
  records = [r['key'] for r in _records(prepared, 'train')]  # 9: the text file did not decode.
  # The bad file was in the last shard of prepare.ORDER_SEED's order.
  assert metadata['shard_sizes'] == [2, 2, 2, 2, 1] and len(records) == 9
  # Process 0 of 2 reads records 0-3 (shards 0-1), process 1 records 4-8 (shards 2-4). Of 3,
  # process 1 reads records 3-5: the first record of shard 1 stepped over (read, not parsed).
  shard = lambda k: str(prepared / metadata['shards'][k])  # pylint: disable=unnecessary-lambda-assignment
  expected = [[(shard(0), 0, 2), (shard(1), 0, 2)],
              [(shard(2), 0, 2), (shard(3), 0, 2), (shard(4), 0, 1)]]
  assert [source.files_read('train', index, 3) for index in range(3)] == [
      [(shard(0), 0, 2), (shard(1), 0, 1)], [(shard(1), 1, 1), (shard(2), 0, 2)],
      [(shard(3), 0, 2), (shard(4), 0, 1)]]
  list(source.handles('train').as_numpy_iterator())  # Warm up TensorFlow's own reads.
  keys = []
  for index in range(2):
    assert source.files_read('train', index, 2) == expected[index]
    before = _bytes_read()
    handles = list(source.handles('train', shuffle_seed=(0, 1), process_index=index,
                                  process_count=2).as_numpy_iterator())
    read = _bytes_read() - before
    files = {path for path, _, _ in expected[index]}
    assert sum(map(os.path.getsize, files)) <= read < sum(map(os.path.getsize, files)) + 4096
    keys.append(sorted(h['key'].decode() for h in handles))
  assert keys == [sorted(records[:4]), sorted(records[4:])]


def test_two_processes_train_on_their_shares_deterministically_and_resume_exactly(prepared):
  config = _config(prepared, dataset='prepared', batch_size=4)  # 2 steps an epoch, 2 a process.
  records = _records(prepared, 'train')
  for index, share in ((0, records[:4]), (1, records[4:])):
    stream = [next(it) for it in [input_pipeline.create_train_iterator(
        config, process_index=index, process_count=2)] for _ in range(3)]
    again = input_pipeline.create_train_iterator(config, process_index=index, process_count=2)
    resumed = input_pipeline.create_train_iterator(config, start_step=1, process_index=index,
                                                   process_count=2)
    np.testing.assert_array_equal(next(again)['image'], stream[0]['image'])
    for expected in stream[1:]:
      np.testing.assert_array_equal(next(resumed)['image'], expected['image'])
    share_labels = np.bincount([r['label'] for r in share], minlength=CLASSES)
    for batch in stream:  # Examples of its own share only (labels are what batches show).
      assert batch['image'].shape == (2, 63, 63, 3)
      assert np.all(np.bincount(batch['label'], minlength=CLASSES) <= share_labels)


def test_metadata_of_an_older_prepare_is_one_clear_error(prepared, tmp_path):
  old = tmp_path / 'old'
  shutil.copytree(prepared, old)
  metadata = json.loads((old / prepare.METADATA).read_text())
  del metadata['splits']['train']['shard_sizes']
  (old / prepare.METADATA).write_text(json.dumps(metadata))
  source = data_sources.get_source(_config(old, dataset='prepared'))
  with pytest.raises(ValueError, match='lacks the shard sizes.*into a new --output'):
    source.files_read('train', 0, 2)
