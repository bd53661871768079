"""The tf.data pipelines on real images: image folders, digits, fake data and the contract
the training loop relies on (shapes, sharding, determinism, resuming, bad files)."""

import logging
import threading
import time

import numpy as np
from PIL import Image
import pytest

from alexnet_jax import input_pipeline
from alexnet_jax import normalize
from alexnet_jax import preprocessing
from configs import default
from configs import imagenet

MEAN = np.array(preprocessing.IMAGENET_MEAN_RGB, np.float32)
NUM_TRAIN = (5, 5, 5)  # Images per class of the folder fixture.
NUM_VAL = (4, 4, 3)


def _link_images(source_dir, target_dir, num):
  target_dir.mkdir(parents=True)
  for path in sorted(source_dir.iterdir())[:num]:
    (target_dir / path.name).symlink_to(path)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory, imagenette_dir):
  """Three imagenette classes, 5 train and 4/4/3 val images each (symlinks)."""
  root = tmp_path_factory.mktemp('image_folder')
  classes = sorted(path.name for path in (imagenette_dir / 'train').iterdir())[:3]
  for split, counts in (('train', NUM_TRAIN), ('val', NUM_VAL)):
    for name, num in zip(classes, counts):
      _link_images(imagenette_dir / split / name, root / split / name, num)
  return root


def _folder_config(root, **overrides):
  config = imagenet.get_config()
  config.dataset = 'folder'
  config.data_dir = str(root)
  config.eval_split = 'val'
  config.num_classes = 3
  config.image_size = 32
  config.resize_size = 40
  config.batch_size = 5
  config.eval_batch_size = 4
  config.update(overrides)
  return config


def _take(iterator, num):
  return [next(iterator) for _ in range(num)]


def _pil_eval_image(path, resize_size, image_size):
  image = Image.open(path).convert('RGB')
  width, height = image.size
  side = min(width, height)
  x, y = (width - side) // 2, (height - side) // 2
  canvas = image.crop((x, y, x + side, y + side)).resize((resize_size, resize_size),
                                                         Image.BILINEAR)
  offset = (resize_size - image_size) // 2
  return np.asarray(canvas, np.float32)[offset:offset + image_size, offset:offset + image_size]


def test_folder_info_labels_and_values(image_folder):
  config = _folder_config(image_folder)
  info = input_pipeline.get_dataset_info(config)
  classes = sorted(path.name for path in (image_folder / 'train').iterdir())
  assert info == input_pipeline.DatasetInfo(3, 15, 11, classes)

  batches = list(input_pipeline.create_eval_iterator(config))
  assert len(batches) == 3  # ceil(11 / 4).
  for batch in batches:
    assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32 and batch['mask'].dtype == bool
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])[mask]
  np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], NUM_VAL))  # Sorted folders.
  assert mask.sum() == 11 and not mask[11:].any()

  # The first val image, independently with PIL (antialiased bilinear 224 -> 40).
  first = sorted((image_folder / 'val' / classes[0]).iterdir())[0]
  expected = _pil_eval_image(first, 40, 32)
  assert np.abs(batches[0]['image'][0] - expected).mean() < 0.5


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_sees_every_example_once(image_folder, process_count):
  config = _folder_config(image_folder)
  reference = list(input_pipeline.create_eval_iterator(config))
  expected = sorted(image.tobytes() for b in reference for image in b['image'][b['mask']])
  seen, num_batches = [], []
  for index in range(process_count):
    batches = list(input_pipeline.create_eval_iterator(config, process_index=index,
                                                       process_count=process_count))
    num_batches.append(len(batches))
    assert all(b['image'].shape[0] == 4 // process_count for b in batches)
    seen += [image.tobytes() for b in batches for image in b['image'][b['mask']]]
  assert num_batches == [3] * process_count
  assert sorted(seen) == expected and len(set(seen)) == 11


def test_train_options_and_cached_eval(image_folder):
  config = _folder_config(image_folder, train_crop='random_resized', num_parallel_calls=1,
                          private_threadpool_size=1, deterministic=False, cache=True)
  batches = _take(input_pipeline.create_train_iterator(config), 3)  # One epoch.
  assert all(b['image'].shape == (5, 32, 32, 3) for b in batches)
  np.testing.assert_array_equal(np.bincount(np.concatenate([b['label'] for b in batches])),
                                NUM_TRAIN)
  first, second = (list(input_pipeline.create_eval_iterator(config)) for _ in range(2))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_eval_ten_crops_and_steps_limit(image_folder):
  config = _folder_config(image_folder, eval_crops=10, steps_per_eval=2)
  batches = list(input_pipeline.create_eval_iterator(config))
  assert len(batches) == 2 and batches[0]['image'].shape == (4, 10, 32, 32, 3)
  centre = list(input_pipeline.create_eval_iterator(config, crops=1))[0]['image']
  np.testing.assert_allclose(batches[0]['image'][:, 4], centre, atol=0.01)  # Float rounding.


def test_train_is_deterministic_and_resumes_exactly(image_folder):
  config = _folder_config(image_folder)  # 3 steps per epoch of 5.
  stream = _take(input_pipeline.create_train_iterator(config), 8)
  for batch in stream:
    assert batch['image'].shape == (5, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (5,) and batch['label'].dtype == np.int32
    assert batch['lighting'].shape == (5, 3) and batch['lighting'].dtype == np.float32
  for epoch in range(2):  # Every example once per epoch.
    labels = np.concatenate([b['label'] for b in stream[3 * epoch:3 * epoch + 3]])
    np.testing.assert_array_equal(np.bincount(labels), NUM_TRAIN)
  epoch_labels = [np.concatenate([b['label'] for b in stream[i:i + 3]]) for i in (0, 3)]
  assert not np.array_equal(*epoch_labels)  # Each epoch its own order.

  again = _take(input_pipeline.create_train_iterator(config), 8)
  resumed = _take(input_pipeline.create_train_iterator(config, start_step=4), 4)
  for expected, batch in zip(stream + stream[4:], again + resumed):
    np.testing.assert_array_equal(batch['image'], expected['image'])
    np.testing.assert_array_equal(batch['label'], expected['label'])

  other_seed = next(input_pipeline.create_train_iterator(_folder_config(image_folder, seed=1)))
  assert not np.array_equal(other_seed['image'], stream[0]['image'])


def test_train_processes_split_each_global_batch(image_folder):
  """A folder's handles are paths: each process opens only the files of its slots, and the
  global batch does not depend on the process count (TFDS and prepared shards: test_prepare,
  test_tfds_source)."""
  config = _folder_config(image_folder, batch_size=6)  # 2 steps per epoch.
  stream = _take(input_pipeline.create_train_iterator(config, start_step=1), 3)
  parts = [_take(input_pipeline.create_train_iterator(config, start_step=1, process_index=i,
                                                      process_count=2), 3) for i in range(2)]
  for step, batch in enumerate(stream):
    for name in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][name], parts[1][step][name]]), batch[name])



