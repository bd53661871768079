r"""Runs a grid of training runs, one workdir each, and tabulates their final metrics.

  python -m launch.sweep --config=configs/default.py --workdir=/tmp/sweep \
      --sweep='config.learning_rate=[0.01, 0.02]' --sweep='config.model.init=["paper", "he"]' \
      --parallel=2 -- --config.num_epochs=4

Every point runs `python -m alexnet_jax.main --config=CONFIG --workdir=ROOT/NAME
--config.KEY=VALUE ... EXTRA` (EXTRA: the arguments after `--`) with its output in
ROOT/NAME/log.txt, NAME being its overrides, e.g. `learning_rate=0.01,model.init=paper`.
ROOT/results.csv and ROOT/results.md list every point's status and final metrics. Running the
same command again runs only the points without a final_metrics.json. `--dry_run` prints the
command lines instead (one per line, for SLURM arrays, see launch/slurm.sbatch).
"""

import ast
import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from ml_collections.config_flags import config_path

METRICS_FILE = 'final_metrics.json'  # Written by main at the end of a successful run.
LOG_FILE = 'log.txt'
EXIT_CODE_FILE = 'exit_code'  # Written by the sweep, so that a later sweep knows what failed.
METRICS = ('step', 'eval_top1', 'eval_top5', 'best_eval_top1', 'best_eval_top5', 'train_loss',
           'eval_loss', 'wall_time_s')
_MARKDOWN_FORMATS = {'step': '{}', 'wall_time_s': '{:.0f}'}  # Other metrics: '{:.4f}'.
_PREFIX = 'config.'
_MAX_NAME = 200  # Directory names stay under the usual 255-byte limit.


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep: config overrides (keys without 'config.'), name and workdir."""
  overrides: dict[str, Any]
  name: str
  workdir: str


def _config_key(key: str, where: str) -> str:
  """Returns 'a.b' for 'config.a.b', or raises saying where the bad key came from."""
  if not re.fullmatch(r'config(\.[A-Za-z_]\w*)+', key):
    raise ValueError(f"{where}: {key!r} is not a config field; write keys as they are "
                     "overridden on the command line, e.g. 'config.learning_rate'.")
  return key[len(_PREFIX):]


def parse_grid(specs: Sequence[str]) -> list[dict[str, Any]]:
  """Returns the points of the grid spanned by `--sweep` specs, the last one varying fastest.

  Args:
    specs: 'config.KEY=[VALUE, ...]' each, the values Python literals: strings quoted, tuples
      for tuple fields, e.g. 'config.step_epochs=[(30, 60), (20, 40)]'.

  Returns:
    One {KEY: value} dict per point (keys without 'config.').
  """
  axes = {}
  for spec in specs:
    key, sep, text = spec.partition('=')
    where = f'--sweep={spec!r}'
    if not sep:
      raise ValueError(f"{where}: expected 'config.KEY=[VALUE, ...]'.")
    key = _config_key(key.strip(), where)
    try:
      values = ast.literal_eval(text.strip())
    except (SyntaxError, ValueError):
      raise ValueError(f'{where}: {text!r} is not a Python literal; quote strings, e.g. '
                       '\'config.model.init=["paper", "caffe"]\'.') from None
    if not isinstance(values, list) or not values:
      raise ValueError(f'{where}: the values must be a non-empty list [VALUE, ...] (a list of '
                       'tuples for a tuple field).')
    if key in axes:
      raise ValueError(f'{where}: config.{key} is swept twice; put all its values in one list.')
    axes[key] = values
  return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def load_sweep_file(path: str) -> list[dict[str, Any]]:
  """Returns the points of a Python file whose `get_sweep()` lists {'config.KEY': value} dicts."""
  if not os.path.isfile(path):
    raise ValueError(f'--sweep_file={path!r} does not exist.')
  spec = importlib.util.spec_from_file_location('sweep_points', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  points = module.get_sweep() if hasattr(module, 'get_sweep') else None
  if (not isinstance(points, list) or not points or
      not all(isinstance(p, Mapping) and p for p in points)):
    raise ValueError(f'{path} must define get_sweep() returning a non-empty list of non-empty '
                     "dicts such as {'config.learning_rate': 0.01}.")
  return [{_config_key(k, path): v for k, v in point.items()} for point in points]


def flag_value(value: Any) -> str:
  """Returns `value` as text that main's --config.KEY=TEXT reads back as `value`."""
  # config_flags hands str fields the raw text (quotes would become part of the string) and
  # reads numbers, bools and tuples as Python literals.
  return value if isinstance(value, str) else repr(value)


