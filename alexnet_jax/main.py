"""Trains AlexNet: `python -m alexnet_jax.main --config=configs/imagenet.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.batch_size=256 --config.model.init=caffe`.
Running again with the same workdir resumes from its newest checkpoint.
"""

import logging as logging_std
import os
import sys

# TensorFlow only feeds data: keep it off the GPUs and quiet. Must precede its first import.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from alexnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
from alexnet_jax import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and plots.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs that JAX '
    'does not detect itself (SLURM, Open MPI and TPU pods are detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process in a multi-process run.')
flags.mark_flags_as_required(['config', 'workdir'])

# Errors that are the user's to fix: one line of explanation, exit status 1, no traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, checkpointing.CheckpointError,
                train.NonFiniteError)


def _initialize_distributed() -> None:
  """Joins a multi-process run when flags or the cluster environment describe one."""
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()


class _QuietOrbax(logging_std.Filter):
  """Drops Orbax's per-save INFO chatter (dozens of lines a checkpoint); keeps its warnings."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname


def _parse_flags(argv: list[str]) -> list[str]:
  """Parses the command line; a bad flag, config file or config field is one line, exit 2."""
  try:
    remaining = flags.FLAGS(argv)
    flags.FLAGS.config.keys()  # A config file that failed to load raises on first use: here.
    return remaining
  except flags.Error as e:
    message = str(e)
  except Exception as e:  # pylint: disable=broad-except
    # config_flags reports missing files and unknown fields as OSError/AttributeError.
    message = f'{type(e).__name__}: {e}'.replace('\n', ' ')
  sys.stderr.write(f'{argv[0]}: bad command line: {message}\n'
                   f'Each --config.FIELD must exist in the config file; see configs/*.py.\n')
  raise SystemExit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  _initialize_distributed()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info('JAX %s on %d processes; local devices: %s', jax.__version__,
               jax.process_count(), jax.local_devices())
  try:
    train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning('%s', e)
    raise SystemExit(143) from None  # 128 + SIGTERM: schedulers read it as "requeue me".
  except _USER_ERRORS as e:
    logging.error('%s: %s', type(e).__name__, e)
    raise SystemExit(1) from None


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main, flags_parser=_parse_flags)
