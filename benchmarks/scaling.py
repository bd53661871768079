r"""Images/s of the JAX step against the number of devices and the batch size.

Times `steps.train_step` (or `eval_step`) under `parallel.pmap` (or, with --parallelism=mesh,
`jit` over a `Mesh`) on device-resident random data,
the step alone: no input pipeline. On CPU the devices are faked with
--xla_force_host_platform_device_count (set below, before JAX starts), so they share the same
cores: total images/s should stay flat as devices are added, and what it loses is the cost of
the multi-device code path (splitting the batch, the gradient all-reduce, per-device dispatch).
On a multi-GPU host the same table shows real scaling.

    python benchmarks/scaling.py --variant=torchvision --devices=1,2,4 --batches=32,64
    python benchmarks/scaling.py --devices=1 --batches=64,128,256,512 --dtype=bfloat16  # GPU

With --data_dir (an image folder in the ImageNet layout, e.g. shared/data/imagenette2-224), it
also times, per batch size, the tf.data training pipeline alone (the paper's augmentation) and
the train step fed by it through `parallel.prefetch_to_device`, as the training loop feeds it:
the slower of the two is the bottleneck, and on CPU the two share the same cores.

    python benchmarks/scaling.py --devices=1,2 --batches=32,64 \
        --data_dir=../shared/data/imagenette2-224

With --parallelism=model (the paper's split over config.model_parallel_size = 2 devices,
docs/parallelism.md) device counts it does not divide are skipped, and --collectives lists
the collectives of each compiled step: kind, result shape, MB per device and per image, and
the layer that made it.

    python benchmarks/scaling.py --parallelism=model --devices=2,4 --batches=16 --collectives

Takes train_step.py's --variant, --mode, --dtype, --image_size, --parallelism (pmap, mesh or
model), --ops, --rounds, --steps and --warmup.
"""

from collections.abc import Callable
import os
import re
import statistics
import time

_FAKE_CPU_DEVICES = 8
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  # Only the CPU platform reads it; GPUs are counted as they are.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_FAKE_CPU_DEVICES}')

# pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import app
from absl import flags
import jax
import numpy as np

import train_step  # benchmarks/train_step.py: its flags, config, state and step runner.

from alexnet_jax import cpu_convolutions
from alexnet_jax import data_sources
from alexnet_jax import input_pipeline
from alexnet_jax import parallel
from benchmarks import timing
# pylint: enable=g-import-not-at-top,g-bad-import-order

_DEVICES = flags.DEFINE_list('devices', ['1', '2', '4', '8'],
                             'Device counts to time (each <= the local device count).')
_BATCHES = flags.DEFINE_list('batches', ['64'], 'Global batch sizes to time.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Image folder (DIR/train/<class>/<image>): also time the input pipeline '
    'alone and the train step fed by it (train mode only).')
_COLLECTIVES = flags.DEFINE_bool(
    'collectives', False, "Also list each compiled step's collective ops (from its HLO).")
FLAGS = flags.FLAGS
# One collective of an HLO text: its result type(s), its kind, and the op that made it.
_COLLECTIVE = re.compile(r'= (\(.*?\)|\S+) (all-gather|all-reduce|reduce-scatter|'
                         r'collective-permute|all-to-all)(?:-start)?\(.*?op_name="([^"]*)"')
_ARRAY = re.compile(r'(f32|bf16|f16|s32|pred)\[([\d,]*)\]')
_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'pred': 1}


def median_rate(run: Callable[[int], None], batch_size: int) -> float:
  """Median images/s of run(FLAGS.steps) over FLAGS.rounds rounds, after FLAGS.warmup steps."""
  run(FLAGS.warmup)
  seconds = timing.time_interleaved({'run': run}, FLAGS.rounds, FLAGS.steps)['run']
  return batch_size * FLAGS.steps / statistics.median(seconds)


def measure(num_devices: int, batch_size: int) -> float:
  """Images/s of the step alone, on device-resident data."""
  config = train_step.benchmark_config(num_devices, batch_size)
  return median_rate(train_step.jax_runner(config, FLAGS.mode, timing.make_batch(config),
                                           train_step.create_state(config, FLAGS.mode)),
                     batch_size)


def collectives(num_devices: int, batch_size: int) -> list[str]:
  """Table rows of the collectives in the compiled step: kind, result shape, MB per device,
  KB per image of the device's slice of the batch, and the layer (jax op name) it serves."""
  config = train_step.benchmark_config(num_devices, batch_size)
  step, state, batch = train_step.on_devices(config, FLAGS.mode, timing.make_batch(config),
                                             train_step.create_state(config, FLAGS.mode))
  text = step.lower(state, batch).compile().as_text()
  # Under 'model' the devices of a mesh row share their slice of the batch.
  model_size = config.model_parallel_size if config.parallelism == 'model' else 1
  per_device_batch = batch_size * model_size // num_devices
  rows = []
  for kind, shapes, layer in ((m.group(2), m.group(1), m.group(3))
                              for m in map(_COLLECTIVE.search, text.splitlines()) if m):
    size = sum(_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d]))
               for dtype, dims in _ARRAY.findall(shapes))
    shape = ' '.join(f'{t}[{d}]' for t, d in _ARRAY.findall(shapes)[:3])
    rows.append(f'| {kind} | {shape} | {size / 1e6:.3f} | {size / per_device_batch / 1e3:.1f} | '
                f'{layer.split("shard_map/")[-1][:70]} |')
  return rows


