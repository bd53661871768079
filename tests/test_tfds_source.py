"""The TFDS path, without the real ImageNet: TFDS's own imagenet2012 builder prepares a tiny
manual download made of real photos, and the missing-download errors say what to do."""

import importlib.resources
import json
import os
import pathlib
import socket
import sys
import tarfile
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from alexnet_jax import data_sources
from alexnet_jax import input_pipeline
from configs import fashion_mnist
from configs import imagenet
from test_cluster import run_together
from test_distributed import free_port, with_devices

WNIDS = ('n01443537', 'n01534433', 'n01558993')  # goldfish, junco, robin.
NUM_VAL = 4


def _tiny_imagenet_manual_dir(manual_dir, photos_dir):
  """ILSVRC2012_img_{train,val}.tar as image-net.org ships them: a tar of per-class tars
  (2 images each) and a tar of ILSVRC2012_val_<n>.JPEG (labels from TFDS's bundled list)."""
  manual_dir.mkdir()
  with tarfile.open(manual_dir / 'ILSVRC2012_img_train.tar', 'w') as train:
    for wnid in WNIDS:
      photo = next(photos_dir.glob(f'{wnid}_*.JPEG'))
      class_tar = manual_dir / f'{wnid}.tar'
      with tarfile.open(class_tar, 'w') as images:
        for i in range(2):
          images.add(photo, arcname=f'{wnid}_{i}.JPEG')
      train.add(class_tar, arcname=class_tar.name)
      class_tar.unlink()
  with tarfile.open(manual_dir / 'ILSVRC2012_img_val.tar', 'w') as val:
    for i, photo in enumerate(sorted(photos_dir.glob('*.JPEG'))[:NUM_VAL]):
      val.add(photo, arcname=f'ILSVRC2012_val_{i + 1:08d}.JPEG')


def _config(data_dir, manual_dir=None):
  config = imagenet.get_config()  # dataset='imagenet2012', eval_split='validation'.
  config.data_dir = str(data_dir)
  config.manual_dir = manual_dir and str(manual_dir)
  config.image_size = 32
  config.resize_size = 40
  config.batch_size = 2
  config.eval_batch_size = 3
  return config


@pytest.fixture(scope='module')
def imagenet_data_dir(tmp_path_factory, imagenet_samples_dir):
  """A TFDS data dir where our pipeline prepared the tiny imagenet2012 (about 7 s)."""
  root = tmp_path_factory.mktemp('tfds')
  _tiny_imagenet_manual_dir(root / 'manual', imagenet_samples_dir)
  with pytest.MonkeyPatch.context() as patch:
    try:
      import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      # TFDS 4.9.10 needs it to build but declares it for Python < 3.9 only
      # (tensorflow/datasets#11212); the standard library has the same class.
      patch.setitem(sys.modules, 'importlib_resources', importlib.resources)
    input_pipeline.get_dataset_info(_config(root, root / 'manual'))  # Prepares it.
  return root


def test_prepared_imagenet2012(imagenet_data_dir):
  config = _config(imagenet_data_dir)
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 6, 4)
  assert [info.class_names.index(wnid) for wnid in WNIDS] == [1, 13, 15]

  train = input_pipeline.create_train_iterator(config)
  batches = [next(train) for _ in range(6)]  # Two epochs.
  for batch in batches:
    assert batch['image'].shape == (2, 32, 32, 3) and batch['image'].dtype == np.uint8
  for epoch in (batches[:3], batches[3:]):
    labels = np.sort(np.concatenate([b['label'] for b in epoch]))
    np.testing.assert_array_equal(labels, [1, 1, 13, 13, 15, 15])
  resumed = next(input_pipeline.create_train_iterator(config, start_step=4))
  np.testing.assert_array_equal(resumed['image'], batches[4]['image'])

  batches = list(input_pipeline.create_eval_iterator(config))
  assert len(batches) == 2 and sum(b['mask'].sum() for b in batches) == NUM_VAL
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  builder = tfds.builder('imagenet2012', data_dir=str(imagenet_data_dir))
  expected = [example['label'] for example in tfds.as_numpy(builder.as_dataset('validation'))]
  np.testing.assert_array_equal(labels, expected)


