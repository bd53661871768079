"""Tests of launch/: the sweep launcher (with a stand-in main and the real one) and the scripts."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from launch import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(REPO / 'configs' / 'default.py')

# Stands in for alexnet_jax.main: logs its call, fails when the learning rate is FAKE_FAIL_LR,
# otherwise writes metrics made from the learning rate and the GPUs it was given.
FAKE_MAIN = """
import json, os, sys, time
args = dict(arg.split('=', 1) for arg in sys.argv[1:])
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(args['--workdir'] + '\\n')
time.sleep(float(os.environ.get('FAKE_SLEEP', '0')))
if args['--config.learning_rate'] == os.environ.get('FAKE_FAIL_LR'):
  print('I0101 training...\\nE0101 ValueError: loss is nan at step 3')
  sys.exit(3)
lr = float(args['--config.learning_rate'])
metrics = dict(step=7, epoch=0.5, train_loss=2.0, eval_loss=2.5, eval_top1=lr, eval_top5=2 * lr,
               best_eval_top1=lr + 0.01, best_eval_top5=2 * lr + 0.01, wall_time_s=1.5,
               devices=os.environ.get('CUDA_VISIBLE_DEVICES'))
with open(os.path.join(args['--workdir'], 'final_metrics.json'), 'w') as f:
  json.dump(metrics, f)