def point_name(overrides: Mapping[str, Any]) -> str:
  """Returns a directory name such as 'learning_rate=0.01,model.init=paper' for a point."""
  name = ','.join(f'{key}={_name_part(overrides[key])}' for key in sorted(overrides))
  if len(name) > _MAX_NAME:
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f'{name[:_MAX_NAME - len(digest) - 1]}-{digest}'
  return name


def _name_part(value: Any) -> str:
  return re.sub(r'[^A-Za-z0-9.+-]+', '_', flag_value(value)).strip('_')


def make_points(grid: Sequence[Mapping[str, Any]], root: str) -> list[Point]:
  """Returns a Point under `root` per override dict; raises if two would share a workdir."""
  points = [Point(dict(o), point_name(o), os.path.join(root, point_name(o))) for o in grid]
  names = [p.name for p in points]
  shared = sorted({name for name in names if names.count(name) > 1})
  if shared:
    raise ValueError(f'Several points would run in the same workdir {shared}: the sweep lists a '
                     'point twice, or values that differ only in characters a directory name '
                     'cannot hold.')
  return points


def _override_args(point: Point) -> list[str]:
  return [f'--config.{key}={flag_value(value)}' for key, value in point.overrides.items()]


def point_command(point: Point, *, module: str, config: str,
                  extra_args: Sequence[str] = ()) -> list[str]:
  """Returns the argv that runs `point`: python -m MODULE --config --workdir overrides extra."""
  return [sys.executable, '-m', module, f'--config={config}', f'--workdir={point.workdir}',
          *_override_args(point), *extra_args]


def check_points(points: Sequence[Point], config: str, extra_args: Sequence[str] = ()) -> None:
  """Raises ValueError unless main's --config flag reads every point's values back exactly.

  Catches unknown fields, values of the wrong type and values the command line cannot carry
  (None, or 5.0 for an int field) before any run starts.
  """
  if not os.path.isfile(config.split(':', 1)[0]):
    raise ValueError(f'--config={config!r}: no such file.')
  keys = {key for point in points for key in point.overrides}
  for arg in extra_args:
    name = arg.split('=', 1)[0].lstrip('-')
    if name in ('config', 'workdir') or (name.startswith(_PREFIX) and
                                        name[len(_PREFIX):] in keys):
      raise ValueError(f'{arg!r} after -- would override what the sweep sets itself; give it '
                       'to the sweep (--config, --workdir, --sweep) instead.')
  for point in points:
    argv = ['main', f'--config={config}', *_override_args(point), *extra_args]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
    try:
      flag_values(argv, known_only=True)  # Flags main defines besides --config are not ours.
      for key, value in point.overrides.items():
        got = config_path.get_value(key, holder.value)
        want = tuple(value) if isinstance(value, list) else value
        if got != want:
          raise ValueError(f'config.{key}={value!r} would reach main as {got!r}.')
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      raise ValueError(f'Point {point.name}: {_reason(e)}') from None


def _reason(error: Exception) -> str:
  # config_flags reports an unknown field as an AttributeError around a KeyError of its name.
  while isinstance(error, (AttributeError, KeyError)) and error.args:
    if not isinstance(error.args[0], Exception):
      return 'unknown config field ' + str(error.args[0]).replace('\n', ' ')
    error = error.args[0]
  return str(error)


def needs_run(point: Point, rerun_failed: bool = True) -> bool:
  """Whether `point` has no final metrics yet (and, unless rerun_failed, has not failed)."""
  if os.path.exists(os.path.join(point.workdir, METRICS_FILE)):
    return False
  return rerun_failed or not os.path.exists(os.path.join(point.workdir, EXIT_CODE_FILE))


def point_result(point: Point) -> dict[str, Any]:
  """Returns the point's row of the results table, read from its workdir.

  Status is 'ok' (final_metrics.json exists), 'failed(EXIT_CODE)' or 'missing' (never ran, or
  the run was interrupted); a failed row carries the last line of its log as 'error'.
  """
  log = os.path.join(point.workdir, LOG_FILE)
  row = {'status': 'missing', **dict.fromkeys(METRICS), 'log': log, 'error': ''}
  metrics_path = os.path.join(point.workdir, METRICS_FILE)
  exit_code_path = os.path.join(point.workdir, EXIT_CODE_FILE)
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      try:
        metrics = json.load(f)
      except json.JSONDecodeError:
        raise ValueError(f'{metrics_path} is not valid JSON; delete it to run the point '
                         'again.') from None
    row.update(status='ok', **{key: metrics.get(key) for key in METRICS})
  elif os.path.exists(exit_code_path):
    with open(exit_code_path) as f:
      code = int(f.read())
    row.update(status=f'failed({code})',
               error=_last_line(log) or f'exited {code} without {METRICS_FILE}')
  return row


