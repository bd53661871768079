"""Joining a multi-process job: which cluster environments the commands join (cli.start).

What the others do when one process of a job dies: tests/test_distributed.py, the SIGKILL test.
"""

import os
import signal
import subprocess
import sys
import time
import types

import jax
import pytest

from alexnet_jax import checkpointing, cli
from test_distributed import free_port, with_devices
from test_main import REPO

# What the launchers set (`srun -n 2`, `mpirun -n 4`), as JAX's cluster detection reads them.
SLURM = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'node[001-002]', 'SLURM_NTASKS': '2',
         'SLURM_PROCID': '1', 'SLURM_LOCALID': '0'}
OPEN_MPI = {'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1,10.148.0.1:34911',
            'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '2',
            'OMPI_COMM_WORLD_LOCAL_RANK': '0'}
# Variables of the clusters JAX detects, none of which may leak in from the machine the tests
# run on.
_CLUSTER_PREFIXES = ('SLURM_', 'OMPI_', 'TPU_', 'MEGASCALE_', 'KUBERNETES_', 'JAX_COORDINATOR')


@pytest.fixture
def joins(monkeypatch):
  """Outside any cluster, with no flags given: the list of the jax.distributed.initialize calls
  `cli._initialize_distributed` makes, as their keyword arguments."""
  for name in os.environ:
    if name.startswith(_CLUSTER_PREFIXES):
      monkeypatch.delenv(name)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  # The flags' values without parsing the command line: parsing (and unparsing) resets absl's
  # verbosity, which would hide later tests' INFO logs from caplog.
  for holder in ('_COORDINATOR', '_NUM_PROCESSES', '_PROCESS_ID'):
    monkeypatch.setattr(cli, holder, types.SimpleNamespace(value=None))
  return calls


@pytest.mark.parametrize('environment', [SLURM, OPEN_MPI], ids=['srun', 'mpirun'])
def test_a_job_of_several_processes_that_jax_detects_is_joined(joins, monkeypatch,
                                                               environment):
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  cli._initialize_distributed()  # pylint: disable=protected-access
  # JAX reads the rest from the environment.
  assert joins == [{'heartbeat_timeout_seconds': 4 * checkpointing.BARRIER_TIMEOUT_S}]


@pytest.mark.parametrize('environment', [
    {}, {**SLURM, 'SLURM_NTASKS': '1', 'SLURM_STEP_NODELIST': 'node001'},
    # sbatch's batch script, outside any srun step: one process, whatever the job's tasks.
    {'SLURM_JOB_ID': '4242', 'SLURM_NTASKS': '2'},
    {**OPEN_MPI, 'OMPI_COMM_WORLD_SIZE': '1'}],
                         ids=['no_cluster', 'srun_one_task', 'sbatch_script', 'mpirun_one'])
def test_no_job_or_a_job_of_one_process_is_not_joined(joins, monkeypatch, environment):
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  cli._initialize_distributed()  # pylint: disable=protected-access
  assert not joins


def test_the_flags_are_joined_as_given(joins, monkeypatch):
  cli._COORDINATOR.value = 'host0:1234'  # pylint: disable=protected-access
  cli._NUM_PROCESSES.value = 2  # pylint: disable=protected-access
  cli._PROCESS_ID.value = 1  # pylint: disable=protected-access
  cli._initialize_distributed()  # pylint: disable=protected-access
  assert joins == [{'coordinator_address': 'host0:1234', 'num_processes': 2, 'process_id': 1,
                    'heartbeat_timeout_seconds': 4 * checkpointing.BARRIER_TIMEOUT_S}]


_START = """
import jax
from absl import flags
from alexnet_jax import cli
flags.FLAGS(['start'])
cli.start()
print('JOINED', jax.process_index(), jax.process_count())
"""


def run_together(commands: list[list[str]], envs: list[dict[str, str]],
                 timeout: int = 300) -> tuple[list[int], list[str]]:
  """Runs the commands at once, in the repository; their exit codes and outputs. Any still
  running after `timeout` seconds is killed (and the wait raises)."""
  processes = [subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for command, env in zip(commands, envs)]
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in processes]
  finally:
    for process in processes:
      process.kill()
  return [p.returncode for p in processes], logs


def test_two_mpirun_ranks_join_one_job(env):
  """Real processes with Open MPI's variables (process 0's address from its URI, JAX's port
  variable): they start as one job of 2."""
  port = free_port()
  _, logs = run_together(
      [[sys.executable, '-c', _START]] * 2,
      [{**with_devices(env, 1), 'JAX_COORDINATOR_PORT': str(port),
        'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://127.0.0.1:1',
        'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_COMM_WORLD_RANK': str(rank),
        'OMPI_COMM_WORLD_LOCAL_RANK': str(rank)} for rank in (0, 1)], timeout=120)
  assert [f'JOINED {rank} 2' in log for rank, log in enumerate(logs)] == [True, True], logs


# Process 1 dies after starting an asynchronous save, so process 0's save waits for it in
# Orbax's barrier (JAX's coordination service, not a gloo collective).
_LOST_IN_CHECKPOINT_BARRIER = """
import os, signal
import numpy as np
from absl import app
from alexnet_jax import checkpointing, cli
from flax.training import train_state
import jax
import optax

# Shorter than the 30 s a job waits, to keep the test short; the heartbeat follows it (cli).
checkpointing.BARRIER_TIMEOUT_S = WAIT_SECONDS

def main(argv):
  cli.start()
  state = train_state.TrainState.create(apply_fn=None, params={'w': np.ones(4, np.float32)},
                                        tx=optax.sgd(0.1))
  manager = checkpointing.create_manager(argv[1], keep=2)
  with cli.user_errors():
    checkpointing.save(manager, state, {'step': 0})
    if jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGKILL)
    checkpointing.wait(manager)

app.run(main)
"""


@pytest.mark.slow
def test_a_process_lost_during_a_checkpoint_save_ends_the_others_in_one_line(env, tmp_path):
  port, barrier = free_port(), 5
  start = time.monotonic()
  codes, logs = run_together(
      [[sys.executable, '-c', _LOST_IN_CHECKPOINT_BARRIER.replace('WAIT_SECONDS', f'{barrier}'),
        str(tmp_path / 'checkpoints'),
        f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={rank}']
       for rank in (0, 1)], [with_devices(env, 1)] * 2, timeout=240)
  seconds = time.monotonic() - start
  assert codes == [1, -signal.SIGKILL], logs
  lost = [line for line in logs[0].splitlines() if 'Lost process' in line]
  assert len(lost) == 1 and 'Lost process 1 of this 2-process job (' in lost[0], logs[0]
  assert 'Traceback' not in logs[0] and 'Terminating process' not in logs[0], logs[0]
  # At the save's barrier timeouts (two in turn), before JAX's heartbeat timeout (4 of them);
  # start-up takes under 15 s.
  assert seconds < 3 * barrier + 15, seconds
