"""`python -m alexnet_jax.main` end to end: runs, resumes bit-exactly, refuses bad input.

Every run is a real subprocess on a tiny digits config. They share a JAX compilation cache
(the `env` fixture of conftest.py), so only the first one pays for compiling the steps.
"""

import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

# Small enough to run in seconds, big enough to cross an epoch boundary (1437 // 48 = 29 steps)
# and to exercise dropout, checkpoints every 4 steps and an eval.
TINY = ['--config=configs/default.py', '--config.batch_size=48', '--config.eval_batch_size=96',
        '--config.image_size=63', '--config.resize_size=66', '--config.steps_per_eval=1',
        '--config.log_every_steps=4', '--config.checkpoint_every_steps=4',
        '--config.eval_every_epochs=100', '--config.num_devices=2']


def main_command(workdir, *flags) -> list[str]:
  """The command line of a TINY run of main in `workdir`; later flags override earlier ones."""
  return [sys.executable, '-m', 'alexnet_jax.main', f'--workdir={workdir}', *TINY, *flags]


def run_main(workdir, *flags, env, timeout=600):
  """Runs main to completion; its stderr is also kept in WORKDIR.stderr.txt for post-mortems."""
  result = subprocess.run(main_command(workdir, *flags), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  pathlib.Path(f'{workdir}.stderr.txt').write_text(result.stderr)
  return result


def final_params(workdir, step: int | None = None) -> dict[str, np.ndarray]:
  """The state of the newest checkpoint (or of `step`), as flat numpy arrays keyed by path."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(workdir) / 'checkpoints'
  if step is None:
    step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(directory / str(step) / 'state')
  flat = {}
  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f'{prefix}/{k}')
    else:
      flat[prefix] = np.asarray(node)
  walk(tree, '')
  return flat


def assert_bit_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def trained(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`final_params` without the plateau state: for runs whose evaluations differ by design."""
  return {k: v for k, v in state.items() if not k.startswith('/plateau/')}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, env):
  """A 12-step run that nothing interrupts: the reference for the resume tests."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = run_main(workdir, '--config.num_train_steps=12', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_main_runs_and_leaves_its_outputs(uninterrupted):
  names = {p.name for p in uninterrupted.iterdir()}
  assert {'checkpoints', 'tensorboard', 'curves.png', 'metrics.jsonl', 'config.json',
          'model_summary.txt', 'final_metrics.json'} <= names
  assert list((uninterrupted / 'tensorboard').iterdir())


@pytest.mark.slow
def test_second_run_resumes_at_saved_step(tmp_path, env):
  # A constant schedule: under cosine the horizon, num_train_steps, may not change.
  first = run_main(tmp_path, '--config.num_train_steps=4', '--config.lr_schedule=constant',
                   env=env)
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_main(tmp_path, '--config.num_train_steps=8', '--config.lr_schedule=constant',
                    env=env)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 4' in second.stderr
  assert '[8] train' in second.stderr and '[4] train' not in second.stderr
  # A third run changes the weight decay: the resumed optimizer state takes the new value
  # (it kept the checkpoint's 5e-4 before).
  third = run_main(tmp_path, '--config.num_train_steps=10', '--config.lr_schedule=constant',
                   '--config.weight_decay=0.01', '--config.allow_config_change=True', env=env)
  assert third.returncode == 0, third.stderr[-3000:]
  assert 'Resumed with weight_decay=0.01 from the config (the checkpoint had 0.0005)' in third.stderr
  assert final_params(tmp_path)['/opt_state/hyperparams/weight_decay'] == np.float32(0.01)


def _start(workdir, env, *flags):
  return subprocess.Popen(main_command(workdir, '--config.num_train_steps=12', *flags), cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, 'the run ended before it could be interrupted'
    assert time.time() < deadline, 'timed out waiting for the run'
    time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_bit_identical_params(tmp_path, env, uninterrupted):
  process = _start(tmp_path, env)
  _wait_for(lambda: (tmp_path / 'checkpoints' / '4').exists(), process)
  process.kill()
  process.wait()
  rerun = run_main(tmp_path, '--config.num_train_steps=12', env=env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'Resuming from the checkpoint at step' in rerun.stderr
  assert_bit_equal(final_params(tmp_path), final_params(uninterrupted))


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_exits_143_and_resumes_bit_exactly(tmp_path, env,
                                                                         uninterrupted):
  process = _start(tmp_path, env)
  _wait_for(lambda: (tmp_path / 'metrics.jsonl').exists(), process)  # Training has begun.
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 143, output[-3000:]
  match = re.search(r'Preempted: checkpoint of step (\d+) saved', output)
  assert match, output[-3000:]
  step = int(match.group(1))
  assert step < 12
  assert int(final_params(tmp_path)['/step']) == step
  rerun = run_main(tmp_path, '--config.num_train_steps=12', env=env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'Resuming from the checkpoint at step {step}' in rerun.stderr, rerun.stderr[-3000:]
  assert_bit_equal(final_params(tmp_path), final_params(uninterrupted))


# The first stays in the fast tier, so that it runs main; each of the others takes ~7 s.
@pytest.mark.parametrize('flags,message', [
    (['--config.dataset=imagenet20'], 'imagenet20'),
    pytest.param(['--config.learning_rate=-0.1'], 'config.learning_rate=-0.1 must be positive',
                 marks=pytest.mark.slow),
    pytest.param(['--config.batch_size=47'], 'config.batch_size=47 must be a positive multiple '
                 'of the number of devices', marks=pytest.mark.slow),
    pytest.param(['--config.image_size=32', '--config.resize_size=40'], 'the minimum is 63',
                 marks=pytest.mark.slow),
    pytest.param(['--config.dataset=folder', '--config.data_dir=/nonexistent/images'],
                 '/nonexistent/images', marks=pytest.mark.slow),
    (['--config.no_such_field=1'], 'no_such_field'),
    (['--config=configs/no_such_config.py'], 'no_such_config.py'),
])
def test_bad_input_is_one_clear_error_and_nonzero_exit(tmp_path, env, flags, message):
  result = run_main(tmp_path / 'run', *flags, env=env, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_workdir_of_another_config_is_refused(tmp_path, env):
  first = run_main(tmp_path, '--config.num_train_steps=1', env=env)
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_main(tmp_path, '--config.num_train_steps=2', '--config.learning_rate=0.5',
                    env=env)
  assert second.returncode == 1
  assert 'learning_rate: workdir 0.01, now 0.5' in second.stderr
  assert 'allow_config_change' in second.stderr


def _file_stats(workdir) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(workdir)): (p.stat().st_mtime_ns, p.stat().st_size)
          for p in pathlib.Path(workdir).rglob('*') if p.is_file()}


@pytest.mark.slow
def test_rerun_of_a_finished_run_says_so_and_leaves_every_file(tmp_path, env, uninterrupted):
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted, workdir)
  before = _file_stats(workdir)
  summary = (workdir / 'final_metrics.json').read_text()
  rerun = run_main(workdir, '--config.num_train_steps=12', env=env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  top1 = json.loads(summary)['eval_top1']
  assert f'holds a finished run: step 12 of 12, final eval top-1 {top1:.4f}' in rerun.stderr
  assert _file_stats(workdir) == before
  assert (workdir / 'final_metrics.json').read_text() == summary


@pytest.mark.slow
def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_ends_bit_exactly(
    tmp_path, env, uninterrupted):
  """The run is complete, then its last checkpoint is damaged: a rerun warns, moves it aside,
  restores step 8, trains through step 12 (where saving used to fail: the step existed) and
  ends as the uninterrupted run did; a rerun after that finds it finished."""
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted, workdir)
  for path in (workdir / 'checkpoints' / '12' / 'state' / 'ocdbt.process_0').rglob('*'):
    if path.is_file():
      path.write_bytes(path.read_bytes()[:10])
  rerun = run_main(workdir, '--config.num_train_steps=12', env=env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  damaged = workdir / 'checkpoints-damaged' / '12'
  assert 'Skipped damaged checkpoint step 12' in rerun.stderr
  assert f'moved to {damaged}' in rerun.stderr
  assert 'Resuming from the checkpoint at step 8' in rerun.stderr
  assert 'Traceback' not in rerun.stderr and 'Event loop is closed' not in rerun.stderr
  assert (damaged / 'state').is_dir()
  assert_bit_equal(final_params(workdir), final_params(uninterrupted))
  again = run_main(workdir, '--config.num_train_steps=12', env=env)
  assert again.returncode == 0 and 'holds a finished run: step 12' in again.stderr


@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_saves_and_the_rerun_evaluates_it(
    tmp_path, env, uninterrupted):
  """The last step's evaluation covers the whole split in batches of 8 (45 batches): a
  SIGTERM while it runs stops it after the current batch; the rerun evaluates step 12 again
  and ends with the uninterrupted run's parameters."""
  flags = ['--config.num_train_steps=12', '--config.steps_per_eval=-1',
           '--config.eval_batch_size=8']
  process = subprocess.Popen(main_command(tmp_path, *flags), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  history = tmp_path / 'metrics.jsonl'
  _wait_for(lambda: history.exists() and '"step": 12, "kind": "train"' in history.read_text(),
            process)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 143, output[-3000:]
  assert 'Preempted during the evaluation of step 12' in output, output[-3000:]
  assert 'Preempted: checkpoint of step 12 saved' in output
  rerun = run_main(tmp_path, *flags, env=env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  final = json.loads((tmp_path / 'final_metrics.json').read_text())
  assert final['step'] == 12 and final['eval_top1'] is not None
  assert '[12] eval' in rerun.stderr
  # This run's evaluation covers the whole split, the reference's one batch: their plateau
  # states differ by design.
  assert_bit_equal(trained(final_params(tmp_path)), trained(final_params(uninterrupted)))


def _cut_to(source, workdir, step: int) -> None:
  """`workdir`: a copy of the run in `source` as it was at checkpoint `step`."""
  shutil.copytree(source, workdir)
  (workdir / 'final_metrics.json').unlink()
  for path in (workdir / 'checkpoints').iterdir():
    if path.name.isdigit() and int(path.name) > step:
      shutil.rmtree(path)


@pytest.mark.slow
def test_mesh_trains_as_pmap_and_checkpoints_resume_across_the_two(tmp_path, env,
                                                                    uninterrupted):
  """jit over a Mesh, 12 steps with dropout: bit-identical to pmap's run. Its checkpoint of
  step 8 resumes under pmap, and pmap's of step 4 under mesh, both ending bit-identical."""
  mesh = tmp_path / 'mesh'
  result = run_main(mesh, '--config.num_train_steps=12', '--config.parallelism=mesh', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_bit_equal(final_params(mesh), final_params(uninterrupted))
  for source, step, parallelism in ((mesh, 8, 'pmap'), (uninterrupted, 4, 'mesh')):
    workdir = tmp_path / f'{parallelism}_from_{step}'
    _cut_to(source, workdir, step)
    result = run_main(workdir, '--config.num_train_steps=12',
                      f'--config.parallelism={parallelism}', env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'Resuming from the checkpoint at step {step}.' in result.stderr
    assert_bit_equal(final_params(workdir), final_params(uninterrupted))


@pytest.mark.slow
def test_model_parallel_resumes_pmaps_run_evaluates_and_hands_back_to_pmap(tmp_path, env,
                                                                           uninterrupted):
  """The paper's split over the 2 devices through the same command: it resumes pmap's step 4,
  trains to 12 with an evaluation, and pmap resumes its step 8. (Its numbers equal one
  device's to rounding: tests/test_model_parallel.py; here dropout masks follow the data axis,
  of size 1 under 'model', so the runs' parameters differ by design.)"""
  split = tmp_path / 'model'
  _cut_to(uninterrupted, split, 4)
  result = run_main(split, '--config.num_train_steps=12', '--config.parallelism=model', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 4.' in result.stderr
  final = json.loads((split / 'final_metrics.json').read_text())
  assert final['step'] == 12 and 0.0 <= final['eval_top1'] <= 1.0
  assert np.isfinite(final['eval_loss'])
  back = tmp_path / 'pmap_from_model'
  _cut_to(split, back, 8)
  result = run_main(back, '--config.num_train_steps=12', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 8.' in result.stderr
  assert json.loads((back / 'final_metrics.json').read_text())['step'] == 12


@pytest.mark.slow
def test_an_error_mid_run_awaits_the_pending_save_and_is_one_line(tmp_path, env):
  """A learning rate of 1e8 overflows at step 3, found at the log of step 4, while the save
  of step 2 may still be writing: one line, no traceback, and checkpoint 2 complete."""
  result = run_main(tmp_path, '--config.num_train_steps=8', '--config.learning_rate=1e8',
                    '--config.checkpoint_every_steps=2', env=env)
  assert result.returncode == 1
  assert 'Non-finite loss or gradients at step 3' in result.stderr, result.stderr[-3000:]
  assert 'Last good checkpoint: step 2' in result.stderr
  assert 'Traceback' not in result.stderr and 'Event loop is closed' not in result.stderr
  assert int(final_params(tmp_path, step=2)['/step']) == 2
