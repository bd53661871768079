r"""Training-step speed: this project's JAX step vs the same AlexNet in PyTorch, interleaved.

Both frameworks get the same network (`torch_reference.TorchAlexNet`, loaded with the Flax
weights through `convert`), the same SGD (momentum 0.9, weight decay 5e-4 on every parameter:
the project's 'sgd' optimizer and `torch.optim.SGD`), the same random batch on the same device,
and dropout on in train mode. After a warm-up the two are timed in alternating rounds
(A B, B A, ...) so that load from other processes hits both alike; each round runs a few
steps and waits for the device. Prints images/s (median over rounds), the median per-round
ratio JAX / PyTorch (> 1: JAX faster), peak memory of each framework measured in a subprocess
of its own, MFU on GPU, and a Markdown row for docs/benchmarks.md.

    python benchmarks/train_step.py --variant=torchvision --batch=64
    python benchmarks/train_step.py --variant=paper --batch=64 --mode=eval --rounds=6
    python benchmarks/train_step.py --variant=paper --batch=256 --dtype=bfloat16 \
        --torch_channels_last --torch_compile            # on a GPU

The JAX step is `train.train_step` / `train.eval_step` under `parallel.pmap` with the state
donated, exactly as the training loop runs it (so it includes the loop's loss / top-1 / top-5
metrics and its finiteness check); the PyTorch step computes the same metrics. No tf.data.
"""

from collections.abc import Callable
import contextlib
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import re
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

from alexnet_jax import convert
from alexnet_jax import models
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import train
from benchmarks.timing import time_interleaved
from configs import imagenet
# pylint: enable=g-import-not-at-top,g-bad-import-order

FRAMEWORKS = ('jax', 'torch')
# Dense peak FLOP/s of an H100 SXM (NVIDIA's datasheet, without sparsity): bf16 tensor cores;
# float32 through TF32 tensor cores, or the plain float32 units with --tf32=off.
_H100_PEAK_FLOPS = {'bfloat16': 989e12, 'tf32': 494e12, 'float32': 67e12}

_VARIANT = flags.DEFINE_enum('variant', 'paper', models.VARIANTS, 'AlexNet variant.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Global batch size (224 px images, 1000 classes).')
_MODE = flags.DEFINE_enum('mode', 'train', ('train', 'eval'),
                          'train: forward, backward and SGD update; eval: forward only.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'),
                           'Compute dtype: config.model.dtype for JAX, torch.autocast for torch.')
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Timed rounds per framework.')
_STEPS = flags.DEFINE_integer('steps', 2, 'Steps per round.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps per framework first (compilation).')
_NUM_DEVICES = flags.DEFINE_integer(
    'num_devices', 1, 'JAX devices to pmap over. PyTorch runs on one device, so > 1 needs '
    '--frameworks=jax (benchmarks/scaling.py compares device counts).')
_PARALLELISM = flags.DEFINE_enum('parallelism', 'pmap', parallel.PARALLELISMS,
                                 "The JAX step's config.parallelism: pmap or jit over a mesh.")
_FRAMEWORKS = flags.DEFINE_list('frameworks', list(FRAMEWORKS), 'Which of jax, torch to run.')
_MEMORY = flags.DEFINE_bool('memory', True,
                            'Measure peak memory, one subprocess per framework.')
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
_MEMORY_PROBE = flags.DEFINE_enum('memory_probe', None, FRAMEWORKS,
                                  'Internal: run one framework alone and print its peak memory.')


def make_config(variant: str, batch: int, dtype: str, num_devices: int,
                parallelism: str = 'pmap'):
  """configs/imagenet.py with the benchmark's overrides (torch.optim.SGD semantics)."""
  config = imagenet.get_config()
  config.parallelism = parallelism
  config.model.variant = variant
  config.model.dtype = dtype
  config.batch_size = config.eval_batch_size = batch
  config.num_devices = num_devices
  config.optimizer = 'sgd'
  config.weight_decay_on_biases = True  # torch.optim.SGD decays every parameter.
  config.lr_schedule = 'constant'
  return config


