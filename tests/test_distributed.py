"""Multi-process training and device-count-independent checkpoints, end to end.

Two real processes of `python -m alexnet_jax.main` on localhost (one CPU device each, gloo
collectives) must train as one process does on the same global batch, each reading only its
own half of it. Their checkpoint must then resume on 1 device, and that one's on 2 again.

All runs have dropout off: its masks are keyed by (step, global device index), so they differ
between device counts by design and only dropout-free runs have one result to compare with.
"""

import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from test_main import REPO, assert_bit_equal, final_params, main_command, run_main, trained

STEPS = 2  # Steps of each run: 2 processes, then 1 device, then 2 devices.
# num_devices=0: all the devices XLA_FLAGS gives. A constant learning rate, since cosine decays
# over num_train_steps and would tie the schedule to where each run stops; no warmup, so that
# every step moves the params by a full learning rate.
FLAGS = ['--config.num_devices=0', '--config.model.dropout_rate=0.0',
         '--config.lr_schedule=constant', '--config.warmup_epochs=0',
         f'--config.checkpoint_every_steps={STEPS}', '--config.keep_checkpoints=3']


def with_devices(env, count: int) -> dict[str, str]:
  """`env` with `count` CPU devices per process and gloo for collectives across processes."""
  # gloo is already JAX 0.10's default on CPU; named so that a changed default shows here.
  return {**env, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={count}',
          'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'}


def free_port() -> int:
  """A localhost TCP port that nothing listens on now (the OS picks it)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(workdirs, *flags, env, timeout=420) -> tuple[list[int], str]:
  """Runs main as processes 0, 1, ... of one run, process i in `workdirs[i]`.

  Returns:
    The exit codes (negative: killed) and the tails of the logs, each also in WORKDIR.log.
    A process that fails or outlives `timeout` takes the others down with it: waiting on a
    dead peer's collective would otherwise hang. None is left running on return, which also
    frees the coordinator's port.
  """
  coordinator = [f'--coordinator_address=127.0.0.1:{free_port()}',
                 f'--num_processes={len(workdirs)}']
  processes = []
  try:
    for index, workdir in enumerate(workdirs):
      with open(f'{workdir}.log', 'w') as log:  # A file, not a pipe: no one reads it meanwhile.
        processes.append(subprocess.Popen(
            main_command(workdir, *flags, *coordinator, f'--process_id={index}'), cwd=REPO,
            env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    # Until all have exited, one has failed (non-zero; None is running) or time is up.
    while (any(p.poll() is None for p in processes) and not any(p.poll() for p in processes)
           and time.monotonic() < deadline):
      time.sleep(0.2)
  finally:
    for process in processes:
      process.kill()  # A no-op for one that has exited.
      process.wait()
  logs = '\n'.join(f'--- process {i}:\n' + pathlib.Path(f'{w}.log').read_text()[-3000:]
                   for i, w in enumerate(workdirs))
  return [p.returncode for p in processes], logs


def assert_params_close(a, b):
  """Same step and params up to float32 rounding: for runs with the same per-device batches."""
  assert int(a['/step']) == int(b['/step'])
  keys = [k for k in a if k.startswith('/params/')]
  assert keys
  for key in keys:
    # atol: a few float32 ulps of the largest weights (~0.4), for the entries near zero.
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)


def assert_same_training(a, b, *, start):
  """`a` and `b` moved the same way from `start`: per array, |a - b| <= 5% of |b - start|.

  Runs whose per-device batch differs sum gradients in another order, and training amplifies
  those float32 roundings (a ReLU or max-pool choice flips, digits have many exact ties). Two
  uninterrupted 6-step runs on 1 and on 2 devices differed by up to 0.09% or up to 1.7% of how
  far training moved an array, with two versions of the conv gradient code (measured); the
  resumed runs below by 1e-6 and 0.4% with the same two. By estimate, a lost
  momentum buffer would be ~50% (momentum 0.9 carries about half of steps 3-6), a wrong batch ~100%.
  """
  assert int(a['/step']) == int(b['/step'])
  keys = [k for k in a if k.startswith('/params/')]
  assert keys
  for key in keys:
    moved = np.linalg.norm(b[key] - start[key])
    assert np.linalg.norm(a[key] - b[key]) <= 0.05 * moved, key


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env):
  """One process on 2 devices, 3 * STEPS steps uninterrupted, a checkpoint every STEPS."""
  workdir = tmp_path_factory.mktemp('reference')
  result = run_main(workdir, *FLAGS, f'--config.num_train_steps={3 * STEPS}',
                    env=with_devices(env, 2))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def process_workdirs(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(workdir, process 1's workdir) of a 2-process run under `root`.

  Process 1 has a workdir of its own whose checkpoints/ links to process 0's (Orbax needs one
  directory that all processes see), so anything else it writes shows up there.
  """
  workdir, workdir1 = root / 'run', root / 'process1'
  (workdir / 'checkpoints').mkdir(parents=True)
  workdir1.mkdir()
  (workdir1 / 'checkpoints').symlink_to(workdir / 'checkpoints')
  return workdir, workdir1


