"""What the commands (main, evaluate, predict) share: start-up, flag parsing and user errors.

A user's mistake (bad flag, missing data or checkpoint) costs one clear line and a non-zero
exit status, never a traceback.
"""

import contextlib
import functools
import logging as logging_std
import os
import re
import sys
from typing import Iterator, NamedTuple

from absl import flags
from absl import logging
import jax
from jax._src import clusters
from ml_collections import config_flags

from alexnet_jax import checkpointing
from alexnet_jax import cpu_convolutions

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs that JAX '
    'does not detect itself (SLURM srun steps and Open MPI mpirun jobs of several processes '
    'are detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process in a multi-process run.')

# A process of the job is gone: a collective (gloo's, on CPU) failed ("Gloo all-reduce
# failed: ... Connection reset by peer"), or a checkpoint's barrier in JAX's coordination
# service timed out or saw the peer's heartbeats stop ("Barrier timed out", "Barrier failed").
_LOST_PEER = re.compile(r'Gloo [\w-]+ failed|Barrier (timed out|failed)')

# Errors that are the user's to fix: one line of explanation, exit status 1, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, checkpointing.CheckpointError)


class ModelFlags(NamedTuple):
  """The flags of the commands that use a trained model (evaluate, predict)."""
  workdir: flags.FlagHolder
  config: flags.FlagHolder
  checkpoint: flags.FlagHolder
  init_from: flags.FlagHolder


# Once per process: a command may use another's helpers (neighbours loads images as predict
# does), and importing both must not define the flags twice.
@functools.cache
def define_model_flags() -> ModelFlags:
  """Defines --workdir, --config, --checkpoint and --init_from; returns their holders."""
  return ModelFlags(
      workdir=flags.DEFINE_string('workdir', None, 'Workdir of a training run.', required=True),
      config=config_flags.DEFINE_config_file(
          'config', None, 'Config file; default: the config.json the run saved in --workdir.',
          lock_config=True),
      checkpoint=flags.DEFINE_string(
          'checkpoint', 'latest', "Checkpoint of --workdir: a step, 'latest' or 'best' (by "
          "config.best_metric, validation top-1 by default)."),
      init_from=flags.DEFINE_string(
          'init_from', None, 'Use these weights instead of a checkpoint: an .npz of '
          'alexnet_jax.convert or a torch .pth state_dict.'))


def _initialize_distributed() -> None:
  """Joins a multi-process run when the flags describe one, or when the cluster environment
  does as jax.distributed.initialize() reads it (SLURM, Open MPI, ...) and has several
  processes: a job of one task runs alone."""
  # Longer than a save's barriers wait, one after the other: a peer lost during a save then
  # ends the others' wait in Python (one line), not at the heartbeat timeout in C++.
  heartbeat = 4 * checkpointing.BARRIER_TIMEOUT_S
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               heartbeat_timeout_seconds=heartbeat)
  elif _detected_process_count() > 1:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)


def _detected_process_count() -> int:
  """The processes of the cluster job JAX detects around this one (1 where it detects none)."""
  # JAX has no public way to ask without joining; this is the one call its initialize() makes
  # to detect, with every other parameter given so that it looks nothing else up (process 0's
  # address is a network query on some clusters).
  _, count, _, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      coordinator_address='unused:0', num_processes=None, process_id=0, local_device_ids=[0],
      cluster_detection_method=None, initialization_timeout=None)
  return count or 1


class _QuietOrbax(logging_std.Filter):
  """Drops Orbax's per-save INFO chatter (dozens of lines a checkpoint) and its tracebacks of
  a barrier that a lost process left (`user_errors` says that in one line); keeps the rest."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < logging_std.WARNING:
      return False
    return not (record.exc_info and
                _LOST_PEER.search(logging_std.Formatter().formatException(record.exc_info)))


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the command line; a bad flag, config file or config field is one line, exit 2."""
  try:
    remaining = flags.FLAGS(argv)
    if flags.FLAGS.config is not None:
      flags.FLAGS.config.keys()  # A config file that failed to load raises on first use: here.
    return remaining
  except flags.Error as e:
    message, about_config = str(e), '--config' in str(e)
  except Exception as e:  # pylint: disable=broad-except
    # config_flags reports missing files and unknown fields as OSError/AttributeError.
    message, about_config = f'{type(e).__name__}: {e}'.replace('\n', ' '), True
  hint = ('\nEach --config.FIELD must exist in the config file; see configs/*.py.'
          if about_config else '')
  sys.stderr.write(f'{argv[0]}: bad command line: {message}{hint}\n')
  raise SystemExit(2)


def start() -> None:
  """Starts a command: picks XLA:CPU's convolution kernels, quiets Orbax, joins a
  multi-process run, logs on process 0 only."""
  _choose_cpu_convolutions()
  logging.get_absl_handler().addFilter(_QuietOrbax())
  _initialize_distributed()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info('JAX %s on %d processes; local devices: %s', jax.__version__,
               jax.process_count(), jax.local_devices())


def _choose_cpu_convolutions() -> None:
  """Eigen's CPU convolutions (`cpu_convolutions.XLA_FLAG`) unless --config.model.ops=xla
  asks for XLA's defaults; before anything starts JAX's backends, which read the flag once.
  Commands that read the config of a workdir (evaluate, predict) take Eigen's."""
  config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
  cpu_convolutions.choose_convolutions('auto' if config is None else config.model.ops)


@contextlib.contextmanager
def user_errors(*more: type[Exception]) -> Iterator[None]:
  """Turns a `USER_ERRORS` exception (or one of the command's own, `more`) into one logged
  line and exit status 1, and so the collective of a multi-process job whose peer died
  (`exit_lost_process`)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if jax.distributed.is_initialized() and _LOST_PEER.search(str(e)):
      exit_lost_process(e)
    if not isinstance(e, USER_ERRORS + more):
      raise
    logging.error('%s: %s', type(e).__name__, e)
    raise SystemExit(1) from None


def exit_lost_process(error: Exception) -> None:
  """Logs "Lost process ..." (which one, where a 2-process job leaves no doubt) and exits 1
  at once."""
  count, index = jax.process_count(), jax.process_index()
  lost = str(1 - index) if count == 2 else f'(a peer of process {index})'
  logging.error('Lost process %s of this %d-process job (%s); the others cannot go on without '
                'it: rerun the job.', lost, count, str(error).strip().partition('\n')[0])
  logging.flush()
  # Not SystemExit: JAX's exit handler would wait for the lost process at its shutdown
  # barrier until the heartbeat timeout, then abort with a C++ stack trace (68 s, measured).
  os._exit(1)  # pylint: disable=protected-access
