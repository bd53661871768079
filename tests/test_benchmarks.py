"""The benchmark harness: fresh processes in alternating order, per-pair ratios, no JAX in
PyTorch's processes."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks import timing

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _child(name: str, log: pathlib.Path) -> list[str]:
  """A Python command that logs its name, then prints a result holding it and its pid."""
  return ['-c', f'import os; open({str(log)!r}, "a").write("{name}\\n"); '
                f'print({timing.RESULT_PREFIX!r} + \'{{"name": "{name}", "pid": \' + '
                f'str(os.getpid()) + "}}")']


def test_processes_alternate_a_b_b_a_and_are_fresh(tmp_path):
  log = tmp_path / 'order.txt'
  results = timing.run_alternating({'a': _child('a', log), 'b': _child('b', log)}, 3,
                                   lambda name, result: result['name'])
  assert log.read_text().split() == ['a', 'b', 'b', 'a', 'a', 'b']
  assert [r['name'] for r in results['a']] == ['a'] * 3
  pids = [r['pid'] for rs in results.values() for r in rs]
  assert len(set(pids)) == 6  # Every run was a process of its own.


def test_a_failed_process_names_itself_and_shows_its_stderr():
  failing = ['-c', 'import sys; sys.stderr.write("out of memory"); sys.exit(3)']
  message = r'(?s)The torch process \(pair 1\).*code 3.*out of memory'
  with pytest.raises(RuntimeError, match=message):
    timing.run_alternating({'torch': failing}, 2, lambda name, result: '')


def test_pair_ratio_is_the_median_of_per_pair_ratios_not_the_ratio_of_medians():
  # Per pair: 10, 2, 1 -> median 2; the medians' ratio would be 3 / 1 = 3.
  assert timing.pair_ratio([10.0, 2.0, 3.0], [1.0, 1.0, 3.0]) == 2.0
  with pytest.raises(ValueError, match='pairs'):
    timing.pair_ratio([1.0], [1.0, 2.0])


def test_the_pytorch_process_times_its_steps_without_ever_importing_jax():
  spec = {'variant': 'paper', 'batch': 2, 'image_size': 64, 'num_classes': 10, 'mode': 'train',
          'dtype': 'float32', 'steps': 2, 'warmup': 1, 'device': 'cpu', 'tf32': 'on',
          'channels_last': False, 'compile': False}
  probe = ('import runpy, sys; '
           f'sys.argv = ["torch_step.py", {json.dumps(json.dumps(spec))}]; '
           'runpy.run_path("benchmarks/torch_step.py", run_name="__main__"); '
           'print("JAX LOADED" if any(m.split(".")[0] in ("jax", "jaxlib", "flax") '
           'for m in sys.modules) else "NO JAX")')
  out = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  assert out.stdout.splitlines()[-1] == 'NO JAX'
  result = json.loads(next(l for l in out.stdout.splitlines()
                           if l.startswith(timing.RESULT_PREFIX))[len(timing.RESULT_PREFIX):])
  assert len(result['step_seconds']) == 2 and min(result['step_seconds']) > 0
  assert result['peak_mib'] > 0


@pytest.mark.slow
def test_the_train_step_benchmark_runs_fresh_and_shared_end_to_end():
  """The script's two modes at a tiny size: fresh processes print the per-pair ratio and the
  memory of both; the same-process mode (run as a module) says it is one."""
  tiny = ['--variant=paper', '--batch=2', '--image_size=64', '--num_classes=10', '--steps=1',
          '--warmup=1']
  fresh = subprocess.run([sys.executable, 'benchmarks/train_step.py', *tiny, '--pairs=1'],
                         cwd=ROOT, capture_output=True, text=True, check=False)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  assert re.search(r'JAX / PyTorch speed, median of per-pair ratios: [\d.]+', fresh.stdout)
  assert fresh.stdout.count('MiB with building and compiling') == 2
  shared = subprocess.run([sys.executable, '-m', 'benchmarks.train_step', *tiny, '--rounds=1',
                           '--processes=shared'], cwd=ROOT, capture_output=True, text=True,
                          check=False)
  assert shared.returncode == 0, shared.stderr[-3000:]
  assert 'SAME PROCESS' in shared.stdout and '(same process)' in shared.stdout
