"""A cluster job rehearsed on one machine: real processes, one shared workdir, streamed shards.

Each job is 2 (or more) processes of `python -m alexnet_jax.main` joined by `jax.distributed`
on localhost (fake CPU devices, gloo collectives), all in ONE workdir, as a SLURM or mpirun
job on a shared file system runs them, reading the digits prepared into TFRecord shards
(`alexnet_jax.prepare`): each process reads only its own share of the records. The faults are
the ones a cluster has: SIGTERM to one process (preemption), SIGKILL of one process, a damaged
newest checkpoint, a finished job started again, and a resume on another process count.

All runs have dropout off: its masks are keyed by (step, global device index), so they differ
between device layouts by design, and only dropout-free runs have one result to compare with.
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

from alexnet_jax import checkpointing
from configs import default
from test_main import REPO, assert_bit_equal, final_params, main_command, run_main, trained

STEPS = 2  # Steps between checkpoints.
LONG = 5 * STEPS  # Steps of a whole job: long enough for a signal to land mid-run.
# num_devices=0: all the devices XLA_FLAGS gives. A constant learning rate, since cosine decays
# over num_train_steps and would tie the schedule to where each run stops; no warmup, so that
# every step moves the params by a full learning rate.
FLAGS = ['--config.num_devices=0', '--config.model.dropout_rate=0.0',
         '--config.lr_schedule=constant', '--config.warmup_epochs=0',
         f'--config.checkpoint_every_steps={STEPS}', '--config.keep_checkpoints=10',
         f'--config.num_train_steps={LONG}', '--config.dataset=prepared']


@pytest.fixture(scope='module')
def shards(tmp_path_factory) -> pathlib.Path:
  """The digits prepared as the TINY runs read them (66 px canvases), 128 records a shard:
  12 train shards (of 2 processes, 0 reads shards 0-5 and 1 reads 5-11) and 3 test shards."""
  from alexnet_jax import prepare  # pylint: disable=g-import-not-at-top
  output = tmp_path_factory.mktemp('digits_shards')
  config = default.get_config()
  config.resize_size = 66
  assert prepare.prepare(config, str(output), examples_per_shard=128)
  return output


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


class Job:
  """The processes of one job in one shared workdir; process i logs to WORKDIR.p<i>.log.

  shards: the prepared data to read; None: the digits in memory.

  A context manager: on the way out none is left running, which also frees the
  coordinator's port.
  """

  def __init__(self, workdir, shards, *flags, env, processes=2, devices=1):
    self.workdir = pathlib.Path(workdir)
    coordinator = [f'--coordinator_address=127.0.0.1:{free_port()}',
                   f'--num_processes={processes}',
                   f'--config.data_dir={shards}' if shards else '--config.dataset=digits']
    self.processes = []
    for index in range(processes):
      with open(self.log_path(index), 'w') as log:  # A file: no one reads a pipe meanwhile.
        self.processes.append(subprocess.Popen(
            main_command(self.workdir, *FLAGS, *flags, *coordinator, f'--process_id={index}'),
            cwd=REPO, env=with_devices(env, devices), stdout=log, stderr=subprocess.STDOUT))

  def log_path(self, index: int) -> pathlib.Path:
    return pathlib.Path(f'{self.workdir}.p{index}.log')

  def logs(self) -> list[str]:
    return [self.log_path(i).read_text() for i in range(len(self.processes))]

  def tails(self) -> str:
    return '\n'.join(f'--- process {i}:\n{log[-3000:]}' for i, log in enumerate(self.logs()))

  def wait(self, timeout=420, grace=60) -> list[int]:
    """Exit codes (negative: killed) once all have exited, or are killed: at `timeout`, or
    `grace` seconds after one failed (exit status neither 0 nor 143), since a process waiting
    on a dead peer's collective might never return."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in self.processes) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0, 143) for p in self.processes):
        deadline = min(deadline, time.monotonic() + grace)
      time.sleep(0.1)
    return self.stop()

  def wait_for_checkpoint(self, step: int, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while not (self.workdir / 'checkpoints' / str(step)).exists():
      assert all(p.poll() is None for p in self.processes), self.tails()
      assert time.monotonic() < deadline, self.tails()
      time.sleep(0.05)

  def stop(self) -> list[int]:
    for process in self.processes:
      process.kill()  # A no-op for one that has exited.
      process.wait()
    return [p.returncode for p in self.processes]

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def run_job(workdir, shards, *flags, env, **kwargs) -> tuple[list[int], Job]:
  with Job(workdir, shards, *flags, env=env, **kwargs) as job:
    return job.wait(), job


@pytest.fixture(scope='module')
def job(tmp_path_factory, shards, env) -> pathlib.Path:
  """The reference: a LONG-step job of 2 processes x 1 device, every checkpoint kept."""
  workdir = tmp_path_factory.mktemp('job') / 'run'
  codes, finished = run_job(workdir, shards, env=env)
  assert codes == [0, 0], finished.tails()
  return workdir


def copy_until(workdir, step: int, to: pathlib.Path) -> pathlib.Path:
  """A copy of `workdir` whose newest checkpoint is `step` (an unfinished run's)."""
  shutil.copytree(workdir, to)
  for later in (to / 'checkpoints').iterdir():
    if later.name.isdigit() and int(later.name) > step:
      shutil.rmtree(later)
  (to / 'final_metrics.json').unlink()
  return to


def rerun_resumes_and_ends_as(job_dir, workdir, shards, env, step: int) -> Job:
  """Runs the job again in `workdir`: it must resume at `step` and end bit-identical to the
  uninterrupted job in `job_dir`."""
  codes, rerun = run_job(workdir, shards, env=env)
  assert codes == [0, 0], rerun.tails()
  assert f'Resuming from the checkpoint at step {step}.' in rerun.logs()[0]
  assert_bit_equal(final_params(workdir), final_params(job_dir))
  return rerun


@pytest.mark.slow
def test_a_job_run_twice_ends_with_the_same_parameters_and_a_rerun_changes_nothing(
    job, shards, env, tmp_path):
  workdir = tmp_path / 'run'
  codes, again = run_job(workdir, shards, env=env)
  assert codes == [0, 0], again.tails()
  first, second = again.logs()
  assert 'on 2 processes' in first and 'on 2 devices' in first
  assert f'[{LONG}] train' in first and f'[{LONG}] train' not in second  # Process 0 logs.
  assert_bit_equal(final_params(workdir), final_params(job))
  names = {p.name for p in workdir.iterdir()}
  assert {'metrics.jsonl', 'tensorboard', 'final_metrics.json', 'model_summary.txt',
          'config.json', 'curves.png'} <= names
  assert not [n for n in names if n.endswith(('.partial', '.tmp'))]
  # Run again, finished: every process says so and every file stays as it was.
  files = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in workdir.rglob('*')}
  codes, rerun = run_job(workdir, shards, env=env)
  assert codes == [0, 0], rerun.tails()
  assert f'holds a finished run: step {LONG} of {LONG}' in rerun.logs()[0]
  assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in workdir.rglob('*')} == files


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step_and_resumes_bit_exactly(
    job, shards, env, tmp_path):
  """JAX's preemption service carries process 1's notice to process 0: both save the same
  step and exit 143; the rerun of both ends as the uninterrupted job did."""
  workdir = tmp_path / 'run'
  with Job(workdir, shards, env=env) as preempted:
    preempted.wait_for_checkpoint(STEPS)
    preempted.processes[1].send_signal(signal.SIGTERM)
    codes = preempted.wait(timeout=180)
  logs = preempted.logs()
  assert codes == [143, 143], preempted.tails()
  saved = [re.search(r'Preempted: checkpoint of step (\d+) saved', log) for log in logs]
  assert saved[0] and saved[1], preempted.tails()
  step = int(saved[0].group(1))
  assert int(saved[1].group(1)) == step and STEPS <= step < LONG
  assert int(final_params(workdir)['/step']) == step
  rerun_resumes_and_ends_as(job, workdir, shards, env, step)


