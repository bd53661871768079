"""What the benchmark scripts share: their config and batch, interleaved rounds, fresh processes.

Nothing here imports JAX or PyTorch, so a benchmark can run each framework in a Python of its
own (`run_alternating`) and that Python holds one framework only, as a user's does.
"""

from collections.abc import Callable, Sequence
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
from typing import Any, Optional

import numpy as np

from configs import imagenet

# The line a child process prints its measurement on, as JSON.
RESULT_PREFIX = 'RESULT '


def make_config(variant: str, batch: int, dtype: str, num_devices: int,
                parallelism: str = 'pmap', image_size: int = 224, num_classes: int = 1000,
                ops: str = 'auto'):
  """configs/imagenet.py with the benchmark's overrides (torch.optim.SGD semantics)."""
  config = imagenet.get_config()
  config.image_size, config.num_classes = image_size, num_classes
  config.parallelism = parallelism
  config.model.variant = variant
  config.model.dtype = dtype
  config.model.ops = ops
  config.batch_size = config.eval_batch_size = batch
  config.num_devices = num_devices
  config.optimizer = 'sgd'
  config.weight_decay_on_biases = True  # torch.optim.SGD decays every parameter.
  config.lr_schedule = 'constant'
  return config


def make_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A random batch as the training loop gets it from tf.data: 'image' uint8 [B, S, S, 3],
  'lighting' float32 [B, 3] (PCA colour shifts, about their scale), 'label' int32 [B], and
  'mask' bool [B] for eval.

  The JAX step turns it into the network's input on the device, as in training
  (`normalize`); the PyTorch side (torch_step.py) takes the pixels as float32 0-255, since
  the values do not change a step's time.
  """
  rng = np.random.default_rng(seed)
  size, batch = config.image_size, config.batch_size
  return {'image': rng.integers(0, 256, (batch, size, size, 3), np.uint8),
          'lighting': rng.normal(0, 5, (batch, 3)).astype(np.float32),
          'label': rng.integers(0, config.num_classes, batch).astype(np.int32),
          'mask': np.ones(batch, bool)}


def time_interleaved(runners: dict[str, Callable[[int], None]], rounds: int,
                     steps: int) -> dict[str, list[float]]:
  """Seconds per round of `steps` steps for each runner, runners alternating order by round.

  Load from other processes then hits every runner alike. Each runner must block until its
  `steps` steps are done.
  """
  names = list(runners)
  seconds = {name: [] for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      runners[name](steps)
      seconds[name].append(time.perf_counter() - start)
  return seconds


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


def measure_alone(build: Callable[[], tuple[Callable[[int], None],
                                             Optional[Callable[[], float]]]],
                  warmup: int, steps: int) -> dict[str, Any]:
  """Builds one framework's step in this process, warms it up and times `steps` single steps.

  Args:
    build: returns (run, device_peak): run(n) does n steps and waits for the device;
      device_peak() is the framework allocator's peak in bytes on an accelerator, or None on
      CPU, where memory is the resident set's growth.
    warmup: untimed steps first (compilation).
    steps: timed steps, one at a time.
  Returns:
    {'step_seconds': [steps], 'warmup_seconds', 'peak_mib': the memory the timed steps
    needed above the process before `build` (the kernel's peak mark is reset after the
    warm-up, so compilation is left out; 'peak_reset' says whether that was allowed),
    'peak_with_setup_mib': with building and compilation}.
  """
  baseline = _proc_status_kib('VmRSS')
  run, device_peak = build()
  start = time.perf_counter()
  run(warmup)
  warmup_seconds = time.perf_counter() - start
  # Not ru_maxrss: Linux carries the parent's peak into a child across fork and exec.
  with_setup = _proc_status_kib('VmHWM')
  reset = _reset_peak_rss()
  step_seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    run(1)
    step_seconds.append(time.perf_counter() - start)
  if device_peak is None:
    peak = (_proc_status_kib('VmHWM') - baseline) / 1024
    peak_with_setup = (max(with_setup, _proc_status_kib('VmHWM')) - baseline) / 1024
  else:
    peak = peak_with_setup = device_peak() / 2**20
  return {'step_seconds': step_seconds, 'warmup_seconds': warmup_seconds, 'peak_mib': peak,
          'peak_with_setup_mib': peak_with_setup, 'peak_reset': reset}


def print_result(result: dict[str, Any]) -> None:
  """Prints a child's measurement where `run_alternating` looks for it."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_alternating(commands: dict[str, Sequence[str]], pairs: int,
                    describe: Callable[[str, dict[str, Any]], str]
                    ) -> dict[str, list[dict[str, Any]]]:
  """Runs each command in a fresh Python `pairs` times, alternating: A B, B A, A B, ...

  Args:
    commands: name -> argv after `python`; each run must `print_result` once.
    pairs: how many times each runs.
    describe: (name, result) -> a progress line printed after each process.
  Returns:
    name -> the results of its processes, in order.
  Raises:
    RuntimeError: a process failed, with the end of its stderr.
  """
  names = list(commands)
  results = {name: [] for name in names}
  for pair in range(pairs):
    for name in (names if pair % 2 == 0 else names[::-1]):
      out = subprocess.run([sys.executable, *commands[name]], capture_output=True, text=True,
                           check=False)
      lines = [l for l in out.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
      if out.returncode or not lines:
        raise RuntimeError(f'The {name} process (pair {pair + 1}) failed with exit code '
                           f'{out.returncode}:\n{out.stderr[-3000:]}')
      results[name].append(json.loads(lines[-1][len(RESULT_PREFIX):]))
      print(f'pair {pair + 1}/{pairs} {name}: {describe(name, results[name][-1])}', flush=True)
  return results


def pair_ratio(a: Sequence[float], b: Sequence[float]) -> float:
  """The median of a[i] / b[i]: each pair ran under the same load, unlike the two medians."""
  if len(a) != len(b) or not a:
    raise ValueError(f'pair_ratio needs pairs: {len(a)} and {len(b)} values.')
  return statistics.median(x / y for x, y in zip(a, b))


def cpu_name() -> str:
  """The CPU model and core count."""
  model = platform.processor() or 'unknown CPU'
  cpuinfo = pathlib.Path('/proc/cpuinfo')
  if cpuinfo.exists():
    found = re.search(r'^model name\s*:\s*(.+)$', cpuinfo.read_text(), re.M)
    model = found.group(1).strip() if found else model
  return f'{model}, {os.cpu_count()} cores'


def versions() -> str:
  """Versions of the packages that decide the numbers (read without importing them)."""
  found = []
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch'):
    try:
      found.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      found.append(f'{name} -')
  return ', '.join(found)