"""


@pytest.fixture
def sweep_fake_main(tmp_path) -> dict[str, str]:
  """The environment in which `--module=fake_main` runs FAKE_MAIN, its calls in FAKE_CALLS."""
  (tmp_path / 'fake_main.py').write_text(FAKE_MAIN)
  return {**os.environ, 'PYTHONPATH': str(tmp_path), 'FAKE_CALLS': str(tmp_path / 'calls.txt')}


def _calls(env: dict[str, str]) -> list[str]:
  path = pathlib.Path(env['FAKE_CALLS'])
  return sorted(path.read_text().splitlines()) if path.exists() else []


def _sweep(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'launch.sweep', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, check=False, timeout=600)


def _results(root: pathlib.Path) -> list[dict[str, str]]:
  with open(root / 'results.csv', newline='') as f:
    return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ grid


def test_parse_grid_reads_python_literals_and_main_reads_them_back():
  grid = sweep.parse_grid(['config.learning_rate=[0.01, 1e-3]',
                           'config.model.init=[\'paper\', "he"]',
                           'config.step_epochs=[(30, 60), (10,)]'])
  assert len(grid) == 8
  assert grid[0] == {'learning_rate': 0.01, 'model.init': 'paper', 'step_epochs': (30, 60)}
  assert grid[1] == {'learning_rate': 0.01, 'model.init': 'paper', 'step_epochs': (10,)}
  assert grid[7] == {'learning_rate': 0.001, 'model.init': 'he', 'step_epochs': (10,)}
  points = sweep.make_points(grid, '/runs')
  sweep.check_points(points, DEFAULT_CONFIG)  # config_flags reads every value back unchanged.
  assert points[1].name == 'learning_rate=0.01,model.init=paper,step_epochs=10'
  assert points[1].workdir == '/runs/learning_rate=0.01,model.init=paper,step_epochs=10'
  assert sweep.point_command(points[1], module='m', config='c.py', extra_args=['--x=1']) == [
      sys.executable, '-m', 'm', '--config=c.py', f'--workdir={points[1].workdir}',
      '--config.learning_rate=0.01', '--config.model.init=paper', '--config.step_epochs=(10,)',
      '--x=1']


@pytest.mark.parametrize('specs, message', [
    (['config.model.init=[paper, caffe]'], 'not a Python literal; quote strings'),
    (['config.learning_rate=0.01'], 'must be a non-empty list'),
    (['config.learning_rate=[]'], 'must be a non-empty list'),
    (['config.learning_rate'], "expected 'config.KEY="),
    (['learning_rate=[0.01]'], "'learning_rate' is not a config field"),
    (['config.seed=[0]', 'config.seed=[1]'], 'config.seed is swept twice'),
])
def test_parse_grid_rejects_bad_specs(specs, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_grid(specs)


@pytest.mark.parametrize('overrides, message', [
    ({'learnin_rate': 0.1}, "unknown config field 'learnin_rate'"),
    ({'model.nope': 1}, "unknown config field 'nope'"),
    ({'num_train_steps': 5.0}, 'invalid literal for int'),
    ({'num_train_steps': '5'}, "num_train_steps='5' would reach main as 5"),
    ({'model.init': 3}, "init=3 would reach main as '3'"),
    ({'data_dir': None}, "data_dir=None would reach main as 'None'"),
])
def test_check_points_rejects_what_main_would_read_otherwise(overrides, message):
  with pytest.raises(ValueError, match=message):
    sweep.check_points(sweep.make_points([overrides], '/runs'), DEFAULT_CONFIG)


@pytest.mark.parametrize('extra', ['--config.learning_rate=1', '--workdir=/x', '--config=c.py'])
def test_check_points_rejects_extra_args_that_override_the_sweep(extra):
  points = sweep.make_points([{'learning_rate': 0.1}], '/runs')
  with pytest.raises(ValueError, match='would override what the sweep sets'):
    sweep.check_points(points, DEFAULT_CONFIG, [extra])


def test_point_names_are_distinct_and_short():
  with pytest.raises(ValueError, match='same workdir'):
    sweep.make_points([{'data_dir': 'a/b'}, {'data_dir': 'a_b'}], '/runs')
  long_names = [sweep.point_name({'data_dir': 'x' * n}) for n in (300, 301)]
  assert long_names[0] != long_names[1] and max(map(len, long_names)) == 200


def test_load_sweep_file(tmp_path):
  good = tmp_path / 'points.py'
  good.write_text('def get_sweep():\n  return [{"config.learning_rate": 0.1, '
                  '"config.model.init": "he"}, {"config.learning_rate": 0.2}]\n')
  assert sweep.load_sweep_file(str(good)) == [{'learning_rate': 0.1, 'model.init': 'he'},
                                              {'learning_rate': 0.2}]
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_sweep():\n  return {"config.learning_rate": 0.1}\n')
  with pytest.raises(ValueError, match='non-empty list of non-empty dicts'):
    sweep.load_sweep_file(str(bad))


# ----------------------------------------------------------------------------- CLI


def test_dry_run_prints_one_command_per_point(tmp_path):
  root = tmp_path / 'sweep'
  result = _sweep(f'--workdir={root}', '--sweep=config.learning_rate=[0.01,0.02]',
                  '--sweep=config.model.init=["paper","caffe"]', '--dry_run', '--',
                  '--config.num_train_steps=10')
  assert result.returncode == 0, result.stderr
  expected = [
      f'{sys.executable} -m alexnet_jax.main --config=configs/default.py '
      f'--workdir={root}/learning_rate={lr},model.init={init} --config.learning_rate={lr} '
      f'--config.model.init={init} --config.num_train_steps=10'
      for lr in ('0.01', '0.02') for init in ('paper', 'caffe')]
  assert result.stdout.splitlines() == expected
  assert not root.exists()


def test_bad_sweep_flag_stops_before_running(tmp_path):
  result = _sweep(f'--workdir={tmp_path}', '--sweep=config.model.init=[paper]')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "--sweep='config.model.init=[paper]': '[paper]' is not a Python literal; quote strings, "
      'e.g. \'config.model.init=["paper", "caffe"]\'.')
  result = _sweep(f'--workdir={tmp_path}')
  assert 'either --sweep (repeatable) or --sweep_file' in result.stderr
  assert list(tmp_path.iterdir()) == []


def test_failed_points_are_tabled_and_only_unfinished_points_rerun(tmp_path, sweep_fake_main):
  root = tmp_path / 'sweep'
  args = ['--module=fake_main', f'--workdir={root}', '--parallel=2']
  failing = {**sweep_fake_main, 'FAKE_FAIL_LR': '0.2'}
  workdirs = {lr: str(root / f'learning_rate={lr}') for lr in ('0.1', '0.2', '0.3')}

  first = _sweep(*args, '--sweep=config.learning_rate=[0.1, 0.2]', env=failing)
  assert first.returncode == 1
  rows = _results(root)
  assert [(r['learning_rate'], r['status']) for r in rows] == [('0.1', 'ok'), ('0.2', 'failed(3)')]
  assert [float(rows[0][k]) for k in ('eval_top1', 'eval_top5', 'best_eval_top1')] == [
      0.1, 0.2, 0.11]
  assert (rows[0]['step'], rows[0]['wall_time_s'], rows[0]['error']) == ('7', '1.5', '')
  assert rows[1]['error'] == 'E0101 ValueError: loss is nan at step 3'
  assert rows[1]['log'] == os.path.join(workdirs['0.2'], 'log.txt')
  assert rows[1]['eval_top1'] == ''
  assert (root / 'results.md').read_text().splitlines()[2:] == [
      f'| 0.1 | ok | 7 | 0.1000 | 0.2000 | 0.1100 | 0.2100 | 2.0000 | 2.5000 | 2 | '
      f'{workdirs["0.1"]}/log.txt |  |',
      f'| 0.2 | failed(3) |  |  |  |  |  |  |  |  | {workdirs["0.2"]}/log.txt | '
      'E0101 ValueError: loss is nan at step 3 |']
  assert _calls(sweep_fake_main) == [workdirs['0.1'], workdirs['0.2']]

  # A new point runs; the failed one is kept as it is.
  second = _sweep(*args, '--sweep=config.learning_rate=[0.1, 0.2, 0.3]', '--norerun_failed',
                  env=failing)
  assert second.returncode == 1
  assert [r['status'] for r in _results(root)] == ['ok', 'failed(3)', 'ok']
  assert _calls(sweep_fake_main) == [workdirs['0.1'], workdirs['0.2'], workdirs['0.3']]

  # By default failed points run again; finished ones never do.
  third = _sweep(*args, '--sweep=config.learning_rate=[0.1, 0.2, 0.3]', env=sweep_fake_main)
  assert third.returncode == 0, third.stderr
  assert [r['status'] for r in _results(root)] == ['ok', 'ok', 'ok']
  assert _calls(sweep_fake_main) == [workdirs['0.1'], workdirs['0.2'], workdirs['0.2'],
                                     workdirs['0.3']]
  log = pathlib.Path(workdirs['0.2'], 'log.txt').read_text()
  assert log.count('[sweep]') == 2 and 'loss is nan' in log  # Attempts append.
  dry = _sweep(*args, '--sweep=config.learning_rate=[0.1, 0.2, 0.3]', '--dry_run')
  assert dry.stdout == ''


def test_report_only_tables_workdirs_without_running(tmp_path, sweep_fake_main):
  root = tmp_path / 'sweep'
  (root / 'learning_rate=0.1').mkdir(parents=True)
  (root / 'learning_rate=0.1' / 'final_metrics.json').write_text(json.dumps(
      {'step': 5, 'eval_top1': 0.25, 'best_eval_top1': 0.5}))
  (root / 'learning_rate=0.2').mkdir()
  (root / 'learning_rate=0.2' / 'exit_code').write_text('-9\n')
  result = _sweep('--module=fake_main', f'--workdir={root}', '--report_only',
                  '--sweep=config.learning_rate=[0.1, 0.2, 0.3]', env=sweep_fake_main)
  assert result.returncode == 1
  rows = _results(root)
  assert [r['status'] for r in rows] == ['ok', 'failed(-9)', 'missing']
  assert (rows[0]['step'], rows[0]['eval_top1'], rows[0]['best_eval_top1'],
          rows[0]['eval_top5']) == ('5', '0.25', '0.5', '')
  assert rows[1]['error'] == 'exited -9 without final_metrics.json'
  assert _calls(sweep_fake_main) == []


def test_concurrent_points_get_disjoint_gpus(tmp_path, sweep_fake_main):
  root = tmp_path / 'sweep'
  env = {**sweep_fake_main, 'CUDA_VISIBLE_DEVICES': '3,5,7,9', 'FAKE_SLEEP': '1'}
  result = _sweep('--module=fake_main', f'--workdir={root}', '--parallel=2',
                  '--gpus_per_point=2', '--sweep=config.learning_rate=[0.1, 0.2]', env=env)
  assert result.returncode == 0, result.stderr
  devices = [json.loads((root / f'learning_rate={lr}' / 'final_metrics.json').read_text())
             ['devices'] for lr in ('0.1', '0.2')]
  assert sorted(devices) == ['3,5', '7,9']


def test_device_groups(monkeypatch):
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1,2,3,4')
  assert sweep.device_groups(2, 2) == ['0,1', '2,3']
  assert sweep.device_groups(3, 0) == [None, None, None]
  with pytest.raises(ValueError, match='needs 6 GPUs; this host has 5'):
    sweep.device_groups(3, 2)


@pytest.mark.slow
def test_sweep_runs_the_real_main(tmp_path):
  root = tmp_path / 'sweep'
  # One CPU device is all a point needs; seeds share compiled programs, which the second point
  # then takes from JAX's compilation cache: half the time of two cold runs.
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / 'jax_cache')
  result = _sweep(f'--workdir={root}', '--sweep=config.seed=[0, 1]', '--',
                  '--config.num_train_steps=3', '--config.steps_per_eval=1',
                  '--config.batch_size=8', '--config.eval_batch_size=8', '--config.image_size=64',
                  '--config.resize_size=64', '--config.num_devices=1', env=env)
  rows = _results(root)
  assert result.returncode == 0, [r['error'] for r in rows]
  assert [(r['seed'], r['status'], r['step']) for r in rows] == [('0', 'ok', '3'), ('1', 'ok', '3')]
  for row in rows:
    top1, top5, best1 = (float(row[k]) for k in ('eval_top1', 'eval_top5', 'best_eval_top1'))
    assert 0 <= top1 <= top5 <= 1 and top1 <= best1 <= 1
    assert float(row['wall_time_s']) > 0
  assert rows[0]['train_loss'] != rows[1]['train_loss']  # The seed reached each run.


# ------------------------------------------------------------------------- scripts


def test_scripts_parse():
  subprocess.run(['bash', '-n', 'launch/local.sh', 'launch/slurm.sbatch'], cwd=REPO, check=True)


def test_local_sh_help_and_bad_arguments():
  result = subprocess.run(['launch/local.sh', '--help'], cwd=REPO, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0 and result.stdout.startswith('Usage: launch/local.sh [--cpu N]')
  result = subprocess.run(['launch/local.sh', '--cpu', '0'], cwd=REPO, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 2 and '--cpu takes a device count' in result.stderr


def _echo_script(path: pathlib.Path) -> pathlib.Path:
  """An executable that prints the environment local.sh sets and its arguments."""
  path.write_text('#!/bin/sh\nfor v in JAX_PLATFORMS XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION '
                  'JAX_LOCAL_DEVICE_IDS; do eval "echo $v=\\${$v-unset}"; done\n'
                  'printf "arg=%s\\n" "$@"\n')
  path.chmod(0o755)
  return path


def test_local_sh_cpu_mode(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHON'] = str(_echo_script(tmp_path / 'python'))
  result = subprocess.run(['launch/local.sh', '--cpu', '3', '--config=configs/default.py',
                           '--workdir=/tmp/a b'], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True)
  assert result.stdout.splitlines() == [
      'JAX_PLATFORMS=cpu', 'XLA_FLAGS=--xla_force_host_platform_device_count=3',
      'XLA_PYTHON_CLIENT_MEM_FRACTION=.9', 'JAX_LOCAL_DEVICE_IDS=unset', 'arg=-m',
      'arg=alexnet_jax.main', 'arg=--config=configs/default.py', 'arg=--workdir=/tmp/a b']


def test_slurm_sbatch_runs_local_sh_per_task(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _echo_script(bin_dir / 'srun')
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_SUBMIT_DIR': str(REPO),
         'SLURM_JOB_NUM_NODES': '2', 'SLURM_GPUS_PER_NODE': 'a100:4', 'VENV': '/nonexistent',
         'WORKDIR': '/w', 'DATA_DIR': '/d'}

  def sbatch(**slurm_env):
    return subprocess.run(['bash', 'launch/slurm.sbatch', '--config.seed=1'], cwd=REPO,
                          env={**env, **slurm_env}, capture_output=True, text=True, check=False)

  per_node = sbatch(SLURM_NTASKS_PER_NODE='1')
  assert per_node.stdout.splitlines()[3:] == [
      'JAX_LOCAL_DEVICE_IDS=0,1,2,3', 'arg=--kill-on-bad-exit=1', 'arg=launch/local.sh',
      'arg=--config=configs/imagenet.py', 'arg=--workdir=/w', 'arg=--config.data_dir=/d',
      'arg=--config.seed=1']
  per_gpu = sbatch(SLURM_NTASKS_PER_NODE='4')
  assert per_gpu.stdout.splitlines()[3] == 'JAX_LOCAL_DEVICE_IDS=unset'
  assert sbatch(SLURM_NTASKS_PER_NODE='3').returncode == 2

  commands = tmp_path / 'commands.txt'
  dry = _sweep(f'--workdir={tmp_path}/s w', '--sweep=config.step_epochs=[(1, 2), (3,)]',
               '--dry_run', '--', '--config.data_dir=/d')
  commands.write_text(dry.stdout)
  array_task = sbatch(SLURM_NTASKS_PER_NODE='1', SWEEP_COMMANDS=str(commands),
                      SLURM_ARRAY_TASK_ID='1')
  assert array_task.stdout.splitlines()[5:] == [
      'arg=launch/local.sh',
      'arg=--config=configs/default.py', f'arg=--workdir={tmp_path}/s w/step_epochs=3',
      'arg=--config.step_epochs=(3,)', 'arg=--config.data_dir=/d']
  missing = sbatch(SLURM_NTASKS_PER_NODE='1', SWEEP_COMMANDS=str(commands),
                   SLURM_ARRAY_TASK_ID='2')
  assert missing.returncode == 2 and 'has no line for array task 2' in missing.stderr