def make_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A random batch: 'image' float32 [B, S, S, 3] ~ N(0, 1), 'label' int32 [B], 'mask' [B]."""
  rng = np.random.default_rng(seed)
  size, batch = config.image_size, config.batch_size
  return {'image': rng.standard_normal((batch, size, size, 3), np.float32),
          'label': rng.integers(0, config.num_classes, batch).astype(np.int32),
          'mask': np.ones(batch, bool)}


def create_state(config, mode: str):
  """The project's train state, built on the host CPU; params only (no momentum) for eval.

  On the host, so that no second copy of the state stays on the accelerator next to the
  replicated one (it would count in the peak memory).
  """
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    state = train.create_train_state(config, jax.random.PRNGKey(0))
  return state.replace(opt_state=None) if mode == 'eval' else state


def jax_step(config, mode: str, data_parallel: parallel.DataParallel):
  """The loop's mapped `train.train_step` (state donated) or `train.eval_step`.

  Returns:
    step(replicated_state, device_batch): (state, metrics) in train mode, metrics in eval.
  """
  parallel.per_device_batch_size(config.batch_size, len(data_parallel.devices), 'batch_size')
  if mode == 'eval':
    return data_parallel.map(train.eval_step)
  return data_parallel.map(functools.partial(
      train.train_step, learning_rate_fn=optim.create_learning_rate_fn(config, 1)),
                           donate_state=True)


def jax_runner(config, mode: str, batch: dict[str, np.ndarray], state):
  """Returns run(n): n JAX steps on device-resident data, blocking at the end."""
  data_parallel = parallel.create(config.parallelism,
                                  parallel.select_devices(config.num_devices))
  step = jax_step(config, mode, data_parallel)
  keys = ('image', 'label', 'mask') if mode == 'eval' else ('image', 'label')
  device_batch = jax.block_until_ready(data_parallel.put_batch({k: batch[k] for k in keys}))
  replicated = [data_parallel.put_state(state)]

  def run(n: int) -> None:
    for _ in range(n):
      if mode == 'eval':
        out = step(replicated[0], device_batch)
      else:
        replicated[0], out = step(replicated[0], device_batch)
    jax.block_until_ready(out)
  return run


def torch_runner(config, mode: str, batch: dict[str, np.ndarray], params, device: str,
                 channels_last: bool, compile_model: bool):
  """Returns run(n): n PyTorch steps of the same net and optimizer, synchronising at the end.

  params: Flax params to copy in (same weights, so the same arithmetic), or None for torch's
  own initialisation (the memory probe, where values do not matter).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from alexnet_jax import torch_reference  # pylint: disable=g-import-not-at-top
  m = config.model
  model = torch_reference.TorchAlexNet(
      m.variant, config.num_classes, config.image_size, m.dropout_rate, m.lrn_depth_radius,
      m.lrn_bias, m.lrn_alpha, m.lrn_beta)
  if params is not None:
    model.load_state_dict({k: torch.from_numpy(v) for k, v in
                           convert.flax_to_torch_state_dict(params, m.variant).items()})
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(device, memory_format=memory_format)
  images = torch.from_numpy(batch['image'].transpose(0, 3, 1, 2).copy()).to(
      device, memory_format=memory_format)
  labels = torch.from_numpy(batch['label']).long().to(device)
  forward = torch.compile(model) if compile_model else model
  autocast = (torch.autocast(device.split(':')[0], dtype=torch.bfloat16)
              if m.dtype == 'bfloat16' else contextlib.nullcontext())
  optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                              momentum=config.momentum, weight_decay=config.weight_decay)

  def metrics(logits):
    # The metrics train_step / eval_step report, kept on the device like theirs.
    top5 = logits.topk(5, dim=-1).indices == labels[:, None]
    return top5[:, 0].float().mean(), top5.any(-1).float().mean()

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      logits = forward(images).float()
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()
    return loss.detach(), metrics(logits.detach())

  def eval_step():
    with torch.inference_mode(), autocast:
      probs = forward(images).float().softmax(-1)
    return -probs.gather(1, labels[:, None]).log().sum(), metrics(probs)

  model.train(mode == 'train')
  step = train_step if mode == 'train' else eval_step

  def run(n: int) -> None:
    for _ in range(n):
      step()
    if device.startswith('cuda'):
      torch.cuda.synchronize()
  return run