def _last_line(path: str) -> str:
  """The last non-empty line of a log (where main writes its one-line error), '' if none."""
  if not os.path.exists(path):
    return ''
  with open(path, 'rb') as f:
    f.seek(max(0, os.path.getsize(path) - 4096))
    lines = [line.strip() for line in f.read().decode(errors='replace').splitlines()]
  lines = [line for line in lines if line and not line.startswith('[sweep]')]
  return lines[-1][:300] if lines else ''


def write_results(points: Sequence[Point], root: str) -> str:
  """Writes ROOT/results.csv and ROOT/results.md, one row per point; returns the Markdown.

  Columns: the swept keys, status, the metrics in METRICS, log path and error.
  """
  keys = list(dict.fromkeys(key for point in points for key in point.overrides))
  rows = [point_result(point) for point in points]
  header = [*keys, 'status', *METRICS, 'log', 'error']
  table = [[*(flag_value(p.overrides[k]) if k in p.overrides else '' for k in keys),
            *(row[column] for column in header[len(keys):])] for p, row in zip(points, rows)]
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    csv.writer(f).writerows([header, *[['' if v is None else v for v in r] for r in table]])
  lines = [header, ['---'] * len(header)]
  lines += [[_markdown_cell(column, value) for column, value in zip(header, r)] for r in table]
  markdown = ''.join(f"| {' | '.join(line)} |\n" for line in lines)
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write(markdown)
  return markdown


def _markdown_cell(column: str, value: Any) -> str:
  if value is None:
    return ''
  if column in METRICS:
    value = _MARKDOWN_FORMATS.get(column, '{:.4f}').format(value)
  return str(value).replace('|', r'\|')


def device_groups(parallel: int, gpus_per_point: int) -> list[str | None]:
  """Returns the CUDA_VISIBLE_DEVICES of each of `parallel` slots (None: leave it unset).

  With gpus_per_point > 0 the GPUs of this host (CUDA_VISIBLE_DEVICES, or all that nvidia-smi
  lists) are split into disjoint groups, so that points running at once do not share a GPU.
  """
  if not gpus_per_point:
    return [None] * parallel
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible:
    gpus = visible.split(',')
  else:
    try:
      listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
      raise ValueError('--gpus_per_point: nvidia-smi cannot list the GPUs; set '
                       'CUDA_VISIBLE_DEVICES.') from None
    gpus = [str(i) for i in range(len(listing.stdout.strip().splitlines()))]
  if parallel * gpus_per_point > len(gpus):
    raise ValueError(f'--parallel={parallel} x --gpus_per_point={gpus_per_point} needs '
                     f'{parallel * gpus_per_point} GPUs; this host has {len(gpus)}: {gpus}.')
  return [','.join(gpus[i * gpus_per_point:(i + 1) * gpus_per_point]) for i in range(parallel)]


def run_point(command: Sequence[str], workdir: str, devices: str | None = None) -> int:
  """Runs one point's command, output appended to WORKDIR/log.txt; returns its exit code."""
  os.makedirs(workdir, exist_ok=True)
  env = dict(os.environ) if devices is None else {**os.environ, 'CUDA_VISIBLE_DEVICES': devices}
  with open(os.path.join(workdir, LOG_FILE), 'a') as log:
    log.write(f"[sweep] {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
    log.flush()
    code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                          check=False).returncode
  with open(os.path.join(workdir, EXIT_CODE_FILE), 'w') as f:
    f.write(f'{code}\n')
  return code


