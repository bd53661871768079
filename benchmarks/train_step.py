r"""Training-step speed: this project's JAX step vs the same AlexNet in PyTorch.

Each framework runs in a fresh Python of its own, as a user runs one or the other: by default
`--pairs` JAX processes and as many PyTorch ones (benchmarks/torch_step.py, which never
imports JAX), alternating A B, B A, ... so that load from other processes hits both alike.
Each process builds the step, runs `--warmup` untimed steps (compilation), then times
`--steps` single steps and reports their median and its peak memory. Prints each side's
median images/s over processes and their spread, the median of the per-pair ratios
JAX / PyTorch (> 1: JAX faster), the peak memories and their ratio, MFU on GPU, and a
Markdown row for docs/benchmarks.md.

    python benchmarks/train_step.py --variant=torchvision --batch=64
    python benchmarks/train_step.py --variant=paper --batch=64 --mode=eval --pairs=4
    python benchmarks/train_step.py --variant=paper --batch=256 --dtype=bfloat16 \
        --torch_channels_last --torch_compile            # on a GPU

`--processes=shared` instead runs both frameworks in this one process, in interleaved rounds
of `--steps` steps with the same weights: labelled as such, it is not what a user gets (two
thread pools in one process; issue 19's harness measured PyTorch ~17% slower there than
alone on 2 cores).

The JAX step is `steps.train_step` / `steps.eval_step` under `config.parallelism` with the
state donated, exactly as the training loop runs it (so it includes the loop's loss / top-1 /
top-5 metrics and its finiteness check); the PyTorch step computes the same metrics. Both get
the same network (`torch_reference.TorchAlexNet`), the same SGD (momentum 0.9, weight decay
5e-4 on every parameter: the project's 'sgd' optimizer and `torch.optim.SGD`), the same random
batch, and dropout on in train mode. No tf.data: the JAX step gets the uint8 batch the loop
gets and normalises it on the device (`normalize`, as in training); PyTorch gets its pixels
as float32 (`timing.make_batch`).
"""

import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

# Allocate GPU memory on demand: JAX would otherwise take 75% of it before PyTorch starts.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import app
from absl import flags
import jax
import numpy as np

from alexnet_jax import cpu_convolutions
from alexnet_jax import host_memory
from alexnet_jax import models
from alexnet_jax import normalize
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import steps
from alexnet_jax import train
from benchmarks import timing
from benchmarks.timing import make_batch, make_config, versions
# pylint: enable=g-import-not-at-top,g-bad-import-order

FRAMEWORKS = ('jax', 'torch')
# Dense peak FLOP/s of an H100 SXM (NVIDIA's datasheet, without sparsity): bf16 tensor cores;
# float32 through TF32 tensor cores, or the plain float32 units with --tf32=off.
_H100_PEAK_FLOPS = {'bfloat16': 989e12, 'tf32': 494e12, 'float32': 67e12}

_VARIANT = flags.DEFINE_enum('variant', 'paper', models.VARIANTS, 'AlexNet variant.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Global batch size.')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', 224, 'Input size; 64 is the embedded digits default (configs/default.py).')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Output classes (digits: 10).')
_MODE = flags.DEFINE_enum('mode', 'train', ('train', 'eval'),
                          'train: forward, backward and SGD update; eval: forward only.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'),
                           'Compute dtype: config.model.dtype for JAX, torch.autocast for torch.')
_PROCESSES = flags.DEFINE_enum(
    'processes', 'fresh', ('fresh', 'shared'),
    'fresh: each framework in Pythons of its own, alternating; shared: both in this process, '
    'interleaved rounds (not what a user gets).')
_PAIRS = flags.DEFINE_integer('pairs', 4, 'fresh: processes per framework, alternating.')
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'shared: timed rounds per framework.')
_STEPS = flags.DEFINE_integer('steps', 3,
                              'fresh: timed steps per process; shared: steps per round.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps per framework first (compilation).')