def test_two_processes_read_disjoint_slices_whose_union_is_the_split(imagenet_data_dir):
  config = _config(imagenet_data_dir)
  source = data_sources.get_source(config)
  every = sorted(h['key'] for h in source.handles('train').as_numpy_iterator())
  shares = [sorted(h['key'] for h in source.handles(
      'train', shuffle_seed=(0, 0), process_index=i, process_count=2).as_numpy_iterator())
            for i in range(2)]
  # TFDS's reader yields the records of train[0:3] and train[3:6] only.
  assert len(every) == 6 and shares == [every[:3], every[3:]]
  config.eval_batch_size = 2
  counts = [sum(b['mask'].sum() for b in input_pipeline.create_eval_iterator(
      config, process_index=i, process_count=2)) for i in range(2)]
  assert counts == [NUM_VAL // 2] * 2


def test_missing_imagenet_download_says_what_to_do(tmp_path):
  manual_dir = tmp_path / 'downloads' / 'manual'
  manual_dir.mkdir(parents=True)
  (manual_dir / 'ILSVRC2012_img_train.tar').touch()
  with pytest.raises(ValueError) as error:
    input_pipeline.get_dataset_info(_config(tmp_path))
  message = str(error.value)
  assert f'missing: {manual_dir}/ILSVRC2012_img_val.tar.' in message
  assert 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar' in message
  assert f'tfds build imagenet2012 --data_dir={tmp_path} --manual_dir={manual_dir}' in message

  with pytest.raises(ValueError, match=f'missing: {tmp_path}/elsewhere/ILSVRC2012_img_train'):
    input_pipeline.get_dataset_info(_config(tmp_path, tmp_path / 'elsewhere'))


def test_unprepared_dataset_without_internet(tmp_path, monkeypatch):
  def no_internet(*args, **kwargs):
    raise ConnectionError('Failed to resolve storage.googleapis.com')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_internet)
  config = _config(tmp_path)
  config.dataset = 'mnist'
  with pytest.raises(ValueError, match=f'(?s)mnist is not prepared in {tmp_path}.*'
                     'Failed to resolve.*tfds build mnist'):
    input_pipeline.get_dataset_info(config)
  config.dataset = 'no_such_dataset'
  with pytest.raises(ValueError, match="neither 'folder', 'digits', 'prepared', 'fake' nor"):
    input_pipeline.get_dataset_info(config)


def test_a_dataset_that_cannot_be_downloaded_fails_within_seconds(tmp_path, monkeypatch):
  """configs/fashion_mnist.py without the internet: TFDS's real downloader, whose retries took
  3 min 24 s before the same message."""
  def no_dns(host, *args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, f'Name or service not known: {host}')

  monkeypatch.setattr(socket, 'getaddrinfo', no_dns)  # Offline, whatever the machine's network.
  config = fashion_mnist.get_config()
  config.data_dir = str(tmp_path)
  start = time.monotonic()
  with pytest.raises(ValueError, match=f'(?s)fashion_mnist is not prepared in {tmp_path} and '
                     'preparing it failed .*ConnectionError.*tfds build fashion_mnist'):
    input_pipeline.get_dataset_info(config)
  assert time.monotonic() - start < 30


_PREPARE_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from absl import logging
import jax
logging.set_verbosity(logging.INFO)
jax.distributed.initialize('127.0.0.1:{port}', num_processes=2, process_id={index})
from alexnet_jax import data_sources
builder = data_sources.tfds_builder('imagenet2012', {data_dir!r}, {manual_dir!r})
print('PREPARED', builder.is_prepared(), builder.info.splits['train'].num_examples)
"""


@pytest.mark.slow
def test_two_processes_prepare_once_on_process_0(tmp_path, imagenet_samples_dir):
  """Process 0 alone runs download_and_prepare; process 1 waits for it, then reads it."""
  _tiny_imagenet_manual_dir(tmp_path / 'manual', imagenet_samples_dir)
  repo, port = str(pathlib.Path(__file__).resolve().parents[1]), free_port()
  codes, logs = run_together(
      [[sys.executable, '-c', _PREPARE_SCRIPT.format(
          repo=repo, port=port, index=index, data_dir=str(tmp_path / 'tfds'),
          manual_dir=str(tmp_path / 'manual'))] for index in (0, 1)],
      [with_devices(dict(os.environ), 1)] * 2)
  assert codes == [0, 0], [log[-2000:] for log in logs]
  assert all('PREPARED True 6' in log for log in logs), [log[-2000:] for log in logs]
  assert 'Preparing TFDS imagenet2012' in logs[0]
  assert 'Preparing TFDS imagenet2012' not in logs[1]


@pytest.mark.slow
def test_a_job_of_two_processes_prepares_tfds_once_and_shares_the_shards(tmp_path,
                                                                       imagenet_samples_dir,
                                                                       env):
  """`python -m alexnet_jax.prepare` as one job: process 0 prepares TFDS (process 1 waits),
  each writes its shards, process 0 the metadata of all."""
  _tiny_imagenet_manual_dir(tmp_path / 'manual', imagenet_samples_dir)
  coordinator = [f'--coordinator_address=127.0.0.1:{free_port()}', '--num_processes=2']
  codes, logs = run_together(
      [[sys.executable, '-m', 'alexnet_jax.prepare', '--config=configs/imagenet.py',
        f'--config.data_dir={tmp_path / "tfds"}', f'--config.manual_dir={tmp_path / "manual"}',
        '--config.resize_size=40', f'--output={tmp_path / "out"}', '--examples_per_shard=2',
        *coordinator, f'--process_id={index}'] for index in (0, 1)],
      [with_devices(env, 1)] * 2)
  assert codes == [0, 0], [log[-2000:] for log in logs]
  # 3 train and 2 validation shards; process 0 has 0, 2 and 4 of them, process 1 the others.
  assert logs[0].count('Preparing TFDS imagenet2012') == 1
  assert 'this process has 3 of the 5' in logs[0]
  metadata = json.loads((tmp_path / 'out' / 'metadata.json').read_text())
  assert {split: info['num_examples'] for split, info in metadata['splits'].items()} == {
      'train': 6, 'validation': NUM_VAL}
  assert not list((tmp_path / 'out').glob('*.tmp-*'))