def configure_precision(tf32: str) -> None:
  """Sets TF32 use for float32 GPU matmuls and convolutions in both frameworks."""
  import torch  # pylint: disable=g-import-not-at-top
  if tf32 == 'default':
    return
  on = tf32 == 'on'
  jax.config.update('jax_default_matmul_precision', 'tensorfloat32' if on else 'highest')
  torch.backends.cuda.matmul.allow_tf32 = on
  torch.backends.cudnn.allow_tf32 = on


def torch_device() -> str:
  """'cuda' when JAX runs on a GPU (PyTorch must then see one too), else 'cpu'."""
  if jax.default_backend() != 'gpu':
    return 'cpu'
  import torch  # pylint: disable=g-import-not-at-top
  if not torch.cuda.is_available():
    raise ValueError('JAX runs on a GPU but this PyTorch build sees no CUDA device; install a '
                     'CUDA build of torch, or run on CPU with JAX_PLATFORMS=cpu.')
  return 'cuda'


def _proc_status_kib(field: str) -> int:
  """A VmRSS / VmHWM style field of /proc/self/status, in KiB."""
  text = pathlib.Path('/proc/self/status').read_text()
  return int(re.search(rf'^{field}:\s+(\d+) kB', text, re.M).group(1))


def _reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
  try:
    pathlib.Path('/proc/self/clear_refs').write_text('5')
    return True
  except OSError:
    return False


def memory_probe(framework: str, config, batch, device: str) -> dict[str, float]:
  """Builds and runs one framework alone; returns its peak memory in MiB.

  CPU: resident set growth over the process's size before the model existed (imports done):
  'peak' during the timed steps (the kernel's peak mark is reset after the warm-up, so XLA
  compilation is left out; where that is not allowed, the whole-run peak) and
  'peak_with_setup' (model building and compilation too). GPU: the framework's own allocator peak over the process.
  """
  baseline = _proc_status_kib('VmRSS')
  if framework == 'jax':
    run = jax_runner(config, _MODE.value, batch, create_state(config, _MODE.value))
  else:
    run = torch_runner(config, _MODE.value, batch, None, device, _TORCH_CHANNELS_LAST.value,
                       _TORCH_COMPILE.value)
  run(_WARMUP.value)
  # Not ru_maxrss: Linux carries the parent's peak into a child across fork and exec.
  with_setup = _proc_status_kib('VmHWM')
  reset = _reset_peak_rss()
  run(_STEPS.value)
  if device == 'cpu':
    mib = lambda kib: (kib - baseline) / 1024
    return {'peak': mib(_proc_status_kib('VmHWM')), 'peak_reset_after_warmup': reset,
            'peak_with_setup': mib(max(with_setup, _proc_status_kib('VmHWM')))}
  if framework == 'jax':
    peak = jax.local_devices()[0].memory_stats()['peak_bytes_in_use']
  else:
    import torch  # pylint: disable=g-import-not-at-top
    peak = torch.cuda.max_memory_allocated()
  return {'peak': peak / 2**20, 'peak_with_setup': peak / 2**20}


def measure_memory(framework: str) -> dict[str, float]:
  """Runs `memory_probe` for `framework` in a fresh Python and returns its result."""
  argv = [a for a in sys.argv[1:] if not a.startswith('--memory_probe')]
  out = subprocess.run([sys.executable, __file__, *argv, f'--memory_probe={framework}'],
                       capture_output=True, text=True, check=False)
  line = [l for l in out.stdout.splitlines() if l.startswith('MEMORY ')]
  if out.returncode or not line:
    raise RuntimeError(f'The {framework} memory probe failed:\n{out.stderr[-3000:]}')
  return json.loads(line[-1][len('MEMORY '):])


