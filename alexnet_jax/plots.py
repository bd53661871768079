"""Pictures of a run: learning curves, the first-layer filters (the paper's Figure 3), and the
pictures of predictions and of nearest neighbours (its Figure 4) that predict and neighbours
draw.

    python -m alexnet_jax.plots --workdir=DIR     # writes DIR/curves.png and DIR/filters.png

Images given to the picture functions are [S, S, C] arrays on the 0-255 scale (C = 3, or 1
for grey).
"""

from collections.abc import Sequence
import math
from typing import Any

import matplotlib

matplotlib.use('Agg')  # Files only; never needs a display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from etils import epath  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from alexnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
from alexnet_jax import reporting  # pylint: disable=g-import-not-at-top


def plot_learning_curves(history: Sequence[dict[str, float]], path: epath.PathLike,
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
  _save(fig, path)


def _save(fig: plt.Figure, path: epath.PathLike) -> None:
  """Writes `fig` as a PNG at 100 dpi to `path` (also on a remote workdir, gs://...); closes
  it."""
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=100)
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


def colour_share(kernel: np.ndarray) -> np.ndarray:
  """How colour-specific each kernel is: the share of its energy in its chroma part.

  A kernel's grey part repeats at each pixel the mean of its 3 channel weights (it responds to
  brightness only); its chroma part is the rest, the channels' deviations from that mean,
  which sum to 0 at each pixel. The two parts are orthogonal, so
  share = |w - grey(w)|^2 / |w|^2 lies in [0, 1]: 0 for a grey kernel, 1 for one whose
  channels cancel at every pixel (pure colour opponency), 2/3 on average for independent
  random weights (2 of every pixel's 3 dimensions). A zero kernel scores 0.

  Args:
    kernel: [h, w, 3, n] (HWIO, conv1's kernel).
  Returns:
    float64 [n], each kernel's share.
  """
  kernel = np.asarray(kernel, np.float64)
  chroma = np.sum((kernel - kernel.mean(axis=2, keepdims=True))**2, axis=(0, 1, 2))
  energy = np.sum(kernel**2, axis=(0, 1, 2))
  return np.divide(chroma, energy, out=np.zeros_like(energy), where=energy > 0)


def kernel_groups(params: dict[str, Any]) -> int:
  """How many groups conv1's kernels form: the groups conv2 reads them in.

  2 in the paper variant (its two GPUs: conv2's first half of filters sees conv1's first half
  of kernels only, the second half the second), 1 where conv2 sees them all (torchvision's).
  """
  return params['conv1']['kernel'].shape[-1] // params['conv2']['kernel'].shape[2]


def group_captions(kernel: np.ndarray, groups: int) -> list[str]:
  """One line per group of kernel [h, w, C, n]: its kernels and, for RGB, its mean
  `colour_share`, e.g. 'kernels 0-47 (group 1 of 2): mean colour share 0.6243'."""
  per_group = kernel.shape[-1] // groups
  shares = colour_share(kernel) if kernel.shape[2] == 3 else None
  captions = []
  for g in range(groups):
    first, last = g * per_group, (g + 1) * per_group
    caption = f'kernels {first}-{last - 1}' + (f' (group {g + 1} of {groups})' if groups > 1
                                                else '')
    if shares is not None:
      caption += f': mean colour share {shares[first:last].mean():.4f}'
    captions.append(caption)
  return captions


_ZOOM = 4  # Screen pixels per kernel pixel.
_CAPTION_PX = 18


def plot_filters(kernel: np.ndarray, path: epath.PathLike, groups: int = 1) -> None:
  """Saves conv1's kernels as the paper's Figure 3 does, enlarged, as a PNG.

  One block of `filter_grid` per group (the paper's Figure 3: the top 48 kernels learned on
  GPU 1, the bottom 48 on GPU 2), each under its `group_captions` line.

  Args:
    kernel: [h, w, C, n] (e.g. conv1's 96 11x11x3 kernels).
    path: the PNG to write: 12 kernels a row, each pixel drawn 4x4; per group
      (rows (h + 1) + 1) * 4 + 18 pixels high.
    groups: see `kernel_groups`; n must split into them evenly.
  """
  per_group = kernel.shape[-1] // groups
  blocks = [filter_grid(kernel[..., g * per_group:(g + 1) * per_group]) for g in range(groups)]
  width = blocks[0].shape[1] * _ZOOM
  height = sum(block.shape[0] * _ZOOM + _CAPTION_PX for block in blocks)
  fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
  top = height
  for block, caption in zip(blocks, group_captions(kernel, groups)):
    fig.text(4 / width, (top - _CAPTION_PX / 2) / height, caption, fontsize=8, va='center')
    top -= _CAPTION_PX + block.shape[0] * _ZOOM
    ax = fig.add_axes((0, top / height, 1, block.shape[0] * _ZOOM / height))
    ax.imshow(block.clip(0, 1), interpolation='nearest', aspect='auto')
    ax.set_axis_off()
  _save(fig, path)