def test_bad_images_are_skipped_counted_and_named(folder_with_bad_files, caplog):
  config = _folder_config(folder_with_bad_files, num_classes=2, batch_size=4,
                          random_flip=False, pca_lighting_std=0.0)
  caplog.set_level(logging.WARNING)
  train = input_pipeline.create_train_iterator(config)
  batches = _take(train, 2)  # One epoch: all 8 files.
  assert train.num_skipped == 2
  assert 'truncated.JPEG' in caplog.text and 'not_an_image.JPEG' in caplog.text
  images = np.concatenate([b['image'] for b in batches])
  assert images.shape == (8, 32, 32, 3) and np.all(images.reshape(8, -1).std(axis=1) > 1)
  # The two stand-ins are copies of decoded examples of their batches.
  assert len({image.tobytes() for image in images}) == 6

  evaluation = input_pipeline.create_eval_iterator(config)
  batches = list(evaluation)
  assert evaluation.num_skipped == 2
  assert sum(b['mask'].sum() for b in batches) == 6

  raising = _folder_config(folder_with_bad_files, num_classes=2, on_bad_image='raise')
  with pytest.raises(ValueError, match='truncated.JPEG|not_an_image.JPEG'):
    list(input_pipeline.create_eval_iterator(raising))
  with pytest.raises(ValueError, match='truncated.JPEG|not_an_image.JPEG'):
    _take(input_pipeline.create_train_iterator(raising), 2)


def test_digits():
  config = default.get_config()
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (1437, 360)
  assert info.class_names == [str(c) for c in range(10)]

  batches = list(input_pipeline.create_eval_iterator(config))
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])[mask]
  assert len(batches) == 3 and mask.sum() == 360
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  # Stratified: each class gives a fifth of its examples to the test split.
  assert np.all(np.abs(np.bincount(labels) - np.bincount(digits.target) * 0.2) <= 1)

  # The first test image, independently: 0..16 -> 0..255, bilinear 8 -> 72, centre 64, then
  # (x - mean) / std per channel on the device (the default config divides by the ImageNet
  # std); uint8 pixels (each rounded once or twice: 1 / 57 after the std).
  first = np.sort(_digit_test_indices(digits))[0]
  grey = Image.fromarray(digits.images[first].astype(np.float32) * 255 / 16, mode='F')
  canvas = np.asarray(grey.resize((72, 72), Image.BILINEAR))[4:68, 4:68]
  expected = (canvas[..., None] - MEAN) / np.array([58.395, 57.12, 57.375])
  assert config.divide_by_std
  assert batches[0]['image'].shape == (128, 64, 64, 3)
  got = normalize.for_config(config)({'image': batches[0]['image'][:1]})[0]
  np.testing.assert_allclose(got, expected, atol=1.01 / 57)
  assert batches[0]['label'][0] == digits.target[first]

  batch = next(input_pipeline.create_train_iterator(config))
  assert batch['image'].shape == (64, 64, 64, 3) and batch['label'].shape == (64,)