_NUM_DEVICES = flags.DEFINE_integer(
    'num_devices', 1, 'JAX devices to run on. PyTorch runs on one device, so > 1 needs '
    '--frameworks=jax (benchmarks/scaling.py compares device counts).')
_PARALLELISM = flags.DEFINE_enum('parallelism', 'pmap', parallel.PARALLELISMS,
                                 "The JAX step's config.parallelism.")
OPS = flags.DEFINE_enum(
    'ops', 'auto', ('auto', *models.OPS),
    "The JAX model's config.model.ops; as in the commands, all but 'xla' take XLA:CPU's Eigen "
    'convolutions (cpu_convolutions.XLA_FLAG).')
_FRAMEWORKS = flags.DEFINE_list('frameworks', list(FRAMEWORKS), 'Which of jax, torch to run.')
_TF32 = flags.DEFINE_enum(
    'tf32', 'on', ('on', 'off', 'default'),
    'GPU float32 matmuls and convolutions in TF32 for both frameworks (on), in full float32 '
    '(off), or each framework\'s own default (JAX: TF32; torch: TF32 convs, fp32 matmuls).')
_TORCH_CHANNELS_LAST = flags.DEFINE_bool('torch_channels_last', False,
                                         'PyTorch model and input in channels_last layout.')
_TORCH_COMPILE = flags.DEFINE_bool('torch_compile', False, 'torch.compile the PyTorch model.')
_PEAK_TFLOPS = flags.DEFINE_float(
    'peak_tflops', 0.0, 'Peak TFLOP/s of all devices together for MFU; 0: an H100 SXM\'s dense '
    'peak per device (989 bf16, 494 TF32, 67 with --tf32=off) on GPU, no MFU on CPU.')
_CHILD = flags.DEFINE_bool('child', False,
                           'Internal: this is a fresh JAX process; measure and print a result.')


def benchmark_config(num_devices: int | None = None, batch: int | None = None):
  """`make_config` of the flags; `num_devices` and `batch` (benchmarks/scaling.py's sweep)
  in place of --num_devices and --batch where given."""
  return make_config(_VARIANT.value, batch or _BATCH.value, _DTYPE.value,
                     num_devices or _NUM_DEVICES.value, _PARALLELISM.value, _IMAGE_SIZE.value,
                     _NUM_CLASSES.value, OPS.value)


def create_state(config, mode: str):
  """The project's train state, built on the host CPU; params only (no momentum) for eval.

  On the host, so that no second copy of the state stays on the accelerator next to the
  replicated one (it would count in the peak memory).
  """
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    state = train.create_train_state(config, jax.random.PRNGKey(0))
  return state.replace(opt_state=None) if mode == 'eval' else state


def jax_step(config, mode: str, data_parallel: parallel.DataParallel):
  """The loop's mapped `steps.train_step` (state donated) or `steps.eval_step`.

  Returns:
    step(replicated_state, device_batch): (state, metrics) in train mode, metrics in eval.
  """
  parallel.per_device_batch_size(config.batch_size, len(data_parallel.devices), 'batch_size')
  normalization = normalize.for_config(config)  # The uint8 batch normalised, as in training.
  if mode == 'eval':
    return data_parallel.map(functools.partial(steps.eval_step, normalization=normalization))
  return data_parallel.map(functools.partial(
      steps.train_step, learning_rate_fn=optim.create_learning_rate_fn(config, 1),
      normalization=normalization), donate_state=True)


def on_devices(config, mode: str, batch: dict[str, np.ndarray], state):
  """(the mapped step, the state on the devices, the batch on the devices) of `jax_step`,
  with the batch keys the loop's step gets in `mode`."""
  data_parallel = parallel.create(config.parallelism, parallel.select_devices(config.num_devices),
                                  config.model_parallel_size)
  keys = ('image', 'label', 'mask') if mode == 'eval' else ('image', 'lighting', 'label')
  return (jax_step(config, mode, data_parallel), data_parallel.put_state(state),
          jax.block_until_ready(data_parallel.put_batch({k: batch[k] for k in keys})))


