"""Trains AlexNet: `python -m alexnet_jax.main --config=configs/imagenet.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.batch_size=256 --config.model.init=caffe`.
Running again with the same workdir resumes from its newest checkpoint.
"""

import os

# TensorFlow only feeds data: keep it off the GPUs and quiet. Must precede its first import.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from alexnet_jax import cli  # pylint: disable=g-import-not-at-top
from alexnet_jax import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and plots.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.start()
  with cli.user_errors(train.NonFiniteError):
    try:
      train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)
    except train.Preempted as e:
      logging.warning('%s', e)
      raise SystemExit(143) from None  # 128 + SIGTERM: schedulers read it as "requeue me".


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