def _digit_test_indices(digits):
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  return model_selection.train_test_split(np.arange(len(digits.target)), test_size=0.2,
                                          stratify=digits.target, random_state=0)[1]


def test_fake_data():
  config = imagenet.get_config()
  config.dataset = 'fake'
  config.image_size = 4
  config.batch_size = 8
  config.eval_batch_size = 20_000
  assert input_pipeline.get_dataset_info(config).num_train_examples == 1_281_167
  batch = next(input_pipeline.create_train_iterator(config, process_count=2))
  assert batch['image'].shape == (4, 4, 4, 3) and batch['label'].dtype == np.int32
  assert batch['image'].dtype == np.uint8 and batch['lighting'].shape == (4, 3)
  batches = list(input_pipeline.create_eval_iterator(config, crops=10, process_index=1,
                                                     process_count=2))
  assert len(batches) == 3 and batches[0]['image'].shape == (10_000, 10, 4, 4, 3)
  # Process 1's share is examples 25,000-49,999: its third batch half padding.
  assert [b['mask'].sum() for b in batches] == [10_000, 10_000, 5_000]


def test_fake_data_under_a_mean_image_subtracts_its_central_window(tmp_path):
  config = imagenet.get_config()
  config.update(dataset='fake', image_size=4, resize_size=8, batch_size=2, eval_batch_size=2,
                mean_subtraction='pixel', pca_lighting_std=0.0,
                mean_image_path=str(tmp_path / 'mean.npy'))
  mean = np.arange(8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3)
  np.save(tmp_path / 'mean.npy', mean)
  normalization = normalize.for_config(config)
  for batch in (next(input_pipeline.create_train_iterator(config)),
                next(input_pipeline.create_eval_iterator(config))):
    np.testing.assert_array_equal(normalization(batch),
                                  batch['image'].astype(np.float32) - mean[2:6, 2:6])


def test_mean_image_and_pixel_subtraction(image_folder, tmp_path):
  from alexnet_jax import mean_image  # pylint: disable=g-import-not-at-top
  config = _folder_config(image_folder, mean_subtraction='pixel')
  mean = mean_image.compute_mean_image(config)
  train_dir = image_folder / 'train'
  canvases = [_pil_eval_image(path, 40, 40) for path in sorted(train_dir.glob('*/*'))]
  assert mean.shape == (40, 40, 3) and mean.dtype == np.float32
  assert np.abs(mean - np.mean(canvases, axis=0)).max() < 0.5

  with pytest.raises(ValueError, match='alexnet_jax.mean_image'):
    input_pipeline.create_eval_iterator(config)
  config.mean_image_path = str(tmp_path / 'mean.npy')
  np.save(config.mean_image_path, mean)
  centred = next(input_pipeline.create_eval_iterator(config))
  plain = next(input_pipeline.create_eval_iterator(
      _folder_config(image_folder, mean_subtraction='none')))
  np.testing.assert_array_equal(centred['image'], plain['image'])  # The device subtracts:
  assert np.all(centred['offset'] == 4) and not centred['flip'].any()  # the centre's window.
  assert 'offset' not in plain

  np.save(config.mean_image_path, mean[:32])
  with pytest.raises(ValueError, match=r'shape \(32, 40, 3\)'):
    input_pipeline.create_eval_iterator(config)
  config.train_crop = 'random_resized'
  with pytest.raises(ValueError, match="train_crop='paper'"):
    input_pipeline.create_train_iterator(config)


def test_clear_errors(image_folder, tmp_path):
  with pytest.raises(ValueError, match='num_classes=3'):
    input_pipeline.get_dataset_info(_folder_config(image_folder, num_classes=1000))
  with pytest.raises(ValueError, match='train_crop'):
    input_pipeline.create_train_iterator(_folder_config(image_folder, train_crop='inception'))
  with pytest.raises(ValueError, match='split evenly over 3 processes'):
    input_pipeline.create_train_iterator(_folder_config(image_folder), process_count=3)
  with pytest.raises(ValueError, match=str(tmp_path / 'nowhere' / 'train')):
    input_pipeline.get_dataset_info(_folder_config(tmp_path / 'nowhere'))
  (tmp_path / 'empty' / 'train' / 'some_class').mkdir(parents=True)
  with pytest.raises(ValueError, match=str(tmp_path / 'empty' / 'train' / 'some_class')):
    input_pipeline.get_dataset_info(_folder_config(tmp_path / 'empty'))