def jax_runner(config, mode: str, batch: dict[str, np.ndarray], state):
  """Returns run(n): n JAX steps on device-resident data, blocking at the end."""
  step, device_state, device_batch = on_devices(config, mode, batch, state)
  first = True

  def run(n: int) -> None:
    nonlocal device_state, first
    for _ in range(n):
      if mode == 'eval':
        out = step(device_state, device_batch)
      else:
        device_state, out = step(device_state, device_batch)
      if first:  # As the training loop does after its first step.
        host_memory.release_freed(after=out)
        first = False
    jax.block_until_ready(out)
  return run


def machine() -> str:
  """The accelerators' name and count, or the CPU model and core count."""
  if jax.default_backend() == 'gpu':
    return f'{jax.devices()[0].device_kind} x{jax.device_count()}'
  return timing.cpu_name()


def flops_per_image(variant: str, image_size: int, num_classes: int, mode: str) -> float:
  """2 x the hand-counted multiply-adds of the forward pass; x3 with the backward pass."""
  macs = sum(row.macs for row in models.layer_table(variant, image_size, num_classes))
  return 2.0 * macs * (3 if mode == 'train' else 1)


def configure_precision(tf32: str) -> None:
  """Sets TF32 use for float32 GPU matmuls and convolutions in JAX (torch_step.py: PyTorch's)."""
  if tf32 != 'default':
    jax.config.update('jax_default_matmul_precision',
                      'tensorfloat32' if tf32 == 'on' else 'highest')


def jax_child(config) -> None:
  """A fresh JAX process: measures the step alone and prints the result."""
  # The normalisation constants come through the input pipeline, which imports TensorFlow:
  # imported before the baseline, as torch is in its process, so that the peak is the step's
  # (torchvision train peaked at 1,877 MiB with the import counted, 1,390 without).
  normalize.for_config(config)

  def build():
    run = jax_runner(config, _MODE.value, make_batch(config), create_state(config, _MODE.value))
    if jax.default_backend() == 'cpu':
      return run, None
    return run, lambda: jax.local_devices()[0].memory_stats()['peak_bytes_in_use']
  result = timing.measure_alone(build, _WARMUP.value, _STEPS.value)
  result['device'] = machine()
  timing.print_result(result)


def torch_spec(device: str) -> dict:
  """What benchmarks/torch_step.py needs to build the same step."""
  return {'variant': _VARIANT.value, 'batch': _BATCH.value, 'image_size': _IMAGE_SIZE.value,
          'num_classes': _NUM_CLASSES.value, 'mode': _MODE.value, 'dtype': _DTYPE.value,
          'steps': _STEPS.value, 'warmup': _WARMUP.value, 'device': device,
          'tf32': _TF32.value, 'channels_last': _TORCH_CHANNELS_LAST.value,
          'compile': _TORCH_COMPILE.value}


def run_fresh(gpu: bool) -> tuple[dict[str, list[float]], dict[str, list[dict]], str]:
  """Alternating fresh processes; returns per-process median step seconds, the processes'
  results (memory), and the device."""
  commands = {
      'jax': [__file__, *[a for a in sys.argv[1:] if not a.startswith('--child')], '--child'],
      'torch': [str(pathlib.Path(__file__).with_name('torch_step.py')),
                json.dumps(torch_spec('cuda' if gpu else 'cpu'))]}
  results = timing.run_alternating({f: commands[f] for f in _FRAMEWORKS.value}, _PAIRS.value,
                                   describe)
  seconds = {n: [statistics.median(r['step_seconds']) for r in rs] for n, rs in results.items()}
  return seconds, results, next(iter(results.values()))[0]['device']


def jax_on_gpu() -> bool:
  """Whether a fresh JAX process runs on a GPU (asked there: JAX is not started here)."""
  out = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'],
                       capture_output=True, text=True, check=True)
  return out.stdout.split()[-1] == 'gpu'


def describe(name: str, result: dict) -> str:
  """A progress line for one process's result."""
  del name
  step = statistics.median(result['step_seconds'])
  return (f'{_BATCH.value / step:.1f} images/s ({1e3 * step:.0f} ms/step, warm-up '
          f'{result["warmup_seconds"]:.1f} s), peak {result["peak_mib"]:.0f} MiB')