def folder_config(num_devices: int, batch_size: int):
  """The benchmark's config reading the training split of the image folder --data_dir."""
  config = train_step.benchmark_config(num_devices, batch_size)
  config.dataset, config.data_dir, config.train_split = 'folder', _DATA_DIR.value, 'train'
  config.eval_split = 'train'  # Nothing is evaluated; the folder needs no other split.
  config.num_classes = len(data_sources.folder_class_names(_DATA_DIR.value, 'train'))
  return config


def measure_pipeline(batch_size: int) -> float:
  """Images/s of the tf.data training pipeline alone (host batches, no device)."""
  batches = input_pipeline.create_train_iterator(folder_config(1, batch_size))

  def run(n: int) -> None:
    for _ in range(n):
      next(batches)
  return median_rate(run, batch_size)


def measure_fed(num_devices: int, batch_size: int) -> float:
  """Images/s of the train step fed by the pipeline, as the training loop feeds it."""
  config = folder_config(num_devices, batch_size)
  data_parallel = parallel.create(config.parallelism, parallel.select_devices(num_devices),
                                  config.model_parallel_size)
  step = train_step.jax_step(config, 'train', data_parallel)
  batches = data_parallel.prefetch(input_pipeline.create_train_iterator(config),
                                   config.prefetch_to_device)
  replicated = [data_parallel.put_state(train_step.create_state(config, 'train'))]

  def run(n: int) -> None:
    for _ in range(n):
      replicated[0], metrics = step(replicated[0], next(batches))
    jax.block_until_ready(metrics)
  return median_rate(run, batch_size)


def parse_counts(values: list[str], name: str) -> list[int]:
  """Positive ints from a list flag, or a ValueError naming the flag."""
  try:
    counts = [int(v) for v in values]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    raise ValueError(f'--{name}={",".join(values)} must be a comma-separated list of positive '
                     f'integers.')
  return counts


def main(argv: list[str]) -> None:
  del argv
  devices = parse_counts(_DEVICES.value, 'devices')
  batches = parse_counts(_BATCHES.value, 'batches')
  # As cli.start does, before JAX starts.
  cpu_convolutions.choose_convolutions(train_step.OPS.value)
  available = jax.local_device_count()
  if max(devices) > available:
    raise ValueError(f'--devices asks for {max(devices)} devices but this host has {available} '
                     f'({jax.default_backend()}); on CPU set XLA_FLAGS='
                     f'--xla_force_host_platform_device_count=N before running.')
  print(f'{FLAGS.variant} {FLAGS.mode}, {FLAGS.dtype}, {FLAGS.parallelism}, '
        f'{train_step.machine()}, '
        f'{timing.versions()}, {time.strftime("%Y-%m-%d %H:%M")}, 1-min load '
        f'{os.getloadavg()[0]:.1f}; {FLAGS.rounds} rounds x {FLAGS.steps} steps')
  with_data = _DATA_DIR.value is not None
  if with_data and FLAGS.mode != 'train':
    raise ValueError('--data_dir times the training pipeline: use it with --mode=train.')
  print('| devices | global batch | per-device batch | step alone img/s | vs 1 device, same '
        'global batch |' + (' pipeline alone img/s | step fed by the pipeline img/s |'
                            if with_data else ''))
  print('|---' * (7 if with_data else 5) + '|')
  single, pipeline = {}, {}
  model_size = timing.make_config(FLAGS.variant, 1, FLAGS.dtype, 1,
                                      FLAGS.parallelism).model_parallel_size
  for batch_size in batches:
    for count in devices:
      if FLAGS.parallelism == 'model' and count % model_size:
        print(f'| {count} | {batch_size} | - | model_parallel_size {model_size} does not '
              f'divide it | - |' + (' - | - |' * with_data))
        continue
      if batch_size % count:
        print(f'| {count} | {batch_size} | - | not divisible | - |' + (' - | - |' * with_data))
        continue
      rate = measure(count, batch_size)
      if count == 1:
        single[batch_size] = rate
      base = single.get(batch_size)
      row = (f'| {count} | {batch_size} | {batch_size // count} | {rate:.1f} | '
             f'{"-" if base is None else f"{rate / base:.2f}"} |')
      if with_data:
        if batch_size not in pipeline:
          pipeline[batch_size] = measure_pipeline(batch_size)
        row += f' {pipeline[batch_size]:.1f} | {measure_fed(count, batch_size):.1f} |'
      print(row, flush=True)
  if _COLLECTIVES.value:
    for batch_size in batches:
      for count in devices:
        if batch_size % count or (FLAGS.parallelism == 'model' and count % model_size):
          continue
        print(f'\nCollectives of the step on {count} devices, batch {batch_size}:\n'
              '| op | result | MB per device | KB per image | layer |\n|---|---|---|---|---|')
        print('\n'.join(collectives(count, batch_size)), flush=True)
  print(f'1-min load after: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  app.run(main)