def run_sweep(points: Sequence[Point], root: str, *, module: str, config: str,
              extra_args: Sequence[str] = (), device_slots: Sequence[str | None] = (None,),
              rerun_failed: bool = True) -> str:
  """Runs the points that need it; returns the results table (Markdown).

  Args:
    points: The sweep; those with final metrics (or, unless rerun_failed, a failure) are skipped.
    root: Where results.csv and results.md go, rewritten as each point finishes.
    module: What each point runs with `python -m`.
    config: The --config of every point.
    extra_args: Appended to every point's command line.
    device_slots: One CUDA_VISIBLE_DEVICES (None: inherited) per point running at once.
    rerun_failed: Whether points that failed before run again.
  """
  todo = [point for point in points if needs_run(point, rerun_failed)]
  logging.info('%d points, %d to run, in %s', len(points), len(todo), root)
  slots = queue.Queue()
  for devices in device_slots:
    slots.put(devices)
  lock = threading.Lock()

  def run(index: int, point: Point) -> None:
    devices = slots.get()
    progress = f'[{index}/{len(todo)}] {point.name}'
    logging.info('%s: started%s', progress, f' on GPUs {devices}' if devices else '')
    try:
      run_point(point_command(point, module=module, config=config, extra_args=extra_args),
                point.workdir, devices)
    finally:
      slots.put(devices)
    with lock:
      write_results(points, root)
      _log_result(progress, point_result(point))

  with concurrent.futures.ThreadPoolExecutor(len(device_slots)) as pool:
    futures = [pool.submit(run, i, point) for i, point in enumerate(todo, 1)]
    try:
      for future in futures:
        future.result()
    except BaseException:
      pool.shutdown(cancel_futures=True)  # Ctrl-C (or a bug): start no further points.
      raise
  return write_results(points, root)


def _log_result(progress: str, row: Mapping[str, Any]) -> None:
  if row['status'] == 'ok':
    logging.info('%s: ok, top-1 %s (best %s) after %s steps, %s s', progress, row['eval_top1'],
                 row['best_eval_top1'], row['step'], row['wall_time_s'])
  else:
    logging.warning('%s: %s: %s (log: %s)', progress, row['status'], row['error'], row['log'])


def _define_flags() -> None:
  # Defined only when run as a script: tests import this module next to alexnet_jax.main,
  # which owns --config and --workdir in the global flag registry.
  flags.DEFINE_multi_string('sweep', [], "An axis of the grid, 'config.KEY=[VALUE, ...]' with "
                            'Python literals (strings quoted); repeat for more axes.')
  flags.DEFINE_string('sweep_file', None, 'Instead of --sweep: a Python file whose get_sweep() '
                      "returns the points, [{'config.KEY': value, ...}, ...].")
  flags.DEFINE_string('config', 'configs/default.py', 'Config file of every point.')
  flags.DEFINE_string('workdir', None, 'Sweep root: point NAME runs in ROOT/NAME.')
  flags.DEFINE_string('module', 'alexnet_jax.main', 'Module every point runs (python -m).')
  flags.DEFINE_integer('parallel', 1, 'Points run at once on this host.', lower_bound=1)
  flags.DEFINE_integer('gpus_per_point', 0, 'GPUs given to each running point (disjoint '
                       'CUDA_VISIBLE_DEVICES); 0: every point sees all GPUs.', lower_bound=0)
  flags.DEFINE_bool('rerun_failed', True, 'Run failed points again (missing ones always run).')
  flags.DEFINE_bool('dry_run', False, 'Print the command line of every point that would run, '
                    'one per line, and run nothing.')
  flags.DEFINE_bool('report_only', False, 'Write the results table from the workdirs and run '
                    'nothing (e.g. after a SLURM array).')
  flags.mark_flag_as_required('workdir')


def main(argv: Sequence[str]) -> int:
  f = flags.FLAGS
  extra_args = argv[1:]
  # Points run `python -m` from here, which puts this directory on sys.path: so does the check.
  sys.path.insert(0, os.getcwd())
  try:
    if bool(f.sweep) == bool(f.sweep_file):
      raise ValueError('Give the points with either --sweep (repeatable) or --sweep_file.')
    grid = parse_grid(f.sweep) if f.sweep else load_sweep_file(f.sweep_file)
    points = make_points(grid, f.workdir)
    check_points(points, f.config, extra_args)
    device_slots = device_groups(f.parallel, f.gpus_per_point)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if f.dry_run:
    for point in points:
      if needs_run(point, f.rerun_failed):
        print(shlex.join(point_command(point, module=f.module, config=f.config,
                                       extra_args=extra_args)))
    return 0
  if f.report_only:
    markdown = write_results(points, f.workdir)
  else:
    markdown = run_sweep(points, f.workdir, module=f.module, config=f.config,
                         extra_args=extra_args, device_slots=device_slots,
                         rerun_failed=f.rerun_failed)
  print(markdown, end='')
  logging.info('Results: %s', os.path.join(f.workdir, 'results.md'))
  return int(any(point_result(p)['status'].startswith('failed') for p in points))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
