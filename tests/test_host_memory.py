"""host_memory.release_freed against the kernel's own count of this process's memory."""

import pathlib
import re

import numpy as np

from alexnet_jax import host_memory


def _rss_mib() -> float:
  text = pathlib.Path('/proc/self/status').read_text()
  return int(re.search(r'^VmRSS:\s+(\d+) kB', text, re.M).group(1)) / 1024


def test_freed_small_blocks_go_back_to_the_os_and_live_ones_stay():
  # 300 MiB in 4 KiB blocks (below glibc's mmap threshold: they live in its heap, as the
  # compiler's allocations do); every 64th stays alive, so the heap cannot shrink from its top.
  blocks = [np.ones(4096 - 64, np.uint8) for _ in range(300 * 256)]
  kept = blocks[::64]
  del blocks
  before = _rss_mib()
  assert host_memory.release_freed()
  after = _rss_mib()
  assert before - after > 150, (before, after)
  assert all(int(block.sum()) == block.size for block in kept)  # Live memory is untouched.