def run_shared() -> tuple[dict[str, list[float]], dict[str, list[float]], str]:
  """Both frameworks in this process, interleaved rounds; no memory (it would be mixed)."""
  config = benchmark_config()
  batch = make_batch(config)
  state = create_state(config, _MODE.value)
  runners = {}
  if 'torch' in _FRAMEWORKS.value:
    from benchmarks import torch_step  # pylint: disable=g-import-not-at-top
    from alexnet_jax import convert  # pylint: disable=g-import-not-at-top
    device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
    torch_step.configure(device, _TF32.value)
    runners['torch'] = torch_step.torch_runner(
        config, _MODE.value, batch,
        convert.flax_to_torch_state_dict(jax.device_get(state.params), config.model.variant,
                                        config.image_size),
        device, _TORCH_CHANNELS_LAST.value, _TORCH_COMPILE.value)
  if 'jax' in _FRAMEWORKS.value:
    runners['jax'] = jax_runner(config, _MODE.value, batch, state)
  del state  # Replicated (and donated) from here on.
  for run in runners.values():
    run(_WARMUP.value)
  rounds = timing.time_interleaved(runners, _ROUNDS.value, _STEPS.value)
  seconds = {name: [s / _STEPS.value for s in r] for name, r in rounds.items()}
  return seconds, {}, machine()


def check_flags() -> None:
  """Raises ValueError for flag combinations the benchmark cannot run."""
  unknown = set(_FRAMEWORKS.value) - set(FRAMEWORKS)
  if unknown or not _FRAMEWORKS.value:
    raise ValueError(f'--frameworks={",".join(_FRAMEWORKS.value)}: name one or both of '
                     f'{FRAMEWORKS}.')
  if _NUM_DEVICES.value != 1 and 'torch' in _FRAMEWORKS.value:
    raise ValueError(f'--num_devices={_NUM_DEVICES.value}: the PyTorch step runs on one device; '
                     f'add --frameworks=jax, or use benchmarks/scaling.py.')
  for flag in (_PAIRS, _ROUNDS, _STEPS, _WARMUP, _BATCH, _IMAGE_SIZE, _NUM_CLASSES):
    if flag.value < (0 if flag is _WARMUP else 1):
      raise ValueError(f'--{flag.name}={flag.value} must be '
                       f'{"non-negative" if flag is _WARMUP else "positive"}.')


def main(argv: list[str]) -> None:
  del argv
  check_flags()
  cpu_convolutions.choose_convolutions(OPS.value)  # As cli.start does, before JAX starts.
  configure_precision(_TF32.value)
  if _CHILD.value:
    jax_child(benchmark_config())
    return
  load_before = os.getloadavg()[0]
  gpu = jax_on_gpu() if _PROCESSES.value == 'fresh' else jax.default_backend() == 'gpu'
  seconds, results, device = run_fresh(gpu) if _PROCESSES.value == 'fresh' else run_shared()
  report(seconds, results, device, gpu, (load_before, os.getloadavg()[0]))