@pytest.mark.slow
def test_sigkill_of_one_process_ends_the_job_and_a_rerun_ends_as_the_uninterrupted_one(
    job, shards, env, tmp_path):
  workdir = tmp_path / 'run'
  with Job(workdir, shards, env=env) as killed:
    killed.wait_for_checkpoint(STEPS)
    killed.processes[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    codes = killed.wait(timeout=240, grace=3 * checkpointing.BARRIER_TIMEOUT_S)
    seconds = time.monotonic() - start
  survivor = killed.logs()[0]
  assert codes == [1, -signal.SIGKILL], killed.tails()
  lost = [line for line in survivor.splitlines() if 'Lost process' in line]
  assert len(lost) == 1 and 'Lost process 1 of this 2-process job (' in lost[0], survivor[-3000:]
  assert lost[0].endswith('rerun the job.')
  assert 'Traceback' not in survivor and 'Fatal Python error' not in survivor, survivor[-3000:]
  # Met in a training step's collective: at once; in a save's barriers: at their timeouts
  # (tests/test_cluster.py holds that case on its own).
  assert seconds < (30 if 'Gloo' in lost[0] else 3 * checkpointing.BARRIER_TIMEOUT_S), lost
  complete = max(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert complete >= STEPS
  rerun_resumes_and_ends_as(job, workdir, shards, env, complete)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_moved_aside_once_and_all_restore_the_older(
    job, shards, env, tmp_path):
  workdir = copy_until(job, 2 * STEPS, tmp_path / 'run')
  for path in (workdir / 'checkpoints' / str(2 * STEPS) / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 3])
  resumed = rerun_resumes_and_ends_as(job, workdir, shards, env, STEPS)
  for log in resumed.logs():  # Each process skipped it and names the one place it went.
    assert re.search(rf'Skipped damaged checkpoint step {2 * STEPS} .*; moved to '
                     rf'\S*checkpoints-damaged/{2 * STEPS}\n', log), log[-3000:]
  assert [p.name for p in (workdir / 'checkpoints-damaged').iterdir()] == [str(2 * STEPS)]


@pytest.mark.slow
def test_resuming_on_another_process_count_is_refused_naming_it(job, env, shards, tmp_path):
  workdir = copy_until(job, STEPS, tmp_path / 'run')
  config = (workdir / 'config.json').read_text()
  result = run_main(workdir, *FLAGS, f'--config.data_dir={shards}', env=env)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert re.search(r'was trained by 2 processes, each reading its own share of the '
                   r"'prepared' records, and this run has 1: .* Rerun with 2 processes",
                   result.stderr), result.stderr[-3000:]
  assert (workdir / 'config.json').read_text() == config
  assert max(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == STEPS


@pytest.mark.slow
def test_a_checkpoint_resumes_on_more_devices_per_process(job, shards, env, tmp_path):
  """Checkpoints hold host arrays: 2 processes x 2 devices go on from 2 x 1's checkpoint.
  The per-device batch halves, so sums run in another order (see `assert_same_training`)."""
  workdir = copy_until(job, STEPS, tmp_path / 'run')
  codes, resumed = run_job(workdir, shards, env=env, devices=2)
  assert codes == [0, 0], resumed.tails()
  assert 'on 4 devices' in resumed.logs()[0]
  assert_same_training(final_params(workdir), final_params(job),
                       start=final_params(job, step=STEPS))


def assert_same_training(a, b, *, start):
  """`a` and `b` moved the same way from `start`: per array, |a - b| <= 5% of |b - start|.

  Runs whose per-device batch differs sum gradients in another order, and training amplifies
  those float32 roundings (a ReLU or max-pool choice flips, digits have many exact ties). Two
  uninterrupted 6-step runs on 1 and on 2 devices differed by up to 0.09% or up to 1.7% of how
  far training moved an array, with two versions of the conv gradient code (measured). By
  estimate, a lost momentum buffer would be ~50% (momentum 0.9 carries about half of the
  steps after the resume), a wrong batch ~100%.
  """
  assert int(a['/step']) == int(b['/step'])
  keys = [k for k in a if k.startswith('/params/')]
  assert keys
  for key in keys:
    moved = np.linalg.norm(b[key] - start[key])
    assert np.linalg.norm(a[key] - b[key]) <= 0.05 * moved, key


@pytest.mark.slow
def test_two_processes_under_mesh_train_as_under_pmap(job, shards, env, tmp_path):
  """jit over a Mesh of both processes' devices, each feeding its half of the global batch
  through make_array_from_process_local_data: pmap's parameters, bit for bit."""
  workdir = tmp_path / 'run'
  codes, mesh = run_job(workdir, shards, f'--config.num_train_steps={STEPS}',
                        '--config.parallelism=mesh', env=env)
  assert codes == [0, 0], mesh.tails()
  # The plateau state differs by design: this run evaluated at its last step, STEPS.
  assert_bit_equal(trained(final_params(workdir)), trained(final_params(job, step=STEPS)))


@pytest.mark.slow
def test_model_parallelism_on_two_processes_of_two_devices_trains_as_pmap(
    job, shards, env, tmp_path):
  """The paper's split on each host's 2 devices, data parallel across the 2 hosts: the same
  global batch, the same per-replica slices, so pmap's parameters to float32 rounding (XLA
  partitions each layer's sums differently)."""
  workdir = tmp_path / 'run'
  codes, model = run_job(workdir, shards, f'--config.num_train_steps={STEPS}',
                         '--config.parallelism=model', env=env, devices=2)
  assert codes == [0, 0], model.tails()
  assert 'on 4 devices' in model.logs()[0]
  a, b = final_params(workdir), final_params(job, step=STEPS)
  assert int(a['/step']) == int(b['/step']) == STEPS
  for key in (k for k in a if k.startswith('/params/')):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_two_processes_on_in_memory_data_train_as_one_process_on_the_same_global_batch(
    env, tmp_path):
  """Where every process lists the whole split (paths, pixels), the global batch does not
  depend on the process count: 2 processes x 1 device = 1 process x 2 devices, to rounding."""
  codes, two = run_job(tmp_path / 'two', None, f'--config.num_train_steps={STEPS}', env=env)
  assert codes == [0, 0], two.tails()
  one = run_main(tmp_path / 'one', *FLAGS, f'--config.num_train_steps={STEPS}',
                 '--config.dataset=digits', env=with_devices(env, 2))
  assert one.returncode == 0, one.stderr[-3000:]
  a, b = final_params(tmp_path / 'two'), final_params(tmp_path / 'one')
  assert int(a['/step']) == int(b['/step']) == STEPS
  for key in (k for k in a if k.startswith('/params/')):
    # atol: a few float32 ulps of the largest weights (~0.4), for the entries near zero.
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)
