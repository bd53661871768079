"""When to stop for a preemption notice (SIGTERM), decided the same way on every process.

Schedulers signal the hosts of a job at slightly different times. A process that stopped to
save on its own notice while the others dispatched the next collective step would hang the
job with nothing saved, so the decision is collective:

- several processes: JAX's preemption service (started by `jax.distributed.initialize`)
  catches SIGTERM on whichever process gets it, and `reached_preemption_sync_point` turns
  True on every process at the same sync point (the largest point any process had reached,
  plus one). It is the coordination service's own protocol: no device collective, so the
  step loop keeps its queued step.
- one process: a Python SIGTERM handler sets a flag (the preemption service needs
  `jax.distributed`, which a single-process run does not start).

Every process must call `Notice.reached` at the same sequence of points, numbered 0, 1, 2...
by the caller: after each train step and after each evaluation batch, so that a notice that
arrives during a long evaluation is honoured after the current eval batch.
"""

from collections.abc import Iterator
import contextlib
import signal

from absl import logging
import jax
from jax.experimental import multihost_utils


class Notice:
  """Whether every process has agreed to stop; see the module docstring."""

  def __init__(self):
    self._signalled = False
    self._point = -1

  def signal_received(self, signum=None, frame=None) -> None:
    """The SIGTERM handler of a single-process run."""
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step boundary.')
    self._signalled = True

  def reached(self) -> bool:
    """Moves to the next sync point; True once every process is to stop here."""
    self._point += 1
    if jax.process_count() == 1:
      return self._signalled
    return multihost_utils.reached_preemption_sync_point(self._point)


@contextlib.contextmanager
def watch() -> Iterator[Notice]:
  """A `Notice` for the duration of the block (its SIGTERM handler, on one process)."""
  notice = Notice()
  if jax.process_count() > 1:  # The preemption service holds SIGTERM; a handler would steal it.
    yield notice
    return
  try:
    previous = signal.signal(signal.SIGTERM, notice.signal_received)
  except ValueError:  # Not the main thread: leave signals alone.
    yield notice
    return
  try:
    yield notice
  finally:
    signal.signal(signal.SIGTERM, previous)
