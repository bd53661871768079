"""Gives back to the operating system the host memory that XLA's compiler used and freed.

Compiling the AlexNet train step allocates and frees hundreds of MiB on the host in many
small blocks. glibc keeps such freed memory in its heaps, so the process would stay that much
larger for the whole run (measured in docs/benchmarks.md, "Memory").
`malloc_trim(0)` hands whole free pages back; memory still in use is not touched.
"""

import ctypes
import ctypes.util
import functools
from typing import Any

import jax


@functools.cache
def _malloc_trim():
  """glibc's `malloc_trim`, or None where the C library has none (macOS, musl)."""
  library = ctypes.util.find_library('c')
  trim = getattr(ctypes.CDLL(library), 'malloc_trim', None) if library else None
  if trim is not None:
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  return trim


def release_freed(after: Any = None) -> bool:
  """Returns freed heap pages to the OS; True if any were released, False if none or no glibc.

  Args:
    after: arrays to wait for first (a step's first outputs), so that the trim comes after
      that run, whatever it allocated and freed on the way.
  """
  jax.block_until_ready(after)
  trim = _malloc_trim()
  return bool(trim(0)) if trim is not None else False