def machine() -> str:
  """The accelerator's name, or the CPU model and core count."""
  if jax.default_backend() == 'gpu':
    return f'{jax.devices()[0].device_kind} x{jax.device_count()}'
  model = platform.processor() or 'unknown CPU'
  cpuinfo = pathlib.Path('/proc/cpuinfo')
  if cpuinfo.exists():
    found = re.search(r'^model name\s*:\s*(.+)$', cpuinfo.read_text(), re.M)
    model = found.group(1).strip() if found else model
  return f'{model}, {os.cpu_count()} cores'


def versions() -> str:
  """Versions of the packages that decide the numbers."""
  names = ('jax', 'jaxlib', 'flax', 'optax', 'torch')
  found = []
  for name in names:
    try:
      found.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      found.append(f'{name} -')
  return ', '.join(found)


def flops_per_image(variant: str, image_size: int, num_classes: int, mode: str) -> float:
  """2 x the hand-counted multiply-adds of the forward pass; x3 with the backward pass."""
  macs = sum(row.macs for row in models.layer_table(variant, image_size, num_classes))
  return 2.0 * macs * (3 if mode == 'train' else 1)


def check_flags() -> None:
  """Raises ValueError for flag combinations the benchmark cannot run."""
  unknown = set(_FRAMEWORKS.value) - set(FRAMEWORKS)
  if unknown or not _FRAMEWORKS.value:
    raise ValueError(f'--frameworks={",".join(_FRAMEWORKS.value)}: name one or both of '
                     f'{FRAMEWORKS}.')
  if _NUM_DEVICES.value != 1 and 'torch' in _FRAMEWORKS.value:
    raise ValueError(f'--num_devices={_NUM_DEVICES.value}: the PyTorch step runs on one device; '
                     f'add --frameworks=jax, or use benchmarks/scaling.py.')
  for flag in (_ROUNDS, _STEPS, _WARMUP, _BATCH):
    if flag.value < (0 if flag is _WARMUP else 1):
      raise ValueError(f'--{flag.name}={flag.value} must be positive.')


def main(argv: list[str]) -> None:
  del argv
  check_flags()
  config = make_config(_VARIANT.value, _BATCH.value, _DTYPE.value, _NUM_DEVICES.value,
                       _PARALLELISM.value)
  batch = make_batch(config)
  device = torch_device() if 'torch' in _FRAMEWORKS.value else 'cpu'
  if 'torch' in _FRAMEWORKS.value:
    import torch  # pylint: disable=g-import-not-at-top
    # The same number of threads as XLA's CPU pool, which uses every core.
    torch.set_num_threads(os.cpu_count())
    configure_precision(_TF32.value)
  if _MEMORY_PROBE.value:
    print('MEMORY', json.dumps(memory_probe(_MEMORY_PROBE.value, config, batch, device)))
    return

  state = create_state(config, _MODE.value)
  params = jax.device_get(state.params)
  runners = {}
  if 'jax' in _FRAMEWORKS.value:
    runners['jax'] = jax_runner(config, _MODE.value, batch, state)
  del state  # Replicated (and donated) from here on.
  if 'torch' in _FRAMEWORKS.value:
    runners['torch'] = torch_runner(config, _MODE.value, batch, params, device,
                                    _TORCH_CHANNELS_LAST.value, _TORCH_COMPILE.value)
  del params
  for name, run in runners.items():
    start = time.perf_counter()
    run(_WARMUP.value)
    print(f'{name}: warm-up ({_WARMUP.value} steps, compilation included) '
          f'{time.perf_counter() - start:.1f} s', flush=True)

  load_before = os.getloadavg()[0]
  seconds = time_interleaved(runners, _ROUNDS.value, _STEPS.value)
  load_after = os.getloadavg()[0]
  memory = {name: measure_memory(name) for name in runners} if _MEMORY.value else {}
  report(config, seconds, memory, device, (load_before, load_after))


