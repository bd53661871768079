"""Pictures of a run: learning curves and the first-layer filters (the paper's Figure 3).

    python -m alexnet_jax.plots --workdir=DIR     # writes DIR/curves.png and DIR/filters.png
"""

from collections.abc import Sequence
import math
import pathlib

import matplotlib

matplotlib.use('Agg')  # Files only; never needs a display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from alexnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
from alexnet_jax import reporting  # pylint: disable=g-import-not-at-top


def plot_learning_curves(history: Sequence[dict[str, float]], path: str | pathlib.Path,
                         steps_per_epoch: int | None = None) -> None:
  """Loss and top-1/top-5 of train and eval vs step, learning-rate drops marked, to PNG.

  Args:
    history: records of `reporting.read_history`: kinds 'train', 'eval', and 'lr_drop' (a
      dashed line at its step).
    path: the PNG to write.
    steps_per_epoch: if given, a second x axis in epochs.
  """
  series = {kind: [r for r in history if r['kind'] == kind] for kind in ('train', 'eval')}
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
  for kind, style in (('train', '-'), ('eval', 'o-')):
    records = series[kind]
    steps = [r['step'] for r in records]
    if records:
      ax_loss.plot(steps, [r['loss'] for r in records], style, label=f'{kind} loss', ms=3)
      for k in ('top1', 'top5'):
        ax_acc.plot(steps, [r[k] for r in records], style, label=f'{kind} {k}', ms=3)
  drops = [r['step'] for r in history if r['kind'] == 'lr_drop']
  for ax in (ax_loss, ax_acc):
    for step in drops:
      ax.axvline(step, color='grey', ls='--', lw=0.8)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if steps_per_epoch:
      ax.secondary_xaxis('top', functions=(lambda s: s / steps_per_epoch,
                                           lambda e: e * steps_per_epoch)).set_xlabel('epoch')
  ax_loss.set_ylabel('cross-entropy')
  ax_acc.set_ylabel('accuracy')
  ax_acc.set_ylim(0, 1)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def filter_grid(kernel: np.ndarray, columns: int = 12, pad: int = 1) -> np.ndarray:
  """Tiles conv filters into one RGB image, each filter scaled to [0, 1] on its own.

  Args:
    kernel: [h, w, 3, n] (HWIO, the first layer's kernel).
    columns: filters per row.
    pad: pixels of white between filters.
  Returns:
    float32 [rows * (h + pad) + pad, columns * (w + pad) + pad, 3] in [0, 1].
  """
  h, w, _, n = kernel.shape
  rows = math.ceil(n / columns)
  grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), np.float32)
  for i in range(n):
    f = kernel[..., i]
    f = (f - f.min()) / max(float(f.max() - f.min()), 1e-12)
    r, c = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = f
  return grid


def plot_filters(kernel: np.ndarray, path: str | pathlib.Path) -> None:
  """Saves `filter_grid(kernel)` (e.g. conv1's 96 11x11x3 kernels) as a PNG, enlarged."""
  grid = filter_grid(kernel)
  fig = plt.figure(figsize=(grid.shape[1] / 16, grid.shape[0] / 16), dpi=100)
  fig.figimage(np.kron(grid, np.ones((4, 4, 1))).clip(0, 1), resize=True)
  fig.savefig(path)
  plt.close(fig)


def _steps_per_epoch(history: Sequence[dict[str, float]]) -> int | None:
  """Read back from the train records, whose 'epoch' is step / steps_per_epoch."""
  for record in history:
    if record['kind'] == 'train' and record.get('epoch'):
      return round(record['step'] / record['epoch'])
  return None


def main(argv: Sequence[str]) -> None:
  """Draws curves.png and (if a checkpoint exists) filters.png into --workdir."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(flags.FLAGS.workdir)
  history = reporting.read_history(workdir)
  if not history:
    raise SystemExit(f'No {reporting.HISTORY_FILE} in {workdir}: is it a training workdir?')
  plot_learning_curves(history, workdir / 'curves.png', _steps_per_epoch(history))
  print(f'wrote {workdir / "curves.png"}')
  try:
    step, params, _ = checkpointing.read_params(workdir)
  except checkpointing.CheckpointError as e:
    print(f'no filters.png: {e}')
    return
  plot_filters(np.asarray(params['conv1']['kernel']), workdir / 'filters.png')
  print(f'wrote {workdir / "filters.png"} (conv1 at step {step})')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string('workdir', None, 'Training workdir.', required=True)
  app.run(main)