def report(seconds: dict[str, list[float]], results: dict[str, list[dict]], device: str,
           gpu: bool, load: tuple[float, float]) -> None:
  """Prints each side's median and spread, the median per-pair ratio, MFU and a Markdown row.

  Args:
    seconds: framework -> seconds per step, one per process (fresh) or per round (shared).
    results: framework -> each process's `timing.measure_alone` result (fresh; empty for
      shared), for the peak memory of the steps and with compilation.
    device: what the steps ran on; gpu: whether that is a GPU (MFU, TF32).
    load: the 1-min load average before and after.
  """
  fresh = _PROCESSES.value == 'fresh'
  rate = {name: [_BATCH.value / s for s in values] for name, values in seconds.items()}
  ratio = timing.pair_ratio(rate['jax'], rate['torch']) if len(rate) == 2 else None
  peaks = {n: [r['peak_mib'] for r in rs] for n, rs in results.items()}
  with_setup = {n: [r['peak_with_setup_mib'] for r in rs] for n, rs in results.items()}
  memory_ratio = timing.pair_ratio(peaks['jax'], peaks['torch']) if len(peaks) == 2 else None
  peak_flops = _PEAK_TFLOPS.value * 1e12
  if not peak_flops and gpu:
    unit = 'tf32' if _DTYPE.value == 'float32' and _TF32.value != 'off' else _DTYPE.value
    peak_flops = _H100_PEAK_FLOPS[unit] * _NUM_DEVICES.value
  flops = flops_per_image(_VARIANT.value, _IMAGE_SIZE.value, _NUM_CLASSES.value, _MODE.value)
  torch_options = [o for o, on in (('channels_last', _TORCH_CHANNELS_LAST.value),
                                   ('compile', _TORCH_COMPILE.value)) if on]
  setting = (f'{_VARIANT.value} {_MODE.value}, batch {_BATCH.value}, {_IMAGE_SIZE.value} px, '
             f'{_DTYPE.value}, {_NUM_DEVICES.value} device(s)')
  if OPS.value != 'auto':
    setting += f', ops {OPS.value}'
  if peak_flops:
    setting += f', tf32 {_TF32.value}'
  if torch_options:
    setting += f', torch {"+".join(torch_options)}'
  how = (f'{_PAIRS.value} fresh processes per framework, alternating, each {_WARMUP.value} '
         f'warm-up + {_STEPS.value} timed steps (median)' if fresh else
         f'SAME PROCESS: {_ROUNDS.value} interleaved rounds x {_STEPS.value} steps after '
         f'{_WARMUP.value} warm-up steps (not what a user gets)')
  print(f'\n{setting}\nmachine: {device}\nversions: {versions()}\n'
        f'date: {time.strftime("%Y-%m-%d %H:%M")}\n1-min load average: {load[0]:.2f} before, '
        f'{load[1]:.2f} after\n{how}')
  for name, values in rate.items():
    line = (f'{name:>5}: {statistics.median(values):8.1f} images/s median '
            f'({min(values):.1f} to {max(values):.1f})')
    if peak_flops:
      line += f', MFU {statistics.median(values) * flops / peak_flops:.1%}'
    if name in peaks:
      reset = all(r['peak_reset'] for r in results[name])
      line += (f', peak memory {statistics.median(peaks[name]):.0f} MiB median '
               f'({"the steps, compilation excluded" if reset else "whole run: peak not reset"}'
               f'; {statistics.median(with_setup[name]):.0f} MiB with building and compiling)')
    print(line)
  if ratio is not None:
    pairs = ', '.join(f'{j / t:.2f}' for j, t in zip(rate['jax'], rate['torch']))
    print(f'JAX / PyTorch speed, median of per-{"pair" if fresh else "round"} ratios: '
          f'{ratio:.3f} ({pairs})')
  if memory_ratio is not None:
    print(f'JAX / PyTorch peak memory, median of per-pair ratios: {memory_ratio:.3f}')

  median = lambda name, d: statistics.median(d[name]) if name in d else None
  cells = [setting + ('' if fresh else ' (same process)'), _cell(median('jax', rate), '.1f'),
           _cell(median('torch', rate), '.1f'), _cell(ratio, '.2f'),
           _cell(median('jax', peaks), '.0f'), _cell(median('torch', peaks), '.0f'),
           _cell(memory_ratio, '.2f'), f'{load[0]:.1f}-{load[1]:.1f}']
  print('\n| setting | JAX img/s | PyTorch img/s | JAX/PyTorch | JAX peak MiB | '
        'PyTorch peak MiB | memory JAX/PyTorch | load |\n|---|---|---|---|---|---|---|---|')
  print('| ' + ' | '.join(cells) + ' |')


def _cell(value: float | None, spec: str) -> str:
  """A Markdown table cell: `value` formatted, or '-' when there is none."""
  return '-' if value is None else format(value, spec)


if __name__ == '__main__':
  app.run(main)