def report(config, seconds: dict[str, list[float]], memory: dict[str, dict[str, float]],
           device: str, load: tuple[float, float]) -> None:
  """Prints the per-framework medians, the ratio, MFU and a Markdown table."""
  images = config.batch_size * _STEPS.value
  rate = {name: images / statistics.median(s) for name, s in seconds.items()}
  spread = {name: (images / max(s), images / min(s)) for name, s in seconds.items()}
  ratio = None
  if len(seconds) == 2:
    ratio = statistics.median(t / j for j, t in zip(seconds['jax'], seconds['torch']))
  peak_flops = _PEAK_TFLOPS.value * 1e12
  if not peak_flops and device != 'cpu':
    unit = 'tf32' if _DTYPE.value == 'float32' and _TF32.value != 'off' else _DTYPE.value
    peak_flops = _H100_PEAK_FLOPS[unit] * _NUM_DEVICES.value
  flops = flops_per_image(_VARIANT.value, config.image_size, config.num_classes, _MODE.value)
  torch_options = [o for o, on in (('channels_last', _TORCH_CHANNELS_LAST.value),
                                   ('compile', _TORCH_COMPILE.value)) if on]
  setting = (f'{_VARIANT.value} {_MODE.value}, batch {config.batch_size}, {_DTYPE.value}, '
             f'{_NUM_DEVICES.value} device(s)')
  if device != 'cpu':
    setting += f', tf32 {_TF32.value}'
  if torch_options:
    setting += f', torch {"+".join(torch_options)}'
  print(f'\n{setting}\nmachine: {machine()}\nversions: {versions()}\n'
        f'date: {time.strftime("%Y-%m-%d %H:%M")}\n1-min load average: {load[0]:.2f} before, '
        f'{load[1]:.2f} after\n{_ROUNDS.value} rounds x {_STEPS.value} steps per framework, '
        f'after {_WARMUP.value} warm-up steps')
  for name in seconds:
    line = (f'{name:>5}: {rate[name]:8.1f} images/s median ({spread[name][0]:.1f} to '
            f'{spread[name][1]:.1f}), {1e3 * statistics.median(seconds[name]) / _STEPS.value:.0f}'
            f' ms/step')
    if peak_flops:
      line += f', MFU {rate[name] * flops / peak_flops:.1%}'
    if name in memory:
      line += (f', peak memory {memory[name]["peak"]:.0f} MiB '
               f'({memory[name]["peak_with_setup"]:.0f} MiB with setup)')
    print(line)
  if ratio is not None:
    print(f'JAX / PyTorch speed (median of per-round ratios): {ratio:.3f}')

  peaks = {name: m['peak'] for name, m in memory.items()}
  memory_ratio = peaks['jax'] / peaks['torch'] if len(peaks) == 2 else None
  cells = [setting, _cell(rate.get('jax'), '.1f'), _cell(rate.get('torch'), '.1f'),
           _cell(ratio, '.2f'), _cell(peaks.get('jax'), '.0f'), _cell(peaks.get('torch'), '.0f'),
           _cell(memory_ratio, '.2f'), f'{load[0]:.1f}-{load[1]:.1f}']
  print('\n| setting | JAX img/s | PyTorch img/s | JAX/PyTorch | JAX peak MiB | '
        'PyTorch peak MiB | memory JAX/PyTorch | load |\n|---|---|---|---|---|---|---|---|')
  print('| ' + ' | '.join(cells) + ' |')


def _cell(value: float | None, spec: str) -> str:
  """A Markdown table cell: `value` formatted, or '-' when there is none."""
  return '-' if value is None else format(value, spec)

if __name__ == '__main__':
  app.run(main)