def _careful_from_the_start(batches_from, step, on_bad_image):
  del on_bad_image
  return batches_from(step, True)


@pytest.mark.parametrize('bad_files', [False, True])
def test_training_decodes_carefully_from_the_first_bad_batch(
    image_folder, folder_with_bad_files, bad_files, caplog, monkeypatch):
  """The fast map's batches equal the careful decoding's, bit for bit, and a bad file
  switches the stream to careful decoding at its batch: nothing lost or repeated."""
  if bad_files:
    # 4 steps per epoch; the bad files are in the batches of steps 1 and 3 (seed 0).
    config = _folder_config(folder_with_bad_files, num_classes=2, batch_size=2)
  else:
    config = _folder_config(image_folder, batch_size=5)  # 3 steps per epoch.
  start = 2
  with monkeypatch.context() as patch:
    patch.setattr(input_pipeline, '_fall_back_to_careful', _careful_from_the_start)
    careful = input_pipeline.create_train_iterator(config, start_step=start)
    expected, skipped = [], []
    for _ in range(6):
      expected.append(next(careful))
      skipped.append(careful.num_skipped)
  caplog.set_level(logging.WARNING)
  train = input_pipeline.create_train_iterator(config, start_step=start)
  for step, batch in enumerate(_take(train, 6)):
    np.testing.assert_array_equal(batch['image'], expected[step]['image'])
    np.testing.assert_array_equal(batch['label'], expected[step]['label'])
  assert train.num_skipped == skipped[-1]
  if bad_files:
    first_bad = start + next(k for k, num in enumerate(skipped) if num)
    assert first_bad == 3  # A fast batch came first.
    assert f'batch of step {first_bad} does not decode' in caplog.text
  else:
    assert skipped[-1] == 0 and 'does not decode' not in caplog.text


def test_an_eval_split_smaller_than_the_processes_is_refused_by_every_process(image_folder):
  """11 val images over 12 processes: process 11 has a share of 1, yet it must refuse too (it
  would wait for the others' collectives forever)."""
  config = _folder_config(image_folder, eval_batch_size=12)
  for index in (0, 11):
    with pytest.raises(ValueError, match='has 11 examples, fewer than the 12 processes'):
      input_pipeline.create_eval_iterator(config, process_index=index, process_count=12)


class _RecordsDeletion:
  """A dataset stand-in whose numpy iterator notes the thread that deletes it."""

  def __init__(self, ds, deleted_on: list):
    self._ds, self._deleted_on = ds, deleted_on

  def as_numpy_iterator(self):
    return _NotedIterator(self._ds.as_numpy_iterator(), self._deleted_on)


class _NotedIterator:

  def __init__(self, batches, deleted_on: list):
    self._batches, self._deleted_on = batches, deleted_on

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._batches)

  def __del__(self):
    self._deleted_on.append(threading.get_ident())


def _deleting_thread(deleted_on: list) -> int:
  for _ in range(100):  # The deleting thread gets up to 10 s.
    if deleted_on:
      return deleted_on[0]
    time.sleep(0.1)
  raise AssertionError('The iterator was never deleted.')


def test_an_epochs_finished_iterator_is_deleted_off_the_training_thread(image_folder,
                                                                       monkeypatch):
  # Deleting a finished tf.data iterator joins its autotuning thread, which blocked the next
  # batch for up to a minute beside a train step (docs/results.md); the loop must not wait.
  deleted_on = []
  make_epoch = input_pipeline._train_epoch
  monkeypatch.setattr(input_pipeline, '_train_epoch', lambda *args, **kwargs: _RecordsDeletion(
      make_epoch(*args, **kwargs), deleted_on))
  batches = input_pipeline.create_train_iterator(_folder_config(image_folder))
  _take(batches, 4)  # Epoch 0's 3 batches, then epoch 1's first.
  assert _deleting_thread(deleted_on) != threading.get_ident()


def test_a_finished_evaluations_iterator_is_deleted_off_the_calling_thread(image_folder,
                                                                          monkeypatch):
  deleted_on = []
  make_split = input_pipeline._eval_dataset
  monkeypatch.setattr(input_pipeline, '_eval_dataset', lambda *args: _RecordsDeletion(
      make_split(*args), deleted_on))
  batches = input_pipeline.create_eval_iterator(_folder_config(image_folder, cache=False))
  assert len(list(batches)) == 3
  del batches
  assert _deleting_thread(deleted_on) != threading.get_ident()
