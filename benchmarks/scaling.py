r"""Images/s of the JAX step against the number of devices and the batch size.

Times `train.train_step` (or `eval_step`) under `parallel.pmap` on device-resident random data,
the step alone: no input pipeline. On CPU the devices are faked with
--xla_force_host_platform_device_count (set below, before JAX starts), so they share the same
cores: total images/s should stay flat as devices are added, and what it loses is the cost of
the multi-device code path (splitting the batch, the gradient all-reduce, per-device dispatch).
On a multi-GPU host the same table shows real scaling.

    python benchmarks/scaling.py --variant=torchvision --devices=1,2,4 --batches=32,64
    python benchmarks/scaling.py --devices=1 --batches=64,128,256,512 --dtype=bfloat16  # GPU

Takes train_step.py's --variant, --mode, --dtype, --rounds, --steps and --warmup. Not yet
measured here: the input pipeline alone and pipeline plus step together.
"""

import os
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

import train_step  # benchmarks/train_step.py: its flags, config, state and step runner.
# pylint: enable=g-import-not-at-top,g-bad-import-order

_DEVICES = flags.DEFINE_list('devices', ['1', '2', '4', '8'],
                             'Device counts to time (each <= the local device count).')
_BATCHES = flags.DEFINE_list('batches', ['64'], 'Global batch sizes to time.')
FLAGS = flags.FLAGS


def measure(num_devices: int, batch_size: int) -> float:
  """Median images/s of the step on `num_devices` devices at global batch `batch_size`."""
  config = train_step.make_config(FLAGS.variant, batch_size, FLAGS.dtype, num_devices)
  run = train_step.jax_runner(config, FLAGS.mode, train_step.make_batch(config),
                              train_step.create_state(config, FLAGS.mode))
  run(FLAGS.warmup)
  seconds = []
  for _ in range(FLAGS.rounds):
    start = time.perf_counter()
    run(FLAGS.steps)
    seconds.append(time.perf_counter() - start)
  return batch_size * FLAGS.steps / statistics.median(seconds)


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
  available = jax.local_device_count()
  if max(devices) > available:
    raise ValueError(f'--devices asks for {max(devices)} devices but this host has {available} '
                     f'({jax.default_backend()}); on CPU set XLA_FLAGS='
                     f'--xla_force_host_platform_device_count=N before running.')
  print(f'{FLAGS.variant} {FLAGS.mode}, {FLAGS.dtype}, {train_step.machine()}, '
        f'{train_step.versions()}, {time.strftime("%Y-%m-%d %H:%M")}, 1-min load '
        f'{os.getloadavg()[0]:.1f}; {FLAGS.rounds} rounds x {FLAGS.steps} steps')
  print('| devices | global batch | per-device batch | images/s | vs 1 device, same global '
        'batch |\n|---|---|---|---|---|')
  single = {}
  for batch_size in batches:
    for count in devices:
      if batch_size % count:
        print(f'| {count} | {batch_size} | - | not divisible | - |')
        continue
      rate = measure(count, batch_size)
      if count == 1:
        single[batch_size] = rate
      base = single.get(batch_size)
      print(f'| {count} | {batch_size} | {batch_size // count} | {rate:.1f} | '
            f'{"-" if base is None else f"{rate / base:.2f}"} |', flush=True)
  print(f'1-min load after: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  app.run(main)
