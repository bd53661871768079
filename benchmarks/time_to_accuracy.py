"""Time to accuracy of finished runs: a table and val top-1 against wall minutes, one line each.

    python benchmarks/time_to_accuracy.py --out=docs/images/time_to_accuracy.png \
        'recipe A=/tmp/runs/A' 'recipe B=/tmp/runs/B'

Each argument is LABEL=WORKDIR of a run that finished (it has final_metrics.json). A run's
start is when final_metrics.json was written less its wall_time_s; each evaluation is placed
at the time metrics.jsonl recorded it. Prints one Markdown row per run (docs/results.md).
"""

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from alexnet_jax import reporting  # pylint: disable=g-import-not-at-top


def _curve(workdir: pathlib.Path) -> tuple[dict, list[tuple[float, float]]]:
  """(final metrics, [(wall minutes since the start, val top-1 %)] per evaluation)."""
  final_path = workdir / 'final_metrics.json'
  final = json.loads(final_path.read_text())
  start = final_path.stat().st_mtime - final['wall_time_s']
  evals = [r for r in reporting.read_history(workdir) if r['kind'] == 'eval']
  return final, [((r['time'] - start) / 60, 100 * r['top1']) for r in evals]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', help='LABEL=WORKDIR')
  parser.add_argument('--out', required=True, help='the PNG to write')
  args = parser.parse_args()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  print('| run | px | epochs | batch | minutes | val top-1 | val top-5 |')
  print('|---|---|---|---|---|---|---|')
  for label, _, workdir in (run.partition('=') for run in args.runs):
    workdir = pathlib.Path(workdir)
    config = json.loads((workdir / 'config.json').read_text())
    final, curve = _curve(workdir)
    ax.plot(*zip(*curve), 'o-', label=label)
    print(f"| {label} | {config['image_size']} | {final['epoch']:.0f} | {config['batch_size']} "
          f"| {final['wall_time_s'] / 60:.1f} | {100 * final['eval_top1']:.1f}% "
          f"| {100 * final['eval_top5']:.1f}% |")
  ax.axvline(30, color='grey', linestyle='--', linewidth=1)
  ax.set_xlabel('wall minutes from start (compilation and evaluations included)')
  ax.set_ylabel('Imagenette val top-1 (%), centre crop')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  print(f'Wrote {args.out}')


if __name__ == '__main__':
  main()