def short_name(name: str) -> str:
  """'n01440764 tench' -> 'tench': a picture has room for a class's English name only."""
  return name.split(' ', 1)[-1]


def _show(ax: plt.Axes, image: np.ndarray, title: str) -> None:
  """Draws an [S, S, C] 0-255 image (C 3 or 1) without axes, a small title above it."""
  image = np.clip(np.asarray(image, np.float32) / 255, 0, 1)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=1)
  else:
    ax.imshow(image)
  ax.set_title(title, fontsize=6)
  ax.set_axis_off()


# Inches (at 100 dpi) of a predictions cell (image above, its top-5 bars below).
_PREDICTION_CELL = (2.4, 3.2)
_PREDICTION_COLUMNS = 4


def plot_predictions(images: Sequence[np.ndarray], titles: Sequence[str], probs: np.ndarray,
                     names: Sequence[str], path: epath.PathLike, top: int = 5) -> None:
  """The paper's Figure 4 (left): each image above a bar chart of its `top` classes.

  Args:
    images: n images [S, S, C], 0-255.
    titles: n titles (e.g. file names).
    probs: [n, num_classes], each row summing to 1.
    names: [num_classes] class names.
    path: the PNG to write: min(n, 4) cells a row, each 240 x 320 pixels.
    top: bars per image.
  """
  columns = min(len(images), _PREDICTION_COLUMNS)
  rows = -(-len(images) // columns)
  fig = plt.figure(figsize=(columns * _PREDICTION_CELL[0], rows * _PREDICTION_CELL[1]), dpi=100)
  grid = fig.add_gridspec(2 * rows, columns, height_ratios=[2, 1] * rows, hspace=0.1,
                          wspace=0.1, left=0.02, right=0.98, top=0.94, bottom=0.02)
  for i, (image, title, p) in enumerate(zip(images, titles, probs)):
    row, column = divmod(i, columns)
    _show(fig.add_subplot(grid[2 * row, column]), image, title)
    ax = fig.add_subplot(grid[2 * row + 1, column])
    best = np.argsort(-p, kind='stable')[:top]
    ax.barh(np.arange(top), p[best], color='tab:blue', alpha=0.5)
    for y, c in enumerate(best):
      ax.text(0.01, y, f'{short_name(names[c])}  {p[c]:.1%}', va='center', fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(top - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
  _save(fig, path)


# Inches (at 100 dpi) of a neighbours cell.
_NEIGHBOUR_CELL = (1.2, 1.45)


def plot_neighbours(queries: Sequence[np.ndarray], query_titles: Sequence[str],
                    neighbours: Sequence[Sequence[np.ndarray]],
                    neighbour_titles: Sequence[Sequence[str]], path: epath.PathLike) -> None:
  """The paper's Figure 4 (right): each query image, then its nearest training images.

  Args:
    queries: Q images [S, S, C], 0-255.
    query_titles: Q titles.
    neighbours: Q lists of k images, nearest first.
    neighbour_titles: Q lists of k titles (e.g. class and distance).
    path: the PNG to write: a row per query, 1 + k cells of 120 x 145 pixels.
  """
  columns = 1 + len(neighbours[0])
  fig, axes = plt.subplots(len(queries), columns, squeeze=False, dpi=100,
                           figsize=(columns * _NEIGHBOUR_CELL[0],
                                    len(queries) * _NEIGHBOUR_CELL[1]))
  fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.01, wspace=0.08, hspace=0.3)
  for row, (query, title, images, titles) in enumerate(zip(queries, query_titles, neighbours,
                                                           neighbour_titles)):
    _show(axes[row, 0], query, title)
    for ax, image, neighbour_title in zip(axes[row, 1:], images, titles):
      _show(ax, image, neighbour_title)
  _save(fig, path)


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
  workdir = epath.Path(flags.FLAGS.workdir)
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
  kernel, groups = np.asarray(params['conv1']['kernel']), kernel_groups(params)
  plot_filters(kernel, workdir / 'filters.png', groups)
  print(f'wrote {workdir / "filters.png"} (conv1 at step {step})')
  for caption in group_captions(kernel, groups):
    print(f'  {caption}')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string('workdir', None, 'Training workdir.', required=True)
  app.run(main)
