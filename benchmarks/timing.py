"""Interleaved timing, shared by the benchmark scripts."""

from collections.abc import Callable
import time


def time_interleaved(runners: dict[str, Callable[[int], None]], rounds: int,
                     steps: int) -> dict[str, list[float]]:
  """Seconds per round of `steps` steps for each runner, runners alternating order by round.

  Load from other processes then hits every runner alike. Each runner must block until its
  `steps` steps are done.
  """
  names = list(runners)
  seconds = {name: [] for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      runners[name](steps)
      seconds[name].append(time.perf_counter() - start)
  return seconds
