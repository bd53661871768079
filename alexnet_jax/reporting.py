"""Where a run's numbers go: console lines, TensorBoard events and a JSONL history.

Only process 0 writes; the other processes of a multi-host run get a writer that does nothing.
The history file (`WORKDIR/metrics.jsonl`, one JSON object per record) is what the plots and
the sweep table read.
"""

import collections
from collections.abc import Iterator, Mapping
import contextlib
import json
import os
import time

from absl import logging
from etils import epath
import jax

HISTORY_FILE = 'metrics.jsonl'


class MetricWriter:
  """Writes scalar records to the console, TensorBoard and `metrics.jsonl`."""

  def __init__(self, workdir: epath.PathLike):
    self._active = jax.process_index() == 0
    self._history = epath.Path(workdir) / HISTORY_FILE
    self._summary = None
    if self._active:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._summary = tf.summary.create_file_writer(
          os.fspath(epath.Path(workdir) / 'tensorboard'))

  def write(self, step: int, kind: str, scalars: Mapping[str, float]) -> None:
    """Records `scalars` of one `kind` ('train', 'eval', ...) at `step`."""
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    logging.info('[%d] %s %s', step, kind,
                 ', '.join(f'{k}={v:.5g}' for k, v in scalars.items()))
    with self._history.open('a') as f:
      f.write(json.dumps({'step': step, 'kind': kind, 'time': time.time(), **scalars}) + '\n')
    with self._summary.as_default(step=step):
      for name, value in scalars.items():
        self._tf.summary.scalar(f'{kind}/{name}', value)
    self._summary.flush()

  def write_text(self, name: str, text: str) -> None:
    """Records a block of text (config, model summary) in TensorBoard."""
    if self._active:
      with self._summary.as_default(step=0):
        self._tf.summary.text(name, text)


def read_history(workdir: epath.PathLike) -> list[dict[str, float]]:
  """All records of `metrics.jsonl` in the workdir, oldest first ([] if there is none)."""
  path = epath.Path(workdir) / HISTORY_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TimeSpent:
  """Wall seconds per part of a run, each part timed where the loop enters it (the loop
  never enters one part inside another, so the parts do not overlap)."""

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)

  @contextlib.contextmanager
  def __call__(self, part: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[part] += time.perf_counter() - start


class Throughput:
  """Images per second and time left, from the steps done since the last report."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int):
    self._total, self._batch = total_steps, batch_size
    self._last_step, self._last_time = start_step, time.time()

  def report(self, step: int) -> dict[str, float]:
    """{'images_per_sec', 'step_time_ms', 'eta_min'} since the previous call."""
    now = time.time()
    steps = max(1, step - self._last_step)
    step_time = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    return {'images_per_sec': self._batch / step_time, 'step_time_ms': 1e3 * step_time,
            'eta_min': (self._total - step) * step_time / 60}