# Steps of the 2-process runs: long enough for a SIGTERM to land mid-run.
LONG = 5 * STEPS


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, env):
  """A LONG-step run of 2 processes with 1 device each, every checkpoint kept:
  (workdir, process 1's workdir)."""
  workdir, workdir1 = process_workdirs(tmp_path_factory.mktemp('two_processes'))
  codes, logs = run_processes([workdir, workdir1], *FLAGS, f'--config.num_train_steps={LONG}',
                              '--config.keep_checkpoints=10', env=with_devices(env, 1))
  assert codes == [0, 0], logs
  return workdir, workdir1


def test_two_processes_train_as_one_process_on_the_same_global_batch(two_processes, reference):
  workdir, _ = two_processes
  log = pathlib.Path(f'{workdir}.log').read_text()
  assert 'on 2 processes' in log and 'on 2 devices' in log
  assert_params_close(final_params(workdir, step=STEPS), final_params(reference, step=STEPS))


def test_only_process_0_writes_logs_and_summaries(two_processes):
  workdir, workdir1 = two_processes
  assert [p.name for p in workdir1.iterdir()] == ['checkpoints']
  assert {'metrics.jsonl', 'tensorboard', 'final_metrics.json', 'model_summary.txt',
          'config.json', 'curves.png'} <= {p.name for p in workdir.iterdir()}
  assert f'[{LONG}] train' in pathlib.Path(f'{workdir}.log').read_text()
  assert f'[{LONG}] train' not in pathlib.Path(f'{workdir1}.log').read_text()


def test_checkpoint_resumes_on_another_device_count(two_processes, reference, tmp_path, env):
  workdir = tmp_path / 'run'
  shutil.copytree(two_processes[0], workdir)  # Saved on 2 devices (of 2 processes).
  for later in (workdir / 'checkpoints').iterdir():  # Resume from step STEPS.
    if later.name.isdigit() and int(later.name) > STEPS:
      shutil.rmtree(later)
  for devices, steps in ((1, 2 * STEPS), (2, 3 * STEPS)):
    result = run_main(workdir, *FLAGS, f'--config.num_train_steps={steps}',
                      env=with_devices(env, devices))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'Resuming from the checkpoint at step {steps - STEPS}.' in result.stderr
    assert f'on {devices} devices' in result.stderr
  assert_same_training(final_params(workdir), final_params(reference),
                       start=final_params(reference, step=STEPS))


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_bit_exactly(
    tmp_path, env, two_processes):
  """JAX's preemption service carries process 1's notice to process 0: both save the same
  step and exit 143; the rerun of both ends as the uninterrupted 2-process run did."""
  workdirs = process_workdirs(tmp_path)
  coordinator = [f'--coordinator_address=127.0.0.1:{free_port()}', '--num_processes=2']
  flags = [*FLAGS, f'--config.num_train_steps={LONG}', '--config.keep_checkpoints=10']
  processes, logs = [], []
  try:
    for index, workdir in enumerate(workdirs):
      logs.append(open(f'{workdir}.log', 'w'))  # pylint: disable=consider-using-with
      processes.append(subprocess.Popen(
          main_command(workdir, *flags, *coordinator, f'--process_id={index}'), cwd=REPO,
          env=with_devices(env, 1), stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 300
    while not (workdirs[0] / 'checkpoints' / str(STEPS)).exists():
      assert all(p.poll() is None for p in processes) and time.monotonic() < deadline
      time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=180) for p in processes]
  finally:
    for process in processes:
      process.kill()
      process.wait()
    for log in logs:
      log.close()
  texts = [pathlib.Path(f'{w}.log').read_text() for w in workdirs]
  assert codes == [143, 143], [t[-2000:] for t in texts]
  saved = [re.search(r'Preempted: checkpoint of step (\d+) saved', t) for t in texts]
  assert saved[0] and saved[1], [t[-2000:] for t in texts]
  step = int(saved[0].group(1))
  assert int(saved[1].group(1)) == step and STEPS <= step < LONG
  assert int(final_params(workdirs[0])['/step']) == step
  codes, logs_text = run_processes(list(workdirs), *flags, env=with_devices(env, 1))
  assert codes == [0, 0], logs_text
  assert f'Resuming from the checkpoint at step {step}.' in logs_text
  assert_bit_equal(final_params(workdirs[0]), final_params(two_processes[0]))


def test_two_processes_under_mesh_train_as_under_pmap(tmp_path, env, two_processes):
  """jit over a Mesh of both processes' devices, each feeding its half of the global batch
  through make_array_from_process_local_data: pmap's parameters, bit for bit."""
  workdirs = process_workdirs(tmp_path)
  codes, logs = run_processes(list(workdirs), *FLAGS, f'--config.num_train_steps={STEPS}',
                              '--config.parallelism=mesh', env=with_devices(env, 1))
  assert codes == [0, 0], logs
  # The plateau state differs by design: this run evaluated at its last step, STEPS.
  assert_bit_equal(trained(final_params(workdirs[0])),
                   trained(final_params(two_processes[0], step=STEPS)))
