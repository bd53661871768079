"""The prepared 256x256 dataset against the original photos: preparation speed, size on disk
and training-pipeline throughput.

Prepares the ImageNet photos of shared/data (original sizes, one class per photo) with
alexnet_jax.prepare, timing it, then times create_train_iterator (the paper's augmentation,
float32 batches) on the original folder and on the prepared shards, interleaved A B A B over
several rounds, each from a fresh iterator (benchmarks.input_pipeline's time_tf). Pin it to one
core to measure per core:

  taskset -c 0 python -m benchmarks.prepared_data --rounds=5
"""

import os
import pathlib
import platform
import statistics
import tempfile
import time

from absl import app

from alexnet_jax import input_pipeline
from alexnet_jax import prepare
from benchmarks import input_pipeline as benchmark
from configs import imagenet


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as root:
    folder, output = pathlib.Path(root, 'folder'), pathlib.Path(root, 'prepared')
    num_classes = benchmark.make_folder(pathlib.Path(benchmark._PHOTOS.value), folder,  # pylint: disable=protected-access
                                        benchmark._COPIES.value)  # pylint: disable=protected-access
    config = imagenet.get_config()
    config.dataset, config.data_dir = 'folder', str(folder)
    config.eval_split = 'train'  # One split: prepared once.
    config.num_classes = num_classes
    config.batch_size = benchmark._BATCH_SIZE.value  # pylint: disable=protected-access
    config.private_threadpool_size = config.num_parallel_calls = 1
    start = time.perf_counter()
    prepare.prepare(config, str(output))
    seconds = time.perf_counter() - start
    num_images = input_pipeline.get_dataset_info(config).num_train_examples
    size = sum(path.stat().st_size for path in output.glob('*.tfrecord'))
    print(f'prepared {num_images} images in {seconds:.1f} s ({num_images / seconds:.1f} '
          f'images/s, listing and tracing included), {size / num_images / 1024:.1f} KiB an '
          f'image at quality {prepare.DEFAULT_QUALITY}')

    configs = {'original': config, 'prepared': config.copy_and_resolve_references()}
    configs['prepared'].dataset, configs['prepared'].data_dir = 'prepared', str(output)
    rounds, batches = benchmark._ROUNDS.value, benchmark._BATCHES.value  # pylint: disable=protected-access
    results = {name: [] for name in configs}
    for name, c in configs.items():
      benchmark.time_tf(c, 0, 1)  # Warm up (listing, tracing).
    for round_ in range(rounds):
      step = (round_ + 1) * (batches + 1)
      for name in (list(configs) if round_ % 2 == 0 else list(configs)[::-1]):
        results[name].append(benchmark.time_tf(configs[name], step, batches))
      print(f'round {round_ + 1}: ' + ', '.join(f'{name} {values[-1]:.0f} img/s'
                                              for name, values in results.items()))
  original, prepared = results['original'], results['prepared']
  print(f'\n{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, '
        f'TensorFlow {input_pipeline.tf.__version__}; {rounds} rounds of {batches} batches of '
        f'{config.batch_size}')
  print(f'original {statistics.median(original):.0f} img/s, prepared '
        f'{statistics.median(prepared):.0f} img/s: {statistics.median(prepared) / statistics.median(original):.2f}x '
        f'(median of per-round ratios '
        f'{statistics.median(b / a for a, b in zip(original, prepared)):.2f}x)')


if __name__ == '__main__':
  app.run(main)
